"""``supervisor profile --duration 3 --out DIR`` against a running server with a live stream."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import sys
from pathlib import Path

import pytest
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun

from supervisor.cli import build_parser
from supervisor.profile import chrome_trace

pytestmark = pytest.mark.timeout(90)

CONFIG = """
[api.ice]
stun_urls = []
"""
PROFILE_TIMEOUT_S = 40


def profile_argv(run_base: Path, out: Path) -> list[str]:
    """``supervisor profile`` as a user runs it (the CLI once it has the command)."""
    options = ["--duration", "3", "--out", str(out)]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            build_parser().parse_args(["profile", *options])
    except SystemExit:  # not wired into supervisor.cli yet: the module's own entry point
        return [sys.executable, "-m", "supervisor.profile", "--run-dir", str(run_base), *options]
    return [sys.executable, "-m", "supervisor.cli", "--run-dir", str(run_base), "profile", *options]


async def test_profile_writes_report_plot_and_trace(
    start_supervisor: object, tmp_path: Path
) -> None:
    server: SupervisorRun = start_supervisor(CONFIG)  # type: ignore[operator]
    out = tmp_path / "prof"
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as client:
        await client.load_pipeline("passthrough")
        client.pattern = PatternTrack(512, 512, 30)
        session_id = await client.connect(client.pattern)
        await client.wait_frames(10, timeout_s=30)
        # The stream keeps flowing (this event loop) while the profiler runs.
        proc = await asyncio.create_subprocess_exec(
            *profile_argv(server.base / "run", out),
            env=server.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await asyncio.wait_for(proc.communicate(), PROFILE_TIMEOUT_S)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "encode" in text and "end to end" in text  # the live table

    profile = json.loads((out / "profile.json").read_text())
    assert profile["frames"] >= 30
    overall = profile["overall"]
    stages = {s["stage"]: s for s in overall["stages"]}
    assert {"decode", "model", "encode", "send"} <= set(stages)
    mean_sum = sum(s["mean_ms"] for s in overall["stages"])
    assert mean_sum == pytest.approx(overall["end_to_end"]["mean_ms"], rel=0.01)
    assert session_id in profile["sessions"]
    assert profile["server"]["stage_order"][0] == "receive"

    png = (out / "latency.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000

    trace = json.loads((out / "trace.json").read_text())
    events = trace["traceEvents"]
    slices = [e for e in events if e["ph"] == "X"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert names == {"signalling", "decode", "inference/passthrough", "encode"}
    for e in slices:
        assert isinstance(e["ts"], float | int) and e["dur"] >= 0
        assert {"name", "pid", "tid", "ts", "dur"} <= set(e)
    # One slice per frame per stage.
    per_stage = {name: sum(1 for e in slices if e["name"] == name) for name in stages}
    assert set(per_stage.values()) == {profile["frames"]}


def test_trace_rows_never_overlap() -> None:
    from signalling.metrics_schema import TraceRecord

    def record(seq: int, start: int) -> TraceRecord:
        return TraceRecord(
            seq=seq,
            session_id="s",
            pipeline_id="p",
            frame_number=seq,
            stamps={"encode_start": start, "encode_end": start + 50, "rtp_departure": start + 60},
        )

    # The second frame's encode starts (by its stamps) before the first one's ended.
    trace = chrome_trace([record(1, 1000), record(2, 1020)])
    rows: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for e in trace["traceEvents"]:
        if e["ph"] == "X":
            rows.setdefault((e["pid"], e["tid"]), []).append((e["ts"], e["ts"] + e["dur"]))
    for spans in rows.values():
        spans.sort()
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
