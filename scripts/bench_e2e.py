#!/usr/bin/env python3
"""End-to-end benchmark: dreamwire against one-process plain-aiortc servers, same clients.

The servers (``--servers``): ``dreamwire`` (``supervisor start`` with passthrough),
``baseline`` (``scripts/baseline_server.py``: aiortc decodes, numpy, aiortc encodes) and
``baseline-marker`` (the same, completing frames on the RTP marker bit as dreamwire does, so
the table separates what the marker bit buys from what the process design costs) and
``fastrtc`` (``scripts/fastrtc_server.py``: FastRTC as its docs write a video app, its input
hook on so its handler runs; ``--fastrtc-python`` names a Python that has FastRTC). For each
server, size in ``--sizes`` (512x512; 1280x720 is a real camera's) and K in ``--sessions``, K
Python clients (``scripts/client.py``) send a test pattern at 30 fps for ``--duration``
seconds after ``--warmup`` seconds. Reported per server, size and K:

* ``fps_per_session``: frames each client received per second in the window (min, mean);
* ``latency_p50_ms`` / ``p95`` / ``p99``: server side, first RTP packet of a frame in → its
  last RTP packet out, measured the same way on both sides (dreamwire: its frame traces;
  the baseline: the same two hooks); ``client_rtt_p50_ms``: the clients' round trip;
* ``cpu_percent``: CPU of each server process over the window (100 = one core);
* dreamwire only: ``stages_mean_ms``, where the milliseconds go (they add up to the mean);
* per side: ``max_sessions_at_full_fps``, the largest K at which every session got ≥ 29 fps;
* ``sent_fps_mean`` (what the clients' pattern tracks sent), ``missing_frames`` (sent in the
  window and not returned in it, all sessions) and ``unreadable_frames`` (frames that arrived
  with a number that could not be read; ``--samples DIR`` saves the first of each run as a
  PNG, to look at);
* ``cpu_per_session``: the server's CPU over K.

``dreamwire-recording`` is dreamwire with every session recording its output from the start
(``initialParameters.recording``): beside ``dreamwire`` in one run, it is what recording costs
(fps, latency, the encode process's CPU); ``recorded_frames`` counts each session's file.

``--plot PATH`` draws fps per session and server CPU per session against K, a line per server
and size (matplotlib).

Both sides encode VP8 to the same budget (aiortc's: start 500 kbps, at most 1.5 Mbps).
The clients run in this process and share the machine with the server (on a 2-core machine
their VP8 encode + decode is a large part of the load, equally for both sides).

    python scripts/bench_e2e.py [--sessions 1,2,3] [--sizes 512x512,1280x720] [--duration 8]
                                [--servers dreamwire,baseline,baseline-marker] [--plot P] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import psutil
from aiortc.codecs.vpx import DEFAULT_BITRATE as AIORTC_START_BPS
from aiortc.codecs.vpx import MAX_BITRATE as AIORTC_MAX_BPS

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from client import DreamwireClient, FastRTCClient, PatternTrack  # noqa: E402

from signalling.metrics_schema import TraceFeed  # noqa: E402
from supervisor.profile import aggregate  # noqa: E402

FULL_FPS = 29.0
FPS = 30
SERVERS = ("dreamwire", "baseline", "baseline-marker", "fastrtc", "dreamwire-recording")


@dataclass(frozen=True)
class Workload:
    """What the clients do, the same for every server: frame size, how long they warm up and
    are measured, and the codec they offer (None: both, VP8 first, as browsers do)."""

    size: tuple[int, int]
    warmup_s: float
    duration_s: float
    codec: str | None = None


START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer in {timeout_s:.0f} s")
            await asyncio.sleep(0.2)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 30 s."""
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2) if values else float("nan")


