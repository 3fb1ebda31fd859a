"""A lossless shared-memory queue: the rings between the stages of a split block loop.

The frame rings (:mod:`shm.ring`) let the newest frame win, which is right for video and wrong
for a block loop's latents: every block must reach the VAE decoder, in order, or its causal cache
breaks. A :class:`BlockQueue` is one segment of ``slots`` fixed-size slots, one producer and one
consumer, first in first out; the producer waits while every slot is full (back-pressure), the
consumer while none is. Two POSIX semaphores (``multiprocessing``'s, handed to the other process
when it is spawned) count the free and the filled slots; their post/wait are full memory
barriers, so a slot's bytes are visible before its count is.

A message is a short header (``bytes``: a msgspec-encoded struct) and a payload of arrays laid
end to end; the consumer's arrays are views into the slot (zero copy) until its next
:meth:`BlockQueue.get`, which gives the slot back.

Layout: a 4096-byte header (magic, slots, stride, capacity), then ``slots`` slots of
``stride`` bytes: ``[header length, payload length]`` (int64), the header, the payload.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.synchronize import Semaphore
from pathlib import Path

import numpy as np

from shm.ring import PAGE_BYTES, SHM_DIR, RingError, create_segment, round_up, segment_name

MAGIC = 0x6477_626C_6F63_6B71  # "dwblockq"
HEADER_BYTES = 4096
#: Room for a message's own header (a msgspec struct: ids, shapes) before its payload.
MESSAGE_HEADER_BYTES = 4096
_WORDS = 2  # header length, payload length
#: How often a waiting side looks whether its peer is still there.
POLL_S = 0.25


class QueueClosed(RingError):
    """The other side is gone (its process died) or did not answer in time."""


@dataclass(frozen=True)
class QueueHandle:
    """What another process needs to attach (picklable when a process is spawned)."""

    path: str
    filled: Semaphore
    free: Semaphore


@dataclass(frozen=True)
class Message:
    header: bytes
    payload: memoryview


class BlockQueue:
    """One side of a queue: :meth:`create` (the owner, which unlinks it) or :meth:`attach`."""

    def __init__(self, handle: QueueHandle, mm: mmap.mmap, owner: bool) -> None:
        self.handle = handle
        self.owner = owner
        self._mm = mm
        words = np.frombuffer(mm, dtype=np.int64, count=4)
        if int(words[0]) != MAGIC:
            raise RingError(f"{handle.path} is not a dreamwire block queue")
        self.slots, self.stride, self.capacity = (int(w) for w in words[1:4])
        self._written = 0  # the producer's count
        self._read = 0  # the consumer's count
        self._holding = False

    @classmethod
    def create(cls, run_id: str, name: str, slots: int, capacity: int) -> BlockQueue:
        """A new segment for messages of up to ``capacity`` payload bytes."""
        if slots < 2:
            raise ValueError("a queue needs at least 2 slots")
        path = SHM_DIR / segment_name(run_id, name)
        stride = round_up(8 * _WORDS + MESSAGE_HEADER_BYTES + capacity, PAGE_BYTES)
        mm = create_segment(path, HEADER_BYTES + slots * stride, f"queue {name}")
        np.frombuffer(mm, dtype=np.int64, count=4)[:] = (MAGIC, slots, stride, capacity)
        ctx = multiprocessing.get_context("spawn")
        handle = QueueHandle(str(path), ctx.Semaphore(0), ctx.Semaphore(slots))
        return cls(handle, mm, owner=True)

    @classmethod
    def attach(cls, handle: QueueHandle) -> BlockQueue:
        try:
            fd = os.open(handle.path, os.O_RDWR)
        except FileNotFoundError:
            raise RingError(f"block queue {handle.path} does not exist") from None
        try:
            mm = mmap.mmap(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return cls(handle, mm, owner=False)

    def _slot(self, count: int) -> int:
        return HEADER_BYTES + (count % self.slots) * self.stride

    @staticmethod
    def _wait(
        sem: Semaphore, timeout: float | None, alive: Callable[[], bool] | None, what: str
    ) -> bool:
        """Wait for ``sem``; False on timeout; :class:`QueueClosed` once ``alive`` says no."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = POLL_S if deadline is None else min(POLL_S, deadline - time.monotonic())
            if left > 0 and sem.acquire(timeout=left):
                return True
            if alive is not None and not alive():
                raise QueueClosed(f"{what}: the other side is gone")
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def put(
        self,
        header: bytes,
        arrays: Sequence[np.ndarray] = (),
        *,
        timeout: float | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> None:
        """Copy the message into the next slot, waiting while the queue is full."""
        if len(header) > MESSAGE_HEADER_BYTES:
            raise ValueError(f"a {len(header)}-byte header (at most {MESSAGE_HEADER_BYTES})")
        size = sum(a.nbytes for a in arrays)
        if size > self.capacity:
            raise ValueError(f"message of {size} bytes does not fit {self.capacity}-byte slots")
        if not self._wait(self.handle.free, timeout, alive, "put"):
            raise QueueClosed(f"put: queue full for {timeout} s")
        start = self._slot(self._written)
        words = np.frombuffer(self._mm, dtype=np.int64, count=_WORDS, offset=start)
        words[:] = (len(header), size)
        at = start + 8 * _WORDS
        self._mm[at : at + len(header)] = header
        at += MESSAGE_HEADER_BYTES
        for a in arrays:
            flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            np.frombuffer(self._mm, dtype=np.uint8, count=flat.nbytes, offset=at)[:] = flat
            at += flat.nbytes
        self._written += 1
        self.handle.filled.release()

    def get(
        self, *, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> Message | None:
        """The next message (None on timeout); its payload is valid until the next call."""
        self.release()
        if not self._wait(self.handle.filled, timeout, alive, "get"):
            return None
        start = self._slot(self._read)
        hlen, size = (int(w) for w in np.frombuffer(self._mm, np.int64, _WORDS, start))
        at = start + 8 * _WORDS
        header = bytes(self._mm[at : at + hlen])
        payload = memoryview(self._mm)[at + MESSAGE_HEADER_BYTES : at + MESSAGE_HEADER_BYTES + size]
        self._holding = True
        return Message(header, payload)

    def release(self) -> None:
        """Give back the slot of the last message (``get`` does it first)."""
        if self._holding:
            self._holding = False
            self._read += 1
            self.handle.free.release()

    def close(self) -> None:
        """Unmap, and remove the segment when this side owns it (peers keep their mapping)."""
        if self.owner:
            Path(self.handle.path).unlink(missing_ok=True)
        with contextlib.suppress(BufferError):  # a view is out: the mapping goes with it
            self._mm.close()


def pack(arrays: Sequence[np.ndarray]) -> list[tuple[str, list[int]]]:
    """Each array's dtype and shape, for the message header that :func:`unpack` reads."""
    return [(a.dtype.str, list(a.shape)) for a in arrays]


def unpack(payload: memoryview, layout: Sequence[tuple[str, Sequence[int]]]) -> list[np.ndarray]:
    """The payload's arrays as views, in the order :func:`pack` listed them."""
    out, at = [], 0
    for dtype, shape in layout:
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if len(shape) else 1
        out.append(np.frombuffer(payload, dt, count, at).reshape(shape))
        at += count * dt.itemsize
    return out
