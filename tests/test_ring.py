"""Shared-memory frame rings: layout, latest-frame-wins, exact drops, torn-read safety."""

from __future__ import annotations

import multiprocessing as mp
import secrets
from collections.abc import Iterator

import numpy as np
import pytest
import ring_peers

from shm.ring import (
    N_STAMPS,
    FrameMeta,
    FrameRing,
    RingConsumer,
    RingError,
    RingProducer,
    Stage,
    segments_of_run,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def run_id() -> Iterator[str]:
    rid = "t" + secrets.token_hex(4)
    yield rid
    for seg in segments_of_run(rid):
        seg.unlink()


def frame(value: int, h: int = 8, w: int = 8) -> np.ndarray:
    return np.full((h, w, 3), value, dtype=np.uint8)


def test_zero_copy_round_trip_with_metadata(run_id: str) -> None:
    ring = FrameRing.create(run_id, "a", 4, 64 * 64 * 3)
    reader = FrameRing.attach(ring.name)
    producer, consumer = RingProducer(ring), RingConsumer(reader)
    stamps = np.zeros(N_STAMPS, dtype=np.int64)
    stamps[Stage.DECODE_END] = 42
    slot = producer.begin(64, 32)
    slot.array[:] = 7
    seq = producer.publish(slot, FrameMeta(frame_number=11, pts=99, stamps=stamps))
    got = consumer.acquire_latest()
    assert got is not None
    assert (got.seq, got.frame_number, got.pts) == (seq, 11, 99)
    assert got.array.shape == (32, 64, 3) and np.all(got.array == 7)
    assert got.stamps[Stage.DECODE_END] == 42
    # Zero copy: the consumer's array is the mapped segment itself.
    assert not got.array.flags.owndata
    got.array[0, 0, 0] = 200
    assert ring._payloads[slot.index][0] == 200
    assert consumer.release(got)
    assert consumer.acquire_latest() is None
    reader.close()
    ring.unlink()
    ring.close()


def test_latest_frame_wins_and_drops_are_exact(run_id: str) -> None:
    ring = FrameRing.create(run_id, "b", 4, 8 * 8 * 3)
    producer, consumer = RingProducer(ring), RingConsumer(FrameRing.attach(ring.name))
    for n in range(100):
        producer.write(frame(n), FrameMeta(n))
    got = consumer.acquire_latest()
    assert got is not None and got.frame_number == 99 and np.all(got.array == 99)
    assert consumer.release(got)
    stats = ring.stats()
    assert (stats.published, stats.consumed, stats.skipped, stats.torn, stats.pending) == (
        100,
        1,
        99,
        0,
        0,
    )
    ring.unlink()


def test_held_frame_is_never_overwritten(run_id: str) -> None:
    ring = FrameRing.create(run_id, "c", 3, 8 * 8 * 3)
    producer, consumer = RingProducer(ring), RingConsumer(FrameRing.attach(ring.name))
    producer.write(frame(1), FrameMeta(1))
    held = consumer.acquire_latest()
    assert held is not None
    for n in range(2, 50):  # laps the ring many times while the consumer works
        producer.write(frame(n), FrameMeta(n))
    assert np.all(held.array == 1)
    assert consumer.release(held)
    newest = consumer.acquire_latest()
    assert newest is not None and newest.frame_number == 49
    assert consumer.release(newest)
    stats = ring.stats()
    assert stats.consumed == 2 and stats.skipped == 47 and stats.torn == 0
    assert stats.published == stats.consumed + stats.skipped + stats.torn + stats.pending
    ring.unlink()


def test_torn_frame_is_reported(run_id: str) -> None:
    ring = FrameRing.create(run_id, "d", 2, 8 * 8 * 3)
    producer, consumer = RingProducer(ring), RingConsumer(FrameRing.attach(ring.name))
    producer.write(frame(1), FrameMeta(1))
    held = consumer.acquire_latest()
    assert held is not None
    # A producer that ignores the credit (a crash-restarted one with stale state, say):
    ring.header[16] = -1
    producer._next = held.index
    producer.write(frame(2), FrameMeta(2))
    assert not consumer.release(held)
    assert ring.stats().torn == 1
    ring.unlink()


def test_a_frame_read_in_a_with_block_is_released_and_says_if_it_stayed_intact(
    run_id: str,
) -> None:
    ring = FrameRing.create(run_id, "e", 2, 8 * 8 * 3)
    producer, consumer = RingProducer(ring), RingConsumer(FrameRing.attach(ring.name))
    with consumer.latest() as nothing:
        assert nothing is None
    producer.write(frame(1), FrameMeta(1))
    with consumer.latest() as held:
        assert held is not None and held.intact is None and held.array[0, 0, 0] == 1
    assert held.intact is True and ring.stats().consumed == 1
    producer.write(frame(2), FrameMeta(2))
    with consumer.latest() as torn:
        assert torn is not None
        ring.header[16] = -1  # a producer that ignores the credit overwrites the held slot
        producer._next = torn.index
        producer.write(frame(3), FrameMeta(3))
    assert torn.intact is False and ring.stats().torn == 1
    # Released when the block fails too: the next frame can be taken.
    with pytest.raises(RuntimeError), consumer.latest() as failed:
        assert failed is not None
        raise RuntimeError("step failed")
    assert failed.intact is True
    ring.unlink()


def test_bad_sizes_and_names_are_clear_errors(run_id: str) -> None:
    ring = FrameRing.create(run_id, "e", 2, 10)
    with pytest.raises(RingError, match="exceeds"):
        RingProducer(ring).begin(8, 8)
    with pytest.raises(RingError, match="does not exist"):
        FrameRing.attach(f"dreamwire.{run_id}.missing")
    with pytest.raises(RingError, match="only the owner"):
        FrameRing.attach(ring.name).unlink()
    with pytest.raises(FileExistsError):
        FrameRing.create(run_id, "e", 2, 10)
    ring.unlink()


def test_attached_process_exit_does_not_unlink(run_id: str) -> None:
    ring = FrameRing.create(run_id, "f", 2, 64)
    proc = mp.get_context("spawn").Process(target=ring_peers.attach_and_exit, args=(ring.name,))
    proc.start()
    proc.join(30)
    assert proc.exitcode == 0
    assert ring.path.exists()
    ring.unlink()
    assert not ring.path.exists()


def test_two_processes_hammer_10000_frames(run_id: str) -> None:
    count, side = 10_000, 64
    ring = FrameRing.create(run_id, "hammer", 4, side * side * 3)
    ctx = mp.get_context("spawn")
    done, results = ctx.Event(), ctx.Queue()
    consumer = ctx.Process(target=ring_peers.consume_checking, args=(ring.name, done, results))
    producer = ctx.Process(target=ring_peers.produce_random, args=(ring.name, count, side, done))
    consumer.start()
    producer.start()
    result = results.get(timeout=50)
    producer.join(10)
    consumer.join(10)
    stats = ring.stats()
    assert result["corrupt"] == 0, result
    assert result["ordered"]
    assert stats.published == count
    assert stats.consumed == result["intact"] and stats.torn == result["torn"]
    assert stats.skipped == result["gaps"]
    assert stats.published == stats.consumed + stats.skipped + stats.torn + stats.pending
    assert result["intact"] > 0
    ring.unlink()


def test_a_full_dev_shm_is_a_clear_error_at_creation() -> None:
    """In a mount namespace of its own with a 1 MiB tmpfs on /dev/shm (root only)."""
    import subprocess
    import sys

    script = (
        "from shm.ring import FrameRing, RingError\n"
        "try:\n"
        "    FrameRing.create('full', 'r', 4, 1 << 20)\n"
        "except RingError as exc:\n"
        "    print(exc)\n"
    )
    try:
        out = subprocess.run(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f'mount -t tmpfs -o size=1m tmpfs /dev/shm && exec "{sys.executable}" -c "$0"',
                script,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "mount" in out.stderr):
        pytest.skip(f"no mount namespace here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("no room in /dev/shm for ring r: size "), out.stdout
