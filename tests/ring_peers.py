"""Producer/consumer bodies run in separate processes by test_ring.py."""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from shm.ring import FrameMeta, FrameRing, RingConsumer, RingProducer


def produce_random(name: str, count: int, side: int, done: Any) -> None:
    ring = FrameRing.attach(name)
    producer = RingProducer(ring)
    rng = np.random.default_rng(1234)
    for number in range(count):
        slot = producer.begin(side, side)
        slot.array[...] = rng.integers(0, 256, size=slot.array.shape, dtype=np.uint8)
        producer.publish(slot, FrameMeta(number, zlib.crc32(slot.array.data)))
    done.set()
    ring.close()


def consume_checking(name: str, done: Any, results: Any) -> None:
    ring = FrameRing.attach(name)
    consumer = RingConsumer(ring)
    intact = corrupt = torn = gaps = 0
    last_seq = 0
    numbers: list[int] = []
    while True:
        finished = done.is_set()
        frame = consumer.acquire_latest()
        if frame is None:
            if finished and not consumer.has_new():
                break
            continue
        gaps += frame.seq - last_seq - 1
        last_seq = frame.seq
        ok = zlib.crc32(frame.array.data) == frame.pts
        number = frame.frame_number
        if consumer.release(frame):
            intact += 1
            numbers.append(number)
            if not ok:
                corrupt += 1
        else:
            torn += 1
    results.put(
        {
            "intact": intact,
            "corrupt": corrupt,
            "torn": torn,
            "gaps": gaps,
            "ordered": numbers == sorted(numbers),
        }
    )
    ring.close()


def attach_and_exit(name: str) -> None:
    ring = FrameRing.attach(name)
    ring.header.sum()
    # Exit without closing: the segment must survive an attached process's exit.