class CpuMeter:
    """CPU per process over a window, from each process's own CPU times."""

    def __init__(self, processes: dict[str, psutil.Process]) -> None:
        self.processes = processes
        self.start: dict[str, float] = {}
        self.t0 = 0.0

    def begin(self) -> None:
        self.t0 = time.monotonic()
        self.start = {name: _cpu_s(proc) for name, proc in self.processes.items()}

    def end(self) -> dict[str, float]:
        elapsed = time.monotonic() - self.t0
        out = {
            name: round((_cpu_s(proc) - self.start[name]) / elapsed * 100, 1)
            for name, proc in self.processes.items()
        }
        out["total"] = round(sum(out.values()), 1)
        return out


def _cpu_s(proc: psutil.Process) -> float:
    try:
        t = proc.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(t.user + t.system)


async def traced_latency(http: aiohttp.ClientSession, base: str, after: int) -> dict[str, Any]:
    """dreamwire's latency from its frame traces since ``after``: end to end and per stage,
    aggregated as `supervisor profile` does."""
    async with http.get(f"{base}/api/v1/metrics/traces?after={after}") as r:
        feed = msgspec.json.decode(await r.read(), type=TraceFeed)
    report = aggregate(feed.traces)
    e2e = report["end_to_end"]
    return {
        "latency_p50_ms": round(e2e["p50_ms"], 2),
        "latency_p95_ms": round(e2e["p95_ms"], 2),
        "latency_p99_ms": round(e2e["p99_ms"], 2),
        "latency_mean_ms": round(e2e["mean_ms"], 2) if e2e["count"] else None,
        "stages_mean_ms": {row["stage"]: round(row["mean_ms"], 2) for row in report["stages"]},
    }


# ------------------------------------------------------------------ one measurement


async def run_sessions(
    base: str,
    k: int,
    work: Workload,
    begin: Callable[[], Awaitable[None]],
    end: Callable[[], Awaitable[dict[str, Any]]],
    client_class: type[DreamwireClient] = DreamwireClient,
    record: bool = False,
) -> dict[str, Any]:
    clients = [client_class(base, ice_servers=[]) for _ in range(k)]
    session_ids = []
    try:
        for c in clients:
            await c.__aenter__()
        width, height = work.size
        await clients[0].load_pipeline("passthrough", {"width": width, "height": height})
        for c in clients:
            c.pattern = PatternTrack(width, height, FPS)
            initial = {"recording": True} if record else None
            session_ids.append(await c.connect(c.pattern, initial, codec=work.codec))
        for c in clients:
            await c.wait_frames(1, timeout_s=30)
        await asyncio.sleep(work.warmup_s)
        counts = [c.received.frames for c in clients]
        unreadable = [c.received.unreadable for c in clients]
        sent = [c.pattern.count for c in clients if c.pattern is not None]
        rtt_marks = [len(c.received.latencies_ms) for c in clients]
        await begin()
        clients_cpu = CpuMeter({"clients": psutil.Process()})
        clients_cpu.begin()
        t0 = time.monotonic()
        await asyncio.sleep(work.duration_s)
        elapsed = time.monotonic() - t0
        client_cpu_percent = clients_cpu.end()["clients"]
        fps = [(c.received.frames - n) / elapsed for c, n in zip(clients, counts, strict=True)]
        sent_fps = [
            (c.pattern.count - n) / elapsed
            for c, n in zip(clients, sent, strict=True)
            if c.pattern is not None
        ]
        bad = sum(c.received.unreadable - n for c, n in zip(clients, unreadable, strict=True))
        samples = [c.received.unreadable_sample for c in clients]
        sample = next((x for x in samples if x is not None), None)
        rtt = [
            x for c, m in zip(clients, rtt_marks, strict=True) for x in c.received.latencies_ms[m:]
        ]
        server = await end()
        if record:  # what was recorded: every session's file so far, decoded
            server["recorded_frames"] = [
                await recorded_frames(clients[0], sid) for sid in session_ids
            ]
    finally:
        for c in clients:
            await c.close()
    cpu_total = server["cpu_percent"]["total"]
    return {
        "sessions": k,
        "size": "{}x{}".format(*work.size),
        "fps_per_session": [round(f, 2) for f in fps],
        "fps_min": round(min(fps), 2),
        "fps_mean": round(sum(fps) / len(fps), 2),
        # What the clients sent (their pattern tracks), and frames whose number was unreadable.
        "sent_fps_mean": round(sum(sent_fps) / len(sent_fps), 2),
        "missing_frames": max(0, round((sum(sent_fps) - sum(fps)) * elapsed)),
        "unreadable_frames": bad,
        "cpu_per_session": round(cpu_total / k, 1),
        "unreadable_sample": sample,
        "client_rtt_p50_ms": pct(rtt, 50),
        # The clients (this process: K aiortc VP8 encoders + decoders) share the machine.
        "clients_cpu_percent": client_cpu_percent,
        **server,
    }


