"""Load test of the Dreams broadcast: N WebSocket viewers on loopback for S seconds.

Starts the hub alone (``python -m signalling.dreams``) with a local worker generating
realistic frames (1024x512 WebP of about 50 KB, ``--texture 10``), connects the viewers from
this process, and reports whether every viewer got every frame at the target rate, the
arrival jitter, and the CPU of the hub (and, apart, of its worker and of this client)::

    python scripts/bench_dreams.py --viewers 200 --seconds 30
    python scripts/bench_dreams.py --viewers 50 --seconds 5 --json   # what the test runs

Bounded: at most ``MAX_VIEWERS`` viewers and ``MAX_SECONDS`` seconds; the hub and its worker
are stopped on the way out whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import av
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.testpattern import read_frame_number  # noqa: E402

MAX_VIEWERS = 500
MAX_SECONDS = 120.0
CONNECT_CONCURRENCY = 50
START_TIMEOUT_S = 60.0


@dataclass
class Viewer:
    arrivals: list[tuple[float, bytes]] = field(default_factory=list)
    recording: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def frame_number(webp: bytes) -> int | None:
    codec = av.CodecContext.create("webp", "r")
    frames = codec.decode(av.Packet(webp))
    return read_frame_number(frames[0].to_ndarray(format="rgb24"))


async def watch(
    http: aiohttp.ClientSession, url: str, viewer: Viewer, connected: asyncio.Event
) -> None:
    async with http.ws_connect(url, max_msg_size=0) as ws:
        connected.set()
        async for message in ws:
            if message.type == aiohttp.WSMsgType.BINARY and viewer.recording:
                viewer.arrivals.append((time.monotonic(), message.data[1:]))


async def wait_healthy(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"hub exited with {proc.returncode}")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/api/dreams/health") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError("hub did not answer /api/dreams/health")


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def run(args: argparse.Namespace) -> dict[str, object]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    config = {
        "target_fps": args.fps,
        "width": args.width,
        "height": args.height,
        "buffer_seconds": 1.0,
        "auth_token": "",
        "max_connections_per_ip": args.viewers + 10,
        "max_viewers": args.viewers + 10,
        "launcher": {
            "worker_args": ["--texture", str(args.texture), "--webp-method", str(args.webp_method)]
        },
    }
    hub_cmd = [sys.executable, "-m", "signalling.dreams", "--port", str(port)]
    hub_cmd += ["--config", json.dumps(config), "--log-level", "WARNING"]
    proc = subprocess.Popen(hub_cmd, cwd=ROOT)  # noqa: ASYNC220 - returns at once
    try:
        # No connection limit: every WebSocket holds one (the default caps them at 100).
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            await wait_healthy(http, base, proc)
            url = f"{base.replace('http', 'ws', 1)}/ws/dreams"
            viewers = [Viewer() for _ in range(args.viewers)]
            tasks: list[asyncio.Task[None]] = []
            # The first viewer wakes the generator; the rest join once frames flow.
            gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

            async def join(viewer: Viewer) -> None:
                connected = asyncio.Event()
                async with gate:
                    task = asyncio.create_task(watch(http, url, viewer, connected))
                    tasks.append(task)
                    await asyncio.wait(
                        [task, asyncio.create_task(connected.wait())],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if task.done():
                        task.result()

            await join(viewers[0])
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                async with http.get(f"{base}/api/dreams/health") as resp:
                    if (await resp.json()).get("frames_cached"):
                        break
                await asyncio.sleep(0.2)
            else:
                raise RuntimeError("no frame from the worker")
            await asyncio.gather(*(join(v) for v in viewers[1:]))

            hub = psutil.Process(proc.pid)
            me = psutil.Process()
            workers = hub.children(recursive=True)
            for v in viewers:
                v.recording = True
            wall0, hub0, me0 = time.monotonic(), cpu_seconds(hub), cpu_seconds(me)
            worker0 = sum(cpu_seconds(w) for w in workers)
            await asyncio.sleep(args.seconds)
            wall = time.monotonic() - wall0
            hub_cpu = cpu_seconds(hub) - hub0
            me_cpu = cpu_seconds(me) - me0
            worker_cpu = sum(cpu_seconds(w) for w in workers) - worker0
            for v in viewers:
                v.recording = False
            async with http.get(f"{base}/api/dreams/status") as resp:
                status = await resp.json()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return analyse(args, viewers, wall, hub_cpu, worker_cpu, me_cpu, status)


def analyse(
    args: argparse.Namespace,
    viewers: list[Viewer],
    wall: float,
    hub_cpu: float,
    worker_cpu: float,
    client_cpu: float,
    status: dict[str, object],
) -> dict[str, object]:
    numbers: dict[bytes, int | None] = {}
    sequences: list[list[int]] = []
    for v in viewers:
        seq = []
        for _, data in v.arrivals:
            if data not in numbers:
                numbers[data] = frame_number(data)
            n = numbers[data]
            if n is not None:
                seq.append(n)
        sequences.append(seq)
    # Frames every viewer should have: those released while all were recording (the edges of
    # the window are skewed by when each viewer's recording flag flipped, so trim one frame).
    starts = [s[0] for s in sequences if s]
    ends = [s[-1] for s in sequences if s]
    expected = set(range(max(starts) + 1, min(ends))) if starts and ends else set()
    missing = sum(len(expected - set(s)) for s in sequences)
    out_of_order = sum(1 for s in sequences if s != sorted(set(s)))
    rates: list[float] = []
    gaps: list[float] = []
    for v in viewers:
        times = [t for t, _ in v.arrivals]
        if len(times) >= 2:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
            gaps.extend(b - a for a, b in itertools.pairwise(times))
    gaps.sort()
    sizes = [len(d) for d in numbers]
    n = len(viewers)
    frames_each = [len(s) for s in sequences]
    mean_size = statistics.mean(sizes) if sizes else 0
    return {
        "viewers": n,
        "seconds": round(wall, 2),
        "target_fps": args.fps,
        "frames_expected_per_viewer": len(expected),
        "frames_received_min": min(frames_each, default=0),
        "frames_received_max": max(frames_each, default=0),
        "viewers_missing_frames": sum(1 for s in sequences if expected - set(s)),
        "frames_missing_total": missing,
        "viewers_out_of_order": out_of_order,
        "fps_min": round(min(rates, default=0.0), 2),
        "fps_mean": round(statistics.mean(rates), 2) if rates else 0.0,
        "fps_max": round(max(rates, default=0.0), 2),
        "gap_ms_p50": round(1000 * gaps[len(gaps) // 2], 1) if gaps else None,
        "gap_ms_p99": round(1000 * gaps[int(len(gaps) * 0.99)], 1) if gaps else None,
        "gap_ms_max": round(1000 * gaps[-1], 1) if gaps else None,
        "frame_kb_mean": round(mean_size / 1024, 1),
        "egress_mbit_s": round(8 * mean_size * args.fps * n / 1e6, 1),
        "hub_cpu_percent": round(100 * hub_cpu / wall, 1),
        "worker_cpu_percent": round(100 * worker_cpu / wall, 1),
        "client_cpu_percent": round(100 * client_cpu / wall, 1),
        "hub_playback": status.get("playback"),
        "hub_generation": status.get("generation"),
        "cpus": os.cpu_count(),
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--viewers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--texture", type=int, default=10, help="frame noise (10: ~50 KB)")
    parser.add_argument("--webp-method", type=int, default=2, help="worker's WebP speed, 0-6")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    args.viewers = max(1, min(MAX_VIEWERS, args.viewers))
    args.seconds = max(1.0, min(MAX_SECONDS, args.seconds))
    signal.signal(signal.SIGTERM, _interrupt)  # so the hub is stopped on the way out
    result = asyncio.run(run(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    ok = result["frames_missing_total"] == 0 and result["viewers_out_of_order"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
