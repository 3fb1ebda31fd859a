"""The metrics aggregation in one process: segments, reports, Prometheus text, trace feed."""

from __future__ import annotations

import msgspec
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services import protocol as p
from shm.ring import N_STAMPS, Stage
from signalling.metrics import (
    SAMPLES,
    SEGMENT_ORDER,
    TRACE_BUFFER,
    MetricsAggregator,
    end_to_end_ns,
    segments,
)
from signalling.metrics_schema import MetricsReport, TraceFeed

pytestmark = pytest.mark.timeout(30)

VIDEO_CHAIN = [
    Stage.RTP_ARRIVAL,
    Stage.FRAME_COMPLETE,
    Stage.DECODE_START,
    Stage.DECODE_END,
    Stage.INFERENCE_START,
    Stage.MODEL_START,
    Stage.MODEL_END,
    Stage.INFERENCE_END,
    Stage.ENCODE_START,
    Stage.ENCODE_END,
]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000_000

    def __call__(self) -> int:
        return self.now


def video_stamps(start: int, step_ns: int = 1_000_000) -> list[int]:
    stamps = [0] * N_STAMPS
    for i, stage in enumerate(VIDEO_CHAIN):
        stamps[stage] = start + i * step_ns * (i + 1)
    return stamps


def test_segments_of_a_video_frame_add_up_to_end_to_end() -> None:
    stamps = video_stamps(10_000)
    stamps[Stage.RTP_DEPARTURE] = stamps[Stage.ENCODE_END] + 3_000_000
    spans = segments(stamps)
    assert [name for name, _, _ in spans] == [
        "receive",
        "to_decode",
        "decode",
        "to_inference",
        "inference_in",
        "model",
        "inference_out",
        "to_encode",
        "encode",
        "send",
    ]
    assert [n for n in SEGMENT_ORDER if n in {s for s, _, _ in spans}] == [s for s, _, _ in spans]
    total = end_to_end_ns(stamps)
    assert total == stamps[Stage.RTP_DEPARTURE] - stamps[Stage.RTP_ARRIVAL]
    assert sum(t1 - t0 for _, t0, t1 in spans) == total


def test_text_session_starts_at_generation_and_overlay_is_included() -> None:
    stamps = [0] * N_STAMPS
    t = 5_000_000
    for stage in (
        Stage.GENERATION_START,
        Stage.MODEL_START,
        Stage.MODEL_END,
        Stage.INFERENCE_END,
        Stage.OVERLAY_START,
        Stage.OVERLAY_END,
        Stage.ENCODE_START,
        Stage.ENCODE_END,
        Stage.RTP_DEPARTURE,
    ):
        t += 1_000_000
        stamps[stage] = t
    stamps[Stage.INFERENCE_START] = stamps[Stage.GENERATION_START]
    names = [name for name, _, _ in segments(stamps)]
    assert names == [
        "inference_in",
        "model",
        "inference_out",
        "to_overlay",
        "overlay",
        "to_encode",
        "encode",
        "send",
    ]
    assert end_to_end_ns(stamps) == 8_000_000
    # Not departed yet: no end-to-end number.
    stamps[Stage.RTP_DEPARTURE] = 0
    assert end_to_end_ns(stamps) is None


def status_report() -> p.StatusReport:
    return p.StatusReport(
        run_id="r1",
        pid=1,
        uptime_s=3.0,
        services=[
            p.ServiceStatus(
                name="decode", state="ready", pid=11, uptime_s=3.0, restarts=0, cpu_percent=12.5
            ),
            p.ServiceStatus(
                name="signalling",
                state="ready",
                pid=12,
                uptime_s=3.0,
                restarts=0,
                rss_bytes=50_000_000,
                gpu_memory_bytes=1 << 20,
            ),
        ],
        sessions=["s1"],
        rejected=0,
        phase="running",
        rings=[
            p.RingStatus(
                session_id="s1",
                ring="dreamwire.r1.s1.0",
                producer="decode",
                consumer="inference/passthrough",
                slots=4,
                published=40,
                consumed=35,
                skipped=4,
                torn=1,
                pending=0,
            )
        ],
    )


def fed_aggregator(frames: int = 40) -> tuple[MetricsAggregator, Clock]:
    clock = Clock()
    metrics = MetricsAggregator(clock=clock)
    metrics.session_opened("s1", "passthrough", "video", ["decode", "inference/passthrough"])
    for n in range(frames):
        clock.now += 33_000_000
        metrics.frame_in("s1", forwarded=n != 3)
        stamps = video_stamps(clock.now - 100_000_000)  # encoded 10 ms ago
        metrics.departure_callback("s1", n, stamps)(True)
    metrics.departure_callback("s1", frames, video_stamps(clock.now))(False)
    return metrics, clock