async def recorded_frames(client: DreamwireClient, session_id: str) -> int:
    import io

    import av

    assert client.http is not None
    async with client.http.get(f"{client.base_url}/api/v1/recordings/{session_id}") as resp:
        data = await resp.read()
    with av.open(io.BytesIO(data), "r") as container:
        return len(list(container.decode(video=0)))


# ------------------------------------------------------------------ the two sides


async def bench_dreamwire(
    ks: list[int], work: Workload, tmp: Path, record: bool = False
) -> list[dict[str, Any]]:
    """``record``: every session records its output from the start (``recording: true``)."""
    port = free_port()
    config = tmp / "dreamwire.toml"
    config.write_text(
        f'port = {port}\nmax_sessions = {max(ks)}\npipelines = ["passthrough"]\n'
        "[api.ice]\nstun_urls = []\n"
        # The baseline's encoder is aiortc's own, which starts VP8 at 500 kbps and lets REMB
        # move it up to 1.5 Mbps: the same here, so both sides encode to the same budget.
        f"[encode]\nstart_bitrate_bps = {AIORTC_START_BPS}\nmax_bitrate_bps = {AIORTC_MAX_BPS}\n"
    )
    env = {**os.environ, "DREAMWIRE_RUN_DIR": str(tmp / "run"), "DREAMWIRE_LOG_LEVEL": "WARNING"}
    # Setup before the measured part: starting the server blocks for no time worth a thread.
    log = open(tmp / "supervisor.log", "wb")  # noqa: SIM115, ASYNC230 - closed below
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        [sys.executable, "-m", "supervisor.cli", "start", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        await wait_http(base + "/api/v1/pipeline/status", START_TIMEOUT_S)
        async with aiohttp.ClientSession() as http:
            sup = psutil.Process(proc.pid)

            async def get_json(path: str) -> Any:
                async with http.get(base + path) as resp:
                    return await resp.json()

            for k in ks:
                names = {
                    pr["pid"]: pr["name"] for pr in (await get_json("/api/v1/metrics"))["processes"]
                }
                procs = {"supervisor": sup}
                for child in sup.children():
                    procs[names.get(child.pid, str(child.pid))] = child
                meter = CpuMeter(procs)
                mark = {"seq": 0}

                async def begin(meter: CpuMeter = meter, mark: dict[str, int] = mark) -> None:
                    mark["seq"] = (await get_json("/api/v1/metrics"))["trace_seq"]
                    meter.begin()

                async def end(
                    meter: CpuMeter = meter, mark: dict[str, int] = mark
                ) -> dict[str, Any]:
                    cpu = meter.end()
                    return {**await traced_latency(http, base, mark["seq"]), "cpu_percent": cpu}

                run = await run_sessions(base, k, work, begin, end, record=record)
                results.append(run)
    finally:
        stop(proc)
        log.close()
    return results


async def bench_baseline(ks: list[int], work: Workload, marker_bit: bool) -> list[dict[str, Any]]:
    port = free_port()
    cmd = [sys.executable, str(ROOT / "scripts" / "baseline_server.py"), "--port", str(port)]
    proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
        cmd + (["--marker-bit"] if marker_bit else []), cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        await wait_http(base + "/api/v1/pipeline/status", START_TIMEOUT_S)
        meter = CpuMeter({"baseline": psutil.Process(proc.pid)})
        async with aiohttp.ClientSession() as http:

            async def begin() -> None:
                async with http.get(base + "/baseline/stats?reset=1") as resp:
                    await resp.read()
                meter.begin()

            async def end() -> dict[str, Any]:
                cpu = meter.end()
                async with http.get(base + "/baseline/stats") as resp:
                    lat = (await resp.json())["latencies_ms"]
                return {
                    "latency_p50_ms": pct(lat, 50),
                    "latency_p95_ms": pct(lat, 95),
                    "latency_p99_ms": pct(lat, 99),
                    "latency_mean_ms": round(float(np.mean(lat)), 2) if lat else None,
                    "cpu_percent": cpu,
                }

            for k in ks:
                results.append(await run_sessions(base, k, work, begin, end))
    finally:
        stop(proc)
    return results


async def bench_fastrtc(ks: list[int], work: Workload, python: str) -> list[dict[str, Any]]:
    """``scripts/fastrtc_server.py`` (FastRTC as its docs write it) run by ``python``. Its
    server-side latency cannot be taken at the same two points without changing FastRTC's
    code, so only the clients' round trip is reported for it."""
    port = free_port()
    script = str(ROOT / "scripts" / "fastrtc_server.py")
    cmd = [python, script, "--port", str(port), "--sessions", str(max(ks))]
    proc = subprocess.Popen(cmd, cwd=ROOT)  # noqa: ASYNC220 - Popen returns at once
    base = f"http://127.0.0.1:{port}"
    results = []
    try:
        await wait_http(base + "/docs", START_TIMEOUT_S)
        meter = CpuMeter({"fastrtc": psutil.Process(proc.pid)})

        async def begin() -> None:
            meter.begin()

        async def end() -> dict[str, Any]:
            return {
                "latency_p50_ms": None,
                "latency_p95_ms": None,
                "latency_p99_ms": None,
                "latency_mean_ms": None,
                "cpu_percent": meter.end(),
            }

        for k in ks:
            run = await run_sessions(base, k, work, begin, end, FastRTCClient)
            results.append(run)
    finally:
        stop(proc)
    return results


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    full = [r["sessions"] for r in runs if r["fps_min"] >= FULL_FPS]
    return {
        "max_sessions_at_full_fps": max(full, default=0),
        **{f"K={r['sessions']}": r for r in runs},
    }


def runs_of(result: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(server, run) for every run, in table order."""
    return [
        (server, r)
        for server, sizes in result.items()
        for runs in sizes.values()
        for key, r in runs.items()
        if key.startswith("K=")
    ]


def _ms(value: float | None) -> str:
    return "–" if value is None else str(value)


def table(result: dict[str, Any]) -> str:
    lines = [
        "| server | size | K | fps/session (min / mean) | p50 ms | p95 ms | p99 ms "
        "| client RTT p50 ms | server CPU % | CPU % per session | clients CPU % | sent fps "
        "| missing | unreadable |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for server, r in runs_of(result):
        lines.append(
            f"| {server} | {r['size']} | {r['sessions']} | {r['fps_min']:.1f} / "
            f"{r['fps_mean']:.1f} | {_ms(r['latency_p50_ms'])} | {_ms(r['latency_p95_ms'])} | "
            f"{_ms(r['latency_p99_ms'])} | {r['client_rtt_p50_ms']} | "
            f"{r['cpu_percent']['total']} | "
            f"{r['cpu_per_session']} | {r['clients_cpu_percent']} | {r['sent_fps_mean']:.1f} | "
            f"{r['missing_frames']} | {r['unreadable_frames']} |"
        )
    for server, sizes in result.items():
        for size, runs in sizes.items():
            lines.append(
                f"\n{server} {size}: max sessions at ≥ {FULL_FPS:.0f} fps: "
                f"{runs['max_sessions_at_full_fps']}"
            )
    for server, r in runs_of(result):
        lines.append(f"{server} {r['size']} K={r['sessions']} CPU by process: {r['cpu_percent']}")
        if "stages_mean_ms" in r:
            lines.append(f"  stage means (ms): {r['stages_mean_ms']}")
        if "recorded_frames" in r:
            lines.append(f"  frames in each session's recording: {r['recorded_frames']}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """fps per session and server CPU per session against K, a line per server and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (fps_ax, cpu_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server, sizes in result.items():
        for size, runs in sizes.items():
            rows = [r for key, r in runs.items() if key.startswith("K=")]
            ks = [r["sessions"] for r in rows]
            label = f"{server} {size}"
            fps_ax.plot(ks, [r["fps_mean"] for r in rows], marker="o", label=label)
            cpu_ax.plot(ks, [r["cpu_per_session"] for r in rows], marker="o", label=label)
    fps_ax.axhline(FPS, color="grey", linewidth=0.8, linestyle=":")
    fps_ax.set(xlabel="sessions (K)", ylabel="fps per session (mean)", ylim=(0, FPS + 2))
    cpu_ax.set(xlabel="sessions (K)", ylabel="server CPU % per session (100 = one core)")
    all_ks = sorted({r["sessions"] for _, r in runs_of(result)})
    for ax in (fps_ax, cpu_ax):
        ax.set_xticks(all_ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("bench_e2e: passthrough, 30 fps test pattern, clients on the same machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ks = [int(x) for x in args.sessions.split(",")]
    sizes = [tuple(int(v) for v in x.split("x")) for x in args.sizes.split(",")]
    servers = [x for x in args.servers.split(",") if x]
    if unknown := set(servers) - set(SERVERS):
        raise SystemExit(f"--servers: unknown {', '.join(sorted(unknown))} (known: {SERVERS})")
    if "fastrtc" in servers and not args.fastrtc_python:
        raise SystemExit("--servers fastrtc needs --fastrtc-python (a Python with fastrtc)")
    tmp = Path(tempfile.mkdtemp(prefix="dwb", dir="/tmp"))
    result: dict[str, Any] = {server: {} for server in servers}
    try:
        for width, height in sizes:
            work = Workload((width, height), args.warmup, args.duration, args.codec)
            for server in servers:
                if server in ("dreamwire", "dreamwire-recording"):
                    runs = await bench_dreamwire(ks, work, tmp, record=server != "dreamwire")
                elif server == "fastrtc":
                    runs = await bench_fastrtc(ks, work, args.fastrtc_python)
                else:
                    marker = server == "baseline-marker"
                    runs = await bench_baseline(ks, work, marker)
                result[server][f"{width}x{height}"] = summarize(runs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def save_samples(result: dict[str, Any], directory: Path | None) -> None:
    """Replace each run's unreadable sample (an array) by where it was written, if anywhere."""
    from PIL import Image

    for server, r in runs_of(result):
        sample = r.pop("unreadable_sample")
        if sample is not None and directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / f"{server}-{r['size']}-K{r['sessions']}.png"
            Image.fromarray(sample).save(path)
            r["unreadable_sample"] = str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", default="1,2,3", help="comma-separated K values")
    parser.add_argument("--duration", type=float, default=8.0, help="measured seconds per K")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--sizes", default="512x512", help="comma-separated WxH")
    parser.add_argument("--codec", choices=["VP8", "H264"], help="offer only this codec")
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS[:3]),
        help=f"comma-separated, of {', '.join(SERVERS)}",
    )
    parser.add_argument(
        "--fastrtc-python", help="a Python with fastrtc installed, for the fastrtc server"
    )
    parser.add_argument("--plot", type=Path, help="write fps and CPU per session vs K (PNG)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--samples", type=Path, help="write the first unreadable frame of each run here (PNG)"
    )
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    save_samples(result, args.samples)
    if args.plot is not None:
        plot(result, args.plot)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
