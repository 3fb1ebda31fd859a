"""The lossless shared-memory queue between a split block loop's stages (``shm/queue.py``):
every message arrives, in order, across processes; a full queue holds the producer back; a
dead peer is noticed instead of waited for."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
from collections.abc import Iterator

import numpy as np
import pytest

from shm.queue import BlockQueue, QueueClosed, QueueHandle, pack, unpack

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def run_id() -> str:
    return "t" + secrets.token_hex(4)


@pytest.fixture
def queue(run_id: str) -> Iterator[BlockQueue]:
    q = BlockQueue.create(run_id, "q", 3, 4096)
    yield q
    q.close()


def _echo(jobs: QueueHandle, answers: QueueHandle, count: int) -> None:
    """A peer process: each message back with its array doubled."""
    inbox, outbox = BlockQueue.attach(jobs), BlockQueue.attach(answers)
    for _ in range(count):
        message = inbox.get(timeout=20)
        assert message is not None
        (array,) = unpack(message.payload, json.loads(message.header))
        outbox.put(message.header, [array * 2], timeout=20)


def test_every_message_arrives_in_order_through_another_process(run_id: str) -> None:
    jobs = BlockQueue.create(run_id, "jobs", 2, 64 * 1024)
    answers = BlockQueue.create(run_id, "answers", 2, 64 * 1024)
    ctx = multiprocessing.get_context("spawn")
    count = 12  # six times round the two slots: the producer waits for room
    peer = ctx.Process(target=_echo, args=(jobs.handle, answers.handle, count), daemon=True)
    peer.start()
    try:
        sent = [np.arange(i, i + 1000, dtype=np.float32).reshape(10, 100) for i in range(count)]
        got = []
        for i, array in enumerate(sent):
            jobs.put(json.dumps(pack([array])).encode(), [array], timeout=20, alive=peer.is_alive)
            if i >= 1:  # one answer behind: both queues stay busy
                message = answers.get(timeout=20, alive=peer.is_alive)
                assert message is not None
                got.append(unpack(message.payload, [pack([array])[0]])[0].copy())
        message = answers.get(timeout=20, alive=peer.is_alive)
        assert message is not None
        got.append(unpack(message.payload, pack(sent[-1:]))[0].copy())
        peer.join(20)
        assert peer.exitcode == 0
        for want, have in zip(sent, got, strict=True):
            np.testing.assert_array_equal(have, want * 2)
    finally:
        if peer.is_alive():
            peer.kill()
        jobs.close()
        answers.close()
    assert not os.path.exists(jobs.handle.path)  # the owner's close removes the segment


def test_a_full_queue_holds_the_producer_and_a_read_frees_a_slot(queue: BlockQueue) -> None:
    for i in range(3):
        queue.put(b"%d" % i, [np.full(8, i, np.uint8)])
    with pytest.raises(QueueClosed, match="full"):
        queue.put(b"x", timeout=0.2)
    peer = BlockQueue.attach(queue.handle)
    try:
        first = peer.get(timeout=1)
        assert first is not None and first.header == b"0"
        assert list(np.frombuffer(first.payload, np.uint8)) == [0] * 8
        # The slot is given back by the next get (the payload is a view until then).
        second = peer.get(timeout=1)
        assert second is not None and second.header == b"1"
        queue.put(b"3", timeout=1)
        assert [m.header for m in iter(lambda: peer.get(timeout=0.2), None)] == [b"2", b"3"]
    finally:
        peer.close()


def test_a_dead_peer_is_noticed_not_waited_for(queue: BlockQueue) -> None:
    with pytest.raises(QueueClosed, match="gone"):
        queue.get(timeout=30, alive=lambda: False)
    assert queue.get(timeout=0.05) is None  # a plain timeout is None


def test_a_message_too_big_for_a_slot_is_refused_naming_the_sizes(queue: BlockQueue) -> None:
    with pytest.raises(ValueError, match="5000 bytes does not fit 4096-byte slots"):
        queue.put(b"", [np.zeros(5000, np.uint8)])
    queue.put(b"ok", [np.zeros(4096, np.uint8)])  # nothing was taken by the refusal
    peer = BlockQueue.attach(queue.handle)
    try:
        message = peer.get(timeout=1)
        assert message is not None and message.header == b"ok"
    finally:
        peer.close()
