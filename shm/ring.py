"""Shared-memory frame rings: the data plane between dreamwire's processes.

A ring is one file in ``/dev/shm`` (a POSIX shared-memory segment) mapped directly with
``mmap``; ``multiprocessing.shared_memory`` is avoided because its resource tracker unlinks
segments when an *attaching* process exits. Only the owner (the supervisor in a running
system) creates and unlinks a segment; everyone else attaches.

Layout (all integers little-endian int64, every region 64-byte aligned, slots page aligned)::

    offset 0                                   RING_HEADER_BYTES (4096)
    ┌──────────────────────────────────────────┬──────────┬──────────┬───┬──────────┐
    │ ring header                              │ slot 0   │ slot 1   │ … │ slot N-1 │
    └──────────────────────────────────────────┴──────────┴──────────┴───┴──────────┘

    ring header words
      0 magic  1 version  2 n_slots  3 slot_stride  4 payload_capacity
      8  latest_slot      (producer) index of the newest published slot, -1 before any
      9  published        (producer) frames published; the seq of the newest frame
      16 held_slot        (consumer) slot the consumer is using, -1 when none
      17 consumed         (consumer) frames handed out and released intact
      18 last_seq         (consumer) seq of the last frame handed out
      19 skipped          (consumer) frames never handed out because a newer one existed
      20 torn             (consumer) frames handed out but overwritten before release

    slot (slot_stride bytes, a multiple of 4096)
    ┌─────────────────────────────── slot header (512 B) ──────────────────────────────┐
    │ seq │ frame_number │ pts │ width │ height │ format │ nbytes │ … │ stamps[STAGES] │
    ├───────────────────────────────────────────────────────────────────────────────────┤
    │ payload: H×W×3 uint8 (RGB24), payload_capacity bytes                               │
    └───────────────────────────────────────────────────────────────────────────────────┘

One producer and one consumer per ring. **Latest frame wins**: the producer never waits; it
writes the oldest slot that the consumer is not holding. The consumer always takes the newest
published frame; frames it never took are counted as ``skipped``.

Torn-read protection is a seqlock backed by a held-slot credit:

* The producer writes ``seq = 0`` (slot invalid) → fence → header fields and payload → fence →
  ``seq = published + 1`` → fence → ``latest_slot``. It skips the slot in ``held_slot``.
* The consumer reads ``latest_slot`` → writes ``held_slot`` → fence → reads the slot's ``seq``;
  if it changed or is 0 it retries. It then works on the payload *in place* (zero copy) and on
  :meth:`RingConsumer.release` re-reads ``seq``: a changed value means the frame was torn, and
  the caller must discard what it computed (counted in ``torn``).

Because the producer skips the held slot, a torn read needs the producer to lap the ring in the
microseconds between the consumer's ``held_slot`` store and its ``seq`` check; the release-time
check still catches that case. The fences are a ``threading.Lock`` acquire/release pair, which
issues a full memory barrier on every CPU architecture CPython supports (x86 keeps stores in
order; ARM does not, which is the bug vLLM's shm ring hit before it added a fence).

Drops are exact: ``published == consumed + skipped + torn + pending`` where ``pending`` is 1 if
a frame newer than ``last_seq`` waits and 0 otherwise. The counters live in the segment, so the
supervisor can read any ring's occupancy without asking either side.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import mmap
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "dreamwire"
MAGIC = 0x6472_6561_6D77_6972  # "dreamwir"
VERSION = 1
RING_HEADER_BYTES = 4096
SLOT_HEADER_BYTES = 512
PAGE_BYTES = 4096

_H_MAGIC, _H_VERSION, _H_NSLOTS, _H_STRIDE, _H_CAPACITY = 0, 1, 2, 3, 4
_H_LATEST_SLOT, _H_PUBLISHED = 8, 9
_H_HELD, _H_CONSUMED, _H_LAST_SEQ, _H_SKIPPED, _H_TORN = 16, 17, 18, 19, 20

_S_SEQ, _S_FRAME, _S_PTS, _S_WIDTH, _S_HEIGHT, _S_FORMAT, _S_NBYTES = 0, 1, 2, 3, 4, 5, 6
_S_STAMPS = 16


class Stage(enum.IntEnum):
    """Per-frame timestamps (``time.monotonic_ns()``, one clock for all processes)."""

    RTP_ARRIVAL = 0
    FRAME_COMPLETE = 1
    DECODE_START = 2
    DECODE_END = 3
    INFERENCE_START = 4
    MODEL_START = 5
    MODEL_END = 6
    INFERENCE_END = 7
    OVERLAY_START = 8
    OVERLAY_END = 9
    ENCODE_START = 10
    ENCODE_END = 11
    RTP_DEPARTURE = 12
    GENERATION_START = 13
    SOURCE = 14
    #: A media node's link took the frame off the network (the front's clock).
    NODE_IN = 15
    #: The front's link took the node's packet off the network.
    NODE_OUT = 16
    #: A block model's frame left the inference stage's pacer (held to even out the output).
    PACED = 17


N_STAMPS = 32
assert _S_STAMPS + N_STAMPS <= SLOT_HEADER_BYTES // 8


class PixelFormat(enum.IntEnum):
    RGB24 = 1


class RingError(RuntimeError):
    """A ring segment is missing, malformed or too small for a frame."""


_fence_lock = threading.Lock()


def memory_fence() -> None:
    """Full memory barrier: lock acquire/release orders loads and stores around it."""
    _fence_lock.acquire()
    _fence_lock.release()


_SEGMENT_RE = re.compile(rf"^{SEGMENT_PREFIX}\.([0-9a-z]+)\.")


def segment_name(run_id: str, ring: str) -> str:
    """``dreamwire.<run_id>.<ring>``; ring names may contain ``/`` (mapped to ``~``)."""
    if not re.fullmatch(r"[0-9a-z]+", run_id):
        raise ValueError(f"run id must be lowercase alphanumeric, got {run_id!r}")
    return f"{SEGMENT_PREFIX}.{run_id}.{ring.replace('/', '~')}"


def segments_of_run(run_id: str) -> list[Path]:
    return sorted(SHM_DIR.glob(f"{SEGMENT_PREFIX}.{run_id}.*"))


def run_ids_in_shm() -> set[str]:
    """Run ids that own at least one segment in /dev/shm."""
    found = set()
    for path in SHM_DIR.glob(f"{SEGMENT_PREFIX}.*"):
        if m := _SEGMENT_RE.match(path.name):
            found.add(m.group(1))
    return found


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def create_segment(path: Path, size: int, what: str) -> mmap.mmap:
    """A new shared-memory file of ``size`` bytes for ``what``, mapped (fails if it exists)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        # Allocated now, not on first touch: a full /dev/shm is this clear error here, not
        # a SIGBUS in whichever process writes the slot first.
        os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, size)
    except OSError as exc:
        path.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise RingError(f"no room in {SHM_DIR} for {what}: size {size} bytes") from exc
        raise RingError(f"cannot create {path} ({size} bytes): {exc}") from exc
    finally:
        os.close(fd)


