#!/usr/bin/env python3
"""Move RGB frames between two processes several ways and compare, in one run.

Like for like: in every row the sender hands over a finished frame and the receiver reads
every byte of it (an Adler-32 of the whole frame, checked against the sender's):

1. ``ring``: dreamwire's shared-memory ring + a ZeroMQ ``FrameReady`` notification, the
   sender copying the finished frame into the slot;
2. ``mp_queue``: ``multiprocessing.Queue`` (the frame is pickled);
3. ``zmq_copy``: the frame as a ZeroMQ message payload;
4. ``ring_in_place``: what a producing stage sees: the frame is made in the slot (decode's
   scaler and the model's output write there), so the hop starts when it is complete there;
5. ``floor``: no hop: one process reads and checksums the frame, the cost every receiver above
   pays (the rest of each row is what the transport adds).

Each hop is timed from just before the sender hands the frame over (copy into the ring,
``put``, ``send``) to the moment the receiver has read it all. The sender waits for the
receiver's ack before the next frame (lockstep), so latency is the hop itself, not queueing;
frames/s is the lockstep rate.

The ways take turns, ``--rounds`` rounds of ``--frames`` frames each per size (a drift of the
machine then falls on all alike); each figure is the median over rounds, with its min-max
spread: two rows whose spreads overlap are not different.

    python scripts/bench_transport.py [--frames 400] [--rounds 5]
                                      [--sizes 512x512,1280x720,1920x1080] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import secrets
import statistics
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
METHODS = ("floor", "ring", "ring_in_place", "zmq_copy", "mp_queue")
LABELS = {
    "floor": "floor: one process reads and checksums the frame",
    "ring": "ring + ZeroMQ notification, sender copying the frame into the slot",
    "ring_in_place": "ring, frame made in the slot (what a producing stage sees)",
    "zmq_copy": "ZeroMQ message payload",
    "mp_queue": "`multiprocessing.Queue` (pickled)",
}


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


def floor(frames: int, width: int, height: int) -> dict[str, float]:
    """Reading and checksumming the frame in the process that has it: no transport."""
    src = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    latencies = []
    start = 0.0
    for n in range(frames + WARMUP_FRAMES):
        if n == WARMUP_FRAMES:
            start = time.perf_counter()
        src[0, 0, 0] = n % 256
        t0 = time.monotonic_ns()
        zlib.adler32(src.data)
        latencies.append(time.monotonic_ns() - t0)
    elapsed = time.perf_counter() - start
    return _figures(np.array(latencies[WARMUP_FRAMES:], dtype=np.float64), frames, elapsed)


def _figures(latencies: np.ndarray, frames: int, elapsed: float) -> dict[str, float]:
    return {
        "p50_us": float(np.percentile(latencies, 50)) / 1e3,
        "p99_us": float(np.percentile(latencies, 99)) / 1e3,
        "fps": frames / elapsed,
    }


def bench(method: str, frames: int, width: int, height: int, tmp: Path) -> dict[str, float]:
    if method == "floor":
        return floor(frames, width, height)
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
        ring = FrameRing.create("b" + secrets.token_hex(4), "bench", 4, width * height * 3)
    if method == "mp_queue":
        q = mpctx.Queue(maxsize=4)
    proc = mpctx.Process(
        target=_receiver,
        args=(method, endpoint, ack_endpoint, ring.name if ring else "", q),
        name=f"bench-{method}",
    )
    proc.start()
    assert ack.recv() == b"ready"
    src = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
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
            slot = producer.begin(width, height)
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
    return _figures(latencies, frames, elapsed)


def measure(frames: int, rounds: int, width: int, height: int, tmp: Path) -> dict[str, Any]:
    """Every way, ``rounds`` interleaved rounds: median and min-max of each figure."""
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    for _ in range(rounds):
        for method in METHODS:
            runs[method].append(bench(method, frames, width, height, tmp))
    out: dict[str, Any] = {}
    for method, rows in runs.items():
        out[method] = {}
        for key in ("p50_us", "p99_us", "fps"):
            values = [row[key] for row in rows]
            out[method][key] = round(statistics.median(values), 1)
            out[method][f"{key}_spread"] = [round(min(values), 1), round(max(values), 1)]
    return out


def table(results: dict[str, Any], frames: int, rounds: int) -> str:
    lines = [
        f"{frames} frames a round, {rounds} rounds, lockstep; median [min-max] over rounds",
        "",
        "| size | transport | p50 µs | p99 µs | frames/s | p50 over floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for size, rows in results.items():
        base = rows["floor"]["p50_us"]
        for method in METHODS:
            r = rows[method]
            lo, hi = r["p50_us_spread"]
            over = "" if method == "floor" else f"+{r['p50_us'] - base:.0f}"
            lines.append(
                f"| {size} | {LABELS[method]} | {r['p50_us']:.0f} [{lo:.0f}-{hi:.0f}] | "
                f"{r['p99_us']:.0f} | {r['fps']:.0f} | {over} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400, help="frames a round, per way")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="512x512,1280x720,1920x1080")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="dwbench", dir="/tmp") as tmp:
        for size in args.sizes.split(","):
            width, height = (int(v) for v in size.split("x"))
            results[size] = measure(args.frames, args.rounds, width, height, Path(tmp))
    print(json.dumps(results) if args.json else table(results, args.frames, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