def test_report_matches_its_schema_and_explains_the_end_to_end_number() -> None:
    metrics, _ = fed_aggregator()
    report = metrics.report(status_report())
    decoded = msgspec.json.decode(msgspec.json.encode(report), type=MetricsReport)
    assert decoded == report
    (session,) = report.sessions
    assert session.frames_in == 40 and session.frames_out == 40
    assert 25 < session.fps_in < 35 and 25 < session.fps_out < 35
    assert session.end_to_end.count == 40
    stage_means = sum(s.latency.mean_ms for s in session.stages)
    assert stage_means == pytest.approx(session.end_to_end.mean_ms, rel=1e-3)
    assert abs(sum(s.share for s in session.stages) - 1) < 1e-2
    assert [s.stage for s in session.stages][-1] == "send"
    assert {s.stage: s.process for s in session.stages}["model"] == "inference/passthrough"
    # Drops by stage: one refused by decode's inbox, one superseded in the track, five in the
    # inference ring (skipped + torn, from the supervisor's ring counters).
    assert session.drops == {"to_decode": 1, "send": 1, "to_inference": 5}
    assert session.rings[0].consumer == "inference/passthrough"
    (pipe,) = report.pipelines
    assert pipe.pipeline_id == "passthrough" and pipe.frames_out == 40
    assert {pr.name: pr.cpu_percent for pr in report.processes}["decode"] == 12.5
    assert metrics.report(None, "s1").sessions[0].session_id == "s1"
    with pytest.raises(KeyError):
        metrics.report(None, "nope")


def test_samples_are_bounded_and_closed_sessions_leave_the_pipeline_numbers() -> None:
    metrics, _ = fed_aggregator(SAMPLES + 50)
    session = metrics.report().sessions[0]
    assert session.end_to_end.count == SAMPLES
    metrics.session_closed("s1")
    report = metrics.report()
    assert report.sessions == []
    assert report.pipelines[0].end_to_end.count == SAMPLES
    assert report.pipelines[0].sessions == 0


def test_prometheus_text_parses_with_histograms_per_stage() -> None:
    metrics, _ = fed_aggregator()
    metrics.last_status = status_report()
    text = generate_latest(metrics.registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    hist = families["dreamwire_stage_latency_seconds"]
    assert hist.type == "histogram"
    stages = {s.labels["stage"] for s in hist.samples if s.name.endswith("_count")}
    # The fed frames pass no overlay, no media node and no block model's pacer.
    local = {"to_overlay", "overlay", "to_node", "from_node", "pacing"}
    assert stages == {n for n in SEGMENT_ORDER if n not in local}
    counts = {
        s.labels["pipeline"]: s.value
        for s in families["dreamwire_frame_latency_seconds"].samples
        if s.name.endswith("_count")
    }
    assert counts == {"passthrough": 40}
    cpu = {s.labels["process"]: s.value for s in families["dreamwire_process_cpu_percent"].samples}
    assert cpu == {"decode": 12.5, "signalling": 0.0}
    dropped = {
        s.labels["stage"]: s.value
        for s in families["dreamwire_frames_dropped"].samples
        if s.name.endswith("_total")
    }
    assert dropped == {"to_decode": 1, "send": 1}


def test_trace_feed_pages_by_sequence_and_counts_evictions() -> None:
    metrics, clock = fed_aggregator(10)
    feed = metrics.traces_after(0)
    assert [t.seq for t in feed.traces] == list(range(1, 11)) and feed.next == 10
    assert feed.traces[0].stamps["rtp_arrival"] < feed.traces[0].stamps["rtp_departure"]
    assert metrics.traces_after(10).traces == [] and metrics.traces_after(10).next == 10
    page = metrics.traces_after(4, limit=3)
    assert [t.seq for t in page.traces] == [5, 6, 7] and page.next == 7
    for n in range(TRACE_BUFFER + 10):
        metrics.frame_departed("s1", n, video_stamps(clock.now))
    feed = metrics.traces_after(10)
    assert feed.missed == 10 and feed.traces[0].seq == 21
    assert msgspec.json.decode(msgspec.json.encode(feed), type=TraceFeed) == feed
    # A profiler that outlived a signalling restart starts over.
    assert metrics.traces_after(10**9).traces[0].seq == 21
