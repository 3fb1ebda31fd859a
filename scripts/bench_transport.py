#!/usr/bin/env python3
"""Move 512×512 RGB frames between two processes several ways and compare, in one run.

Like for like: in every row the sender hands over a finished frame and the receiver reads
every byte of it (an Adler-32 of the whole frame, checked against the sender's):

1. ``ring``: dreamwire's shared-memory ring + a ZeroMQ ``FrameReady`` notification, the
   sender copying the finished frame into the slot;
2. ``mp_queue``: ``multiprocessing.Queue`` (the frame is pickled);
3. ``zmq_copy``: the frame as a ZeroMQ message payload;
4. ``ring_in_place``: what a producing stage sees: the frame is made in the slot (decode's
   scaler and the model's output write there), so the hop starts when it is complete there.

Each hop is timed from just before the sender hands the frame over (copy into the ring,
``put``, ``send``) to the moment the receiver has read it all. The sender waits for the
receiver's ack before the next frame (lockstep), so latency is the hop itself, not queueing;
frames/s is the lockstep rate.

    python scripts/bench_transport.py [--frames 2000] [--size 512] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services import protocol as p
from shm.ring import N_STAMPS, FrameMeta, FrameRing, RingConsumer, RingProducer

WARMUP_FRAMES = 50
RING_METHODS = ("ring", "ring_in_place")


def _receiver(method: str, endpoint: str, ack_endpoint: str, ring_name: str, q: Any) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.connect(ack_endpoint)
    latencies: list[int] = []
    if method in RING_METHODS:
        sock = ctx.socket(zmq.PULL)
        sock.connect(endpoint)
        consumer = RingConsumer(FrameRing.attach(ring_name))
        codec = p.inbox_codec()
    elif method == "zmq_copy":
        sock = ctx.socket(zmq.PULL)
        sock.connect(endpoint)
    ack.send(b"ready")
    while True:
        if method in RING_METHODS:
            msg = codec.decode(sock.recv())
            assert isinstance(msg, p.FrameReady)
            if msg.seq < 0:
                break
            frame = consumer.acquire_latest()
            assert frame is not None
            checksum = zlib.adler32(frame.array.data)
            t1 = time.monotonic_ns()
            t0, expected = int(frame.stamps[0]), int(frame.stamps[1])
            consumer.release(frame)
        elif method == "mp_queue":
            item = q.get()
            if item is None:
                break
            t0, expected, arr = item
            checksum = zlib.adler32(arr.data)
            t1 = time.monotonic_ns()
        else:
            parts = sock.recv_multipart(copy=False)
            if len(parts) == 1:
                break
            t0 = int.from_bytes(parts[0].bytes[:8], "little")
            expected = int.from_bytes(parts[0].bytes[8:], "little")
            checksum = zlib.adler32(parts[1].buffer)
            t1 = time.monotonic_ns()
        assert checksum == expected, f"{method}: frame arrived changed"
        latencies.append(t1 - t0)
        ack.send(b"")
    ack.send(msgspec.msgpack.encode(latencies))
    ack.close(linger=1000)
    if method != "mp_queue":
        sock.close(linger=0)
    ctx.term()


def bench(method: str, frames: int, size: int, tmp: Path) -> dict[str, float]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    endpoint = f"ipc://{tmp}/{method}.data"
    ack_endpoint = f"ipc://{tmp}/{method}.ack"
    ack = ctx.socket(zmq.PULL)
    ack.bind(ack_endpoint)
    sock = None
    ring = None
    q: Any = None
    mpctx = mp.get_context("spawn")
    if method != "mp_queue":
        sock = ctx.socket(zmq.PUSH)
        sock.bind(endpoint)
    if method in RING_METHODS:
        ring = FrameRing.create("b" + secrets.token_hex(4), "bench", 4, size * size * 3)
    if method == "mp_queue":
        q = mpctx.Queue(maxsize=4)
    proc = mpctx.Process(
        target=_receiver,
        args=(method, endpoint, ack_endpoint, ring.name if ring else "", q),
        name=f"bench-{method}",
    )
    proc.start()
    assert ack.recv() == b"ready"
    src = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    producer = RingProducer(ring) if ring else None
    codec = p.inbox_codec()
    stamps = np.zeros(N_STAMPS, dtype=np.int64)
    total = frames + WARMUP_FRAMES
    start = 0.0
    for n in range(total):
        if n == WARMUP_FRAMES:
            start = time.perf_counter()
        src[0, 0, 0] = n % 256
        expected = zlib.adler32(src.data)  # outside the timed hop
        t0 = time.monotonic_ns()
        if method in RING_METHODS:
            assert producer is not None and ring is not None and sock is not None
            slot = producer.begin(size, size)
            if method == "ring_in_place":
                slot.array[...] = src  # made in place: the hop starts once it is complete
                t0 = time.monotonic_ns()
            else:
                np.copyto(slot.array, src)
            stamps[0], stamps[1] = t0, expected
            seq = producer.publish(slot, FrameMeta(n, n, stamps))
            sock.send(codec.encode(p.FrameReady(session_id="s", ring=ring.name, seq=seq)))
        elif method == "mp_queue":
            q.put((t0, expected, src))
        else:
            assert sock is not None
            head = t0.to_bytes(8, "little") + expected.to_bytes(8, "little")
            sock.send_multipart([head, src.data], copy=False)
        ack.recv()
    elapsed = time.perf_counter() - start
    if method in RING_METHODS:
        assert sock is not None and ring is not None
        sock.send(codec.encode(p.FrameReady(session_id="s", ring=ring.name, seq=-1)))
    elif method == "mp_queue":
        q.put(None)
    else:
        assert sock is not None
        sock.send(b"end")
    latencies = np.array(msgspec.msgpack.decode(ack.recv())[WARMUP_FRAMES:], dtype=np.float64)
    proc.join(30)
    if ring is not None:
        ring.unlink()
        ring.close()
    if sock is not None:
        sock.close(linger=0)
    ack.close(linger=0)
    ctx.term()
    return {
        "p50_us": round(float(np.percentile(latencies, 50)) / 1e3, 1),
        "p99_us": round(float(np.percentile(latencies, 99)) / 1e3, 1),
        "fps": round(frames / elapsed, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dwbench", dir="/tmp") as tmp:
        for method in ("ring", "mp_queue", "zmq_copy", "ring_in_place"):
            results[method] = bench(method, args.frames, args.size, Path(tmp))
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.size}x{args.size} RGB, {args.frames} frames each, lockstep, pid {os.getpid()}")
    print(f"{'transport':<14} {'p50 µs':>10} {'p99 µs':>10} {'frames/s':>10}")
    for name, r in results.items():
        print(f"{name:<14} {r['p50_us']:>10.1f} {r['p99_us']:>10.1f} {r['fps']:>10.1f}")
    ring, queue = results["ring"], results["mp_queue"]
    print(f"ring p50 is {queue['p50_us'] / ring['p50_us']:.1f}x lower than multiprocessing.Queue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
