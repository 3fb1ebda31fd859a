"""Frame traces and metrics through a real ``supervisor start`` server and the Python client."""

from __future__ import annotations

import itertools
import urllib.request

import aiohttp
import msgspec
import pytest
import zmq
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun, async_wait_until
from prometheus_client.parser import text_string_to_metric_families

from services import protocol as p
from services.runtime import inbox_endpoint
from shm.ring import Stage
from signalling.metrics import STAMP_ORDER
from signalling.metrics_schema import MetricsReport, TraceFeed

pytestmark = pytest.mark.timeout(90)

CONFIG = """
[api.ice]
stun_urls = []
"""

# Every stage a camera frame through passthrough passes (no overlay in this chain).
PASSTHROUGH_STAMPS = [
    s.name.lower()
    for s in STAMP_ORDER
    if s
    not in (
        Stage.SOURCE,
        Stage.GENERATION_START,
        Stage.OVERLAY_START,
        Stage.OVERLAY_END,
        Stage.NODE_IN,  # one box: no media node on the way
        Stage.NODE_OUT,
        Stage.PACED,  # a per-frame pipeline: no pacer
    )
]


async def test_traces_survive_every_hop_and_metrics_are_served(start_supervisor: object) -> None:
    server: SupervisorRun = start_supervisor(CONFIG)  # type: ignore[operator]
    base = f"http://127.0.0.1:{server.port}"
    async with DreamwireClient(base, ice_servers=[]) as client:
        await client.load_pipeline("passthrough")
        client.pattern = PatternTrack(512, 512, 30)
        session_id = await client.connect(client.pattern)
        await client.wait_frames(30, timeout_s=30)

        # Frames lost in decode are counted at decode: a payload that decodes to nothing (a garbage
        # frame pushed into decode's inbox for the live session) shows up in the session's drops.
        assert server.run_dir is not None
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(inbox_endpoint(server.run_dir, "decode"))
        garbage = p.EncodedFrame(session_id, "VP8", b"\x00not vp8", 0, False, 0, 0)
        push.send(p.inbox_codec().encode(garbage))
        push.close()
        ctx.term()

        def decode_drops() -> int:
            with urllib.request.urlopen(f"{base}/api/v1/metrics?session={session_id}") as resp:
                (live,) = msgspec.json.decode(resp.read(), type=MetricsReport).sessions
            return live.drops.get("decode", 0)

        await async_wait_until(lambda: decode_drops() >= 1, 10, "the decode drop in the metrics")

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/api/v1/metrics/traces?after=0") as resp:
                assert resp.status == 200
                feed = msgspec.json.decode(await resp.read(), type=TraceFeed)
            assert len(feed.traces) >= 20
            for trace in feed.traces:
                assert trace.session_id == session_id
                assert trace.pipeline_id == "passthrough"
                # Every stage it passed, in order, none negative.
                assert list(trace.stamps) == PASSTHROUGH_STAMPS, trace
                times = list(trace.stamps.values())
                assert all(b >= a for a, b in itertools.pairwise(times)), trace
            numbers = [t.frame_number for t in feed.traces]
            assert numbers == sorted(numbers)

            async with http.get(f"{base}/api/v1/metrics") as resp:
                assert resp.status == 200
                report = msgspec.json.decode(await resp.read(), type=MetricsReport)
            async with http.get(f"{base}/api/v1/metrics?session={session_id}") as resp:
                assert resp.status == 200
                one = msgspec.json.decode(await resp.read(), type=MetricsReport)
            async with http.get(f"{base}/api/v1/metrics?session=nope") as resp:
                assert resp.status == 404
                assert (await resp.json())["error"] == "unknown_session"
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
                assert resp.headers["Content-Type"].startswith("text/plain")
                text = await resp.text()

    (session,) = report.sessions
    assert [s.session_id for s in one.sessions] == [session_id]
    assert session.frames_out >= 20 and session.fps_in > 0
    means = sum(s.latency.mean_ms for s in session.stages)
    assert means == pytest.approx(session.end_to_end.mean_ms, rel=0.01)
    assert {s.stage for s in session.stages} >= {"decode", "model", "encode", "send"}
    assert [r.consumer for r in session.rings] == ["inference/passthrough", "encode"]
    processes = {pr.name: pr for pr in report.processes}
    assert set(processes) >= {"signalling", "decode", "encode", "inference/passthrough"}
    assert all(pr.rss_bytes > 0 for pr in processes.values())

    families = {f.name: f for f in text_string_to_metric_families(text)}
    stage_counts = {
        s.labels["stage"]: s.value
        for s in families["dreamwire_stage_latency_seconds"].samples
        if s.name.endswith("_count")
    }
    assert stage_counts["encode"] >= 20
    assert "dreamwire_process_resident_memory_bytes" in families