def ring_bytes(n_slots: int, payload_capacity: int) -> int:
    return RING_HEADER_BYTES + n_slots * round_up(SLOT_HEADER_BYTES + payload_capacity, PAGE_BYTES)


@dataclass(slots=True)
class RingStats:
    published: int
    consumed: int
    skipped: int
    torn: int
    pending: int

    @property
    def dropped(self) -> int:
        return self.skipped + self.torn


class FrameRing:
    """One mapped ring segment. Use :meth:`create` (owner) or :meth:`attach`."""

    def __init__(self, path: Path, mm: mmap.mmap, owner: bool) -> None:
        self.path = path
        self.name = path.name
        self.owner = owner
        self._mm = mm
        self._buf = np.frombuffer(mm, dtype=np.uint8)
        self.header = self._buf[:RING_HEADER_BYTES].view(np.int64)
        if self.header[_H_MAGIC] != MAGIC or self.header[_H_VERSION] != VERSION:
            raise RingError(f"{path} is not a dreamwire ring (version {VERSION})")
        self.n_slots = int(self.header[_H_NSLOTS])
        self.slot_stride = int(self.header[_H_STRIDE])
        self.payload_capacity = int(self.header[_H_CAPACITY])
        self._slot_headers = []
        self._payloads = []
        for i in range(self.n_slots):
            start = RING_HEADER_BYTES + i * self.slot_stride
            hdr = self._buf[start : start + SLOT_HEADER_BYTES].view(np.int64)
            payload = self._buf[
                start + SLOT_HEADER_BYTES : start + SLOT_HEADER_BYTES + self.payload_capacity
            ]
            self._slot_headers.append(hdr)
            self._payloads.append(payload)
        self._closed = False

    @classmethod
    def create(cls, run_id: str, ring: str, n_slots: int, payload_capacity: int) -> FrameRing:
        """Create the segment (fails if it exists); the caller owns it and must unlink it."""
        if n_slots < 2:
            raise ValueError("a ring needs at least 2 slots")
        path = SHM_DIR / segment_name(run_id, ring)
        stride = round_up(SLOT_HEADER_BYTES + payload_capacity, PAGE_BYTES)
        mm = create_segment(path, RING_HEADER_BYTES + n_slots * stride, f"ring {ring}")
        header = np.frombuffer(mm, dtype=np.int64, count=RING_HEADER_BYTES // 8)
        header[:] = 0
        header[_H_NSLOTS] = n_slots
        header[_H_STRIDE] = stride
        header[_H_CAPACITY] = payload_capacity
        header[_H_LATEST_SLOT] = -1
        header[_H_HELD] = -1
        header[_H_VERSION] = VERSION
        header[_H_MAGIC] = MAGIC
        del header
        return cls(path, mm, owner=True)

    @classmethod
    def attach(cls, name: str) -> FrameRing:
        """Map an existing segment by its full name; closing never unlinks it."""
        path = SHM_DIR / name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise RingError(f"ring segment {name} does not exist") from None
        try:
            size = os.fstat(fd).st_size
            if size < RING_HEADER_BYTES:
                raise RingError(f"{path} is too small to be a ring ({size} bytes)")
            mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(path, mm, owner=False)

    def stats(self) -> RingStats:
        h = self.header
        published, last_seq = int(h[_H_PUBLISHED]), int(h[_H_LAST_SEQ])
        return RingStats(
            published=published,
            consumed=int(h[_H_CONSUMED]),
            skipped=int(h[_H_SKIPPED]),
            torn=int(h[_H_TORN]),
            pending=1 if published > last_seq else 0,
        )

    def close(self) -> None:
        """Unmap. Idempotent. Views handed out before must no longer be used."""
        if self._closed:
            return
        self._closed = True
        self._slot_headers.clear()
        self._payloads.clear()
        self.header = np.empty(0, dtype=np.int64)
        self._buf = np.empty(0, dtype=np.uint8)
        # A caller may still hold a view; the mapping then goes when the last view is freed.
        with contextlib.suppress(BufferError):
            self._mm.close()

    def unlink(self) -> None:
        """Remove the segment (owner only). Attached processes keep their mapping."""
        if not self.owner:
            raise RingError(f"only the owner may unlink {self.name}")
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> FrameRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class FrameMeta:
    frame_number: int = 0
    pts: int = 0
    stamps: np.ndarray | None = None  # int64[N_STAMPS], 0 = stage not passed


class WriteSlot:
    """A slot being filled by the producer; ``array`` is the payload as H×W×3 uint8."""

    __slots__ = ("array", "height", "index", "width")

    def __init__(self, index: int, array: np.ndarray, width: int, height: int) -> None:
        self.index = index
        self.array = array
        self.width = width
        self.height = height


class RingProducer:
    """The single writer of a ring."""

    def __init__(self, ring: FrameRing) -> None:
        self.ring = ring
        self._next = 0
        self._open: WriteSlot | None = None

    def begin(self, width: int, height: int) -> WriteSlot:
        """Claim the oldest slot the consumer is not holding and return its payload view."""
        ring = self.ring
        nbytes = width * height * 3
        if nbytes > ring.payload_capacity:
            raise RingError(
                f"{width}x{height} RGB frame ({nbytes} B) exceeds {ring.name}'s slot "
                f"capacity ({ring.payload_capacity} B)"
            )
        held = int(ring.header[_H_HELD])
        index = self._next
        if index == held:
            index = (index + 1) % ring.n_slots
        self._next = (index + 1) % ring.n_slots
        hdr = ring._slot_headers[index]
        hdr[_S_SEQ] = 0
        memory_fence()
        array = ring._payloads[index][:nbytes].reshape(height, width, 3)
        self._open = WriteSlot(index, array, width, height)
        return self._open

    def publish(self, slot: WriteSlot, meta: FrameMeta) -> int:
        """Make the slot visible to the consumer; returns the frame's sequence number."""
        ring = self.ring
        hdr = ring._slot_headers[slot.index]
        hdr[_S_FRAME] = meta.frame_number
        hdr[_S_PTS] = meta.pts
        hdr[_S_WIDTH] = slot.width
        hdr[_S_HEIGHT] = slot.height
        hdr[_S_FORMAT] = PixelFormat.RGB24
        hdr[_S_NBYTES] = slot.width * slot.height * 3
        stamps = hdr[_S_STAMPS : _S_STAMPS + N_STAMPS]
        if meta.stamps is None:
            stamps[:] = 0
        else:
            stamps[:] = meta.stamps
        seq = int(ring.header[_H_PUBLISHED]) + 1
        memory_fence()
        hdr[_S_SEQ] = seq
        memory_fence()
        ring.header[_H_LATEST_SLOT] = slot.index
        ring.header[_H_PUBLISHED] = seq
        self._open = None
        return seq

    def write(self, rgb: np.ndarray, meta: FrameMeta) -> int:
        """Copy an H×W×3 uint8 frame into the ring and publish it (one copy)."""
        height, width = rgb.shape[:2]
        slot = self.begin(width, height)
        np.copyto(slot.array, rgb, casting="no")
        return self.publish(slot, meta)


class ReadFrame:
    """A frame handed to the consumer: zero-copy views valid until :meth:`RingConsumer.release`."""

    __slots__ = ("array", "frame_number", "index", "intact", "pts", "seq", "stamps")

    def __init__(
        self,
        index: int,
        seq: int,
        array: np.ndarray,
        frame_number: int,
        pts: int,
        stamps: np.ndarray,
    ) -> None:
        self.index = index
        self.seq = seq
        self.array = array
        self.frame_number = frame_number
        self.pts = pts
        self.stamps = stamps
        #: Set when released: whether the slot was left alone while held (None: still held).
        self.intact: bool | None = None


class RingConsumer:
    """The single reader of a ring."""

    def __init__(self, ring: FrameRing) -> None:
        self.ring = ring
        self._held: ReadFrame | None = None

    def has_new(self) -> bool:
        h = self.ring.header
        return int(h[_H_PUBLISHED]) > int(h[_H_LAST_SEQ])

    def acquire_latest(self) -> ReadFrame | None:
        """Hold the newest published frame not yet handed out, or None.

        Frames published between the previous one handed out and this one are skipped (and
        counted). Only one frame is held at a time: a held frame is released first.
        """
        if self._held is not None:
            self.release(self._held)
        ring = self.ring
        h = ring.header
        for _ in range(ring.n_slots * 4):
            index = int(h[_H_LATEST_SLOT])
            if index < 0:
                return None
            h[_H_HELD] = index
            memory_fence()
            hdr = ring._slot_headers[index]
            seq = int(hdr[_S_SEQ])
            last = int(h[_H_LAST_SEQ])
            if seq == 0:
                continue  # being rewritten: the producer lapped us; take the new latest
            if seq <= last:
                h[_H_HELD] = -1
                return None
            frame_number = int(hdr[_S_FRAME])
            pts = int(hdr[_S_PTS])
            width, height = int(hdr[_S_WIDTH]), int(hdr[_S_HEIGHT])
            stamps = hdr[_S_STAMPS : _S_STAMPS + N_STAMPS].copy()
            memory_fence()
            if int(hdr[_S_SEQ]) != seq:
                continue
            h[_H_SKIPPED] += seq - last - 1
            h[_H_LAST_SEQ] = seq
            array = ring._payloads[index][: width * height * 3].reshape(height, width, 3)
            self._held = ReadFrame(index, seq, array, frame_number, pts, stamps)
            return self._held
        h[_H_HELD] = -1
        return None

    def release(self, frame: ReadFrame) -> bool:
        """Give the slot back; False when the frame was overwritten while held (torn).

        A False answer means whatever was computed from ``frame.array`` must be discarded.
        """
        ring = self.ring
        memory_fence()
        intact = int(ring._slot_headers[frame.index][_S_SEQ]) == frame.seq
        h = ring.header
        if intact:
            h[_H_CONSUMED] += 1
        else:
            h[_H_TORN] += 1
        h[_H_HELD] = -1
        if self._held is frame:
            self._held = None
        frame.intact = intact
        return intact

    @contextlib.contextmanager
    def latest(self) -> Iterator[ReadFrame | None]:
        """``with consumer.latest() as frame``: the newest frame not yet handed out (None:
        nothing new), released when the block ends unless released in it; afterwards
        ``frame.intact`` says whether what was computed from it may leave."""
        frame = self.acquire_latest()
        try:
            yield frame
        finally:
            if frame is not None and frame.intact is None:
                self.release(frame)

    def frames(self) -> Iterator[ReadFrame]:
        """Yield frames until none is new (each released when the next is taken)."""
        while (frame := self.acquire_latest()) is not None:
            yield frame
        if self._held is not None:
            self.release(self._held)


def stamp(stamps: np.ndarray, stage: Stage) -> None:
    stamps[stage] = time.monotonic_ns()
