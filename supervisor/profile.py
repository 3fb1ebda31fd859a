"""``supervisor profile``: where a running server's milliseconds go, stage by stage.

Attaches to a live run (found like ``supervisor status`` finds it: the run directories under
the run base, ``supervisor.json`` for host and port), polls signalling's trace feed
(``GET /api/v1/metrics/traces?after=<seq>``: every departed frame with its per-stage
timestamps) and prints a per-stage table every second. With ``--duration S`` it stops after S
seconds; with ``--out DIR`` it writes:

* ``DIR/profile.json``: the aggregates over the profiled frames (per stage and end to end,
  overall and per session) and the server's own ``/api/v1/metrics`` report at the end;
* ``DIR/latency.png``: the per-stage latency distributions side by side, the slowest stage
  (largest mean) in red;
* ``DIR/trace.json``: Chrome trace-event format (Perfetto, ``chrome://tracing``): one track
  (pid) per process, one row (tid) per session and kind (work, queue), one slice per frame per
  stage. Timestamps are the server's CLOCK_MONOTONIC in microseconds.

The lead wires it into ``supervisor.cli`` with :func:`add_profile_parser`; ``python -m
supervisor.profile`` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np

from shm.ring import Stage
from signalling.metrics import (
    SEGMENT_ORDER,
    end_to_end_ns,
    process_of,
    segment_info,
    segments,
)
from signalling.metrics_schema import TraceFeed, TraceRecord
from supervisor.client import find_run_dirs
from supervisor.config import default_run_base

POLL_INTERVAL_S = 0.25
TABLE_INTERVAL_S = 1.0
#: The live table covers the frames of the last few seconds.
LIVE_WINDOW_S = 5.0
#: Traces kept for the output files (about 10 minutes of one 30 fps session).
MAX_TRACES = 20_000
HTTP_TIMEOUT_S = 5.0

_STAGE_BY_NAME = {s.name.lower(): s for s in Stage}


class ProfileError(RuntimeError):
    pass


def server_url(run_base: Path | None) -> str:
    """The HTTP address of the newest live run under ``run_base``."""
    runs = find_run_dirs(run_base or default_run_base())
    if not runs:
        raise ProfileError(f"no running supervisor under {run_base or default_run_base()}")
    info = json.loads((runs[0] / "supervisor.json").read_text())
    host = str(info.get("host") or "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(info['port'])}"


def stamp_array(trace: TraceRecord) -> list[int]:
    stamps = [0] * (max(Stage) + 1)
    for name, ns in trace.stamps.items():
        stage = _STAGE_BY_NAME.get(name)
        if stage is not None:
            stamps[stage] = ns
    return stamps


@dataclass
class Collected:
    """Frames seen by the profiler: their stamps, and durations per stage."""

    traces: collections.deque[TraceRecord] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_TRACES)
    )
    missed: int = 0
    seen_at: collections.deque[tuple[float, TraceRecord]] = field(default_factory=collections.deque)

    def add(self, feed: TraceFeed, now: float) -> None:
        self.missed += feed.missed
        for trace in feed.traces:
            self.traces.append(trace)
            self.seen_at.append((now, trace))
        while self.seen_at and self.seen_at[0][0] < now - LIVE_WINDOW_S:
            self.seen_at.popleft()


def aggregate(traces: list[TraceRecord]) -> dict[str, Any]:
    """Per-stage and end-to-end latency (ms) over ``traces``."""
    per_stage: dict[str, list[float]] = collections.defaultdict(list)
    e2e: list[float] = []
    pipelines: dict[str, str] = {}
    for trace in traces:
        stamps = stamp_array(trace)
        total = end_to_end_ns(stamps)
        if total is None:
            continue
        e2e.append(total / 1e6)
        for name, t0, t1 in segments(stamps):
            per_stage[name].append((t1 - t0) / 1e6)
            pipelines.setdefault(name, trace.pipeline_id)
    e2e_stats = _stats(e2e)
    stages = []
    for name in sorted(per_stage, key=_rank):
        stats = _stats(per_stage[name])
        stats["share"] = (
            round(stats["mean_ms"] / e2e_stats["mean_ms"], 4) if e2e_stats["mean_ms"] else 0.0
        )
        stages.append(
            {
                "stage": name,
                "process": process_of(name, pipelines[name]),
                "kind": segment_info(name).kind,
                **stats,
            }
        )
    return {"frames": len(e2e), "end_to_end": e2e_stats, "stages": stages}


def _rank(name: str) -> int:
    return SEGMENT_ORDER.index(name) if name in SEGMENT_ORDER else len(SEGMENT_ORDER)


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0, "mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0}
    arr = np.asarray(values)
    p50, p95, p99 = np.percentile(arr, [50, 95, 99])
    return {
        "count": len(values),
        "mean_ms": round(float(arr.mean()), 3),
        "p50_ms": round(float(p50), 3),
        "p95_ms": round(float(p95), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(arr.max()), 3),
    }


def format_table(agg: dict[str, Any], header: str) -> str:
    lines = [header]
    lines.append(
        f"  {'STAGE':<14} {'PROCESS':<24} {'MEAN ms':>8} {'P50':>8} {'P95':>8} {'P99':>8} "
        f"{'SHARE':>6}"
    )
    slowest = max(agg["stages"], key=lambda s: s["mean_ms"], default=None)
    for s in agg["stages"]:
        mark = "  ◀ slowest" if s is slowest else ""
        lines.append(
            f"  {s['stage']:<14} {s['process']:<24} {s['mean_ms']:>8.2f} {s['p50_ms']:>8.2f} "
            f"{s['p95_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['share'] * 100:>5.1f}%{mark}"
        )
    e = agg["end_to_end"]
    lines.append(
        f"  {'end to end':<14} {'':<24} {e['mean_ms']:>8.2f} {e['p50_ms']:>8.2f} "
        f"{e['p95_ms']:>8.2f} {e['p99_ms']:>8.2f}  ({agg['frames']} frames)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------------ outputs


def chrome_trace(traces: list[TraceRecord]) -> dict[str, Any]:
    """Trace-event JSON: pid per process, tid per (session, work|queue), one X slice per
    frame per stage. Slices on one row never overlap (a later one starts where the last ended)."""
    events: list[dict[str, Any]] = []
    pids: dict[str, int] = {}
    tids: dict[tuple[str, str, str], int] = {}
    rows: dict[tuple[int, int], list[tuple[int, int, str, dict[str, Any]]]] = (
        collections.defaultdict(list)
    )
    for trace in traces:
        stamps = stamp_array(trace)
        for name, t0, t1 in segments(stamps):
            process = process_of(name, trace.pipeline_id)
            kind = segment_info(name).kind
            pid = pids.setdefault(process, len(pids) + 1)
            tid = tids.setdefault((process, trace.session_id, kind), len(tids) + 1)
            args = {"session": trace.session_id, "frame": trace.frame_number}
            rows[(pid, tid)].append((t0, t1, name, args))
    for process, pid in pids.items():
        events.append(
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": process}}
        )
        events.append(
            {
                "ph": "M",
                "name": "process_sort_index",
                "pid": pid,
                "tid": 0,
                "args": {"sort_index": pid},
            }
        )
    for (process, session_id, kind), tid in tids.items():
        events.append(
            {
                "ph": "M",
                "name": "thread_name",
                "pid": pids[process],
                "tid": tid,
                "args": {"name": f"session {session_id[:8]} {kind}"},
            }
        )
    for (pid, tid), slices in rows.items():
        slices.sort(key=lambda s: s[0])
        last_end = 0
        for t0, t1, name, args in slices:
            start = max(t0, last_end)
            end = max(t1, start)
            last_end = end
            events.append(
                {
                    "ph": "X",
                    "name": name,
                    "cat": "frame",
                    "pid": pid,
                    "tid": tid,
                    "ts": start / 1e3,
                    "dur": (end - start) / 1e3,
                    "args": args,
                }
            )
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def latency_png(agg: dict[str, Any], traces: list[TraceRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_stage: dict[str, list[float]] = collections.defaultdict(list)
    for trace in traces:
        stamps = stamp_array(trace)
        if end_to_end_ns(stamps) is None:
            continue
        for name, t0, t1 in segments(stamps):
            per_stage[name].append((t1 - t0) / 1e6)
    names = [s["stage"] for s in agg["stages"]]
    data = [per_stage[n] for n in names]
    slowest = max(agg["stages"], key=lambda s: s["mean_ms"], default=None)
    fig, ax = plt.subplots(figsize=(10, 0.45 * max(len(names), 4) + 1.6))
    if names:
        box = ax.boxplot(
            data[::-1],
            vert=False,
            whis=(1, 99),
            showfliers=False,
            patch_artist=True,
            showmeans=True,
            meanprops={"marker": "|", "markeredgecolor": "black", "markersize": 12},
        )
        for patch, name in zip(box["boxes"], names[::-1], strict=True):
            hot = slowest is not None and name == slowest["stage"]
            patch.set_facecolor("#e4572e" if hot else "#76b7d6")
        labels = [
            f"{s['stage']} ({s['process']})  mean {s['mean_ms']:.2f}  p95 {s['p95_ms']:.2f}"
            for s in agg["stages"]
        ]
        ax.set_yticks(range(1, len(names) + 1), labels[::-1])
        ax.set_xscale("symlog", linthresh=1.0)
    e = agg["end_to_end"]
    title = (
        f"per-stage latency over {agg['frames']} frames — end to end p50 {e['p50_ms']:.1f} ms, "
        f"p95 {e['p95_ms']:.1f} ms"
    )
    if slowest is not None:
        title += f"\nslowest: {slowest['stage']} ({slowest['share'] * 100:.0f}% of the mean)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("ms (box: p25–p75, whiskers p1–p99, | mean)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(
    out: Path, traces: list[TraceRecord], server_report: Any, missed: int, duration_s: float
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(traces)
    by_session = {}
    for session_id in sorted({t.session_id for t in traces}):
        by_session[session_id] = aggregate([t for t in traces if t.session_id == session_id])
    profile = {
        "duration_s": round(duration_s, 3),
        "frames": agg["frames"],
        "missed_traces": missed,
        "overall": agg,
        "sessions": by_session,
        "server": server_report,
    }
    (out / "profile.json").write_text(json.dumps(profile, indent=2))
    (out / "trace.json").write_text(json.dumps(chrome_trace(traces)))
    latency_png(agg, traces, out / "latency.png")
    return profile


# ------------------------------------------------------------------ running


async def profile(
    url: str, duration_s: float | None, out: Path | None, live: bool = True
) -> dict[str, Any] | None:
    decoder = msgspec.json.Decoder(TraceFeed)
    collected = Collected()
    timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
    tty = live and sys.stdout.isatty()
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def get(path: str) -> bytes:
            async with http.get(url + path) as resp:
                if resp.status != 200:
                    raise ProfileError(f"GET {path}: HTTP {resp.status}")
                return await resp.read()

        try:
            first = json.loads(await get("/api/v1/metrics"))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProfileError(f"cannot reach the server at {url}: {exc}") from None
        after = int(first["trace_seq"])  # only frames from now on
        started = time.monotonic()
        next_table = started + TABLE_INTERVAL_S
        while duration_s is None or time.monotonic() - started < duration_s:
            feed = decoder.decode(await get(f"/api/v1/metrics/traces?after={after}"))
            after = feed.next
            now = time.monotonic()
            collected.add(feed, now)
            if live and now >= next_table:
                next_table = now + TABLE_INTERVAL_S
                recent = [t for _, t in collected.seen_at]
                table = format_table(
                    aggregate(recent),
                    f"dreamwire profile — {url} — last {LIVE_WINDOW_S:.0f} s, "
                    f"{now - started:.0f} s elapsed",
                )
                print(("\x1b[H\x1b[2J" if tty else "") + table, flush=True)
            await asyncio.sleep(POLL_INTERVAL_S)
        elapsed = time.monotonic() - started
        if out is None:
            return None
        server_report = json.loads(await get("/api/v1/metrics"))
    return write_outputs(out, list(collected.traces), server_report, collected.missed, elapsed)


def cmd_profile(args: argparse.Namespace) -> int:
    try:
        url = args.url or server_url(Path(args.run_dir) if args.run_dir else None)
        result = asyncio.run(profile(url, args.duration, Path(args.out) if args.out else None))
    except ProfileError as exc:
        print(f"supervisor profile: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    if result is not None:
        print(
            format_table(result["overall"], f"profile of {result['duration_s']:.1f} s")
            + f"\nwrote {args.out}/profile.json, latency.png, trace.json",
            flush=True,
        )
    return 0


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument("--out", help="write profile.json, latency.png and trace.json here")
    parser.add_argument("--url", help="the server's address (default: from the run directory)")
    parser.set_defaults(func=cmd_profile)


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``supervisor profile``: add to the CLI's subparsers (``--run-dir`` is the CLI's)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "profile", help="live per-stage latency of a running server; --out writes a report"
    )
    _add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m supervisor.profile [--run-dir BASE] [--duration S] [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m supervisor.profile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--run-dir", help="base directory of run directories")
    _add_arguments(parser)
    return cmd_profile(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
