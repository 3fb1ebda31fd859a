"""Per-stage latency, fps and drops, aggregated from the frames' own timestamps.

Every frame carries ``time.monotonic_ns()`` stamps (``shm.ring.Stage``, one clock for all
processes) set by each stage it passes; encode sends them to signalling with the packet, and
signalling adds ``RTP_DEPARTURE`` when aiortc's sender has sent the frame's last RTP packet.
That completed trace is all this module needs.

Segments: the present stamps, in pipeline order (:data:`STAMP_ORDER`), cut the frame's life into
consecutive spans, each named for what happened in it (:data:`SEGMENTS`)::

    RTP_ARRIVAL ─receive─ FRAME_COMPLETE ─to_decode─ DECODE_START ─decode─ DECODE_END
      ─to_inference─ INFERENCE_START ─inference_in─ MODEL_START ─model─ MODEL_END
      ─inference_out─ INFERENCE_END [─to_overlay─ OVERLAY_START ─overlay─ OVERLAY_END]
      ─to_encode─ ENCODE_START ─encode─ ENCODE_END ─send─ RTP_DEPARTURE

A session on a media node (another host) has two more: ``FRAME_COMPLETE ─to_node─ NODE_IN``
before decode and ``ENCODE_END ─from_node─ NODE_OUT`` after encode, the network hops; the
node's link puts its stamps on the front's clock (an offset measured by ping), so the
segments still sum.

A stage a frame did not pass leaves no stamp and no segment, so the segments of one frame sum
to its end-to-end latency *by construction* (first stamp → ``RTP_DEPARTURE``; the first stamp is
``RTP_ARRIVAL`` for camera sessions, ``GENERATION_START`` for no-input sessions), and per-stage
means sum to the end-to-end mean. ``to_*`` segments are waits (a ZeroMQ hop or a ring), the
others are work. ``send`` is encode → signalling over ZeroMQ, the outgoing track's queue, and
aiortc's packetizing, SRTP and ``sendto``.

Aggregation (:class:`MetricsAggregator`, one per signalling app, asyncio thread only): per
session and per pipeline, the last :data:`SAMPLES` frames' segments for p50/p95/p99 and means;
prometheus-client histograms in the app's own ``CollectorRegistry``; fps in/out; drops by the
stage (segment) where they happened; a bounded buffer of recent traces (:class:`TraceRecord`,
sequence-numbered) for ``supervisor profile``. Ring occupancy and per-process CPU/memory come
from the supervisor's ``StatusReport`` and are merged in by :meth:`MetricsAggregator.report`.

The JSON schemas are in :mod:`signalling.metrics_schema`.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services import protocol as p
from services import topology
from shm.ring import Stage
from signalling.metrics_schema import (
    LatencyStats,
    MetricsReport,
    PipelineMetrics,
    ProcessMetrics,
    RingMetrics,
    SessionMetrics,
    StageLatency,
    TraceFeed,
    TraceRecord,
)

#: Per-frame samples kept per session and per pipeline (20 s at 30 fps).
SAMPLES = 600
#: Recent complete frame traces kept for the profiler's feed.
TRACE_BUFFER = 4096
#: fps is measured over this trailing window.
FPS_WINDOW_S = 2.0
#: Histogram buckets, seconds (Prometheus base unit), spaced for a real-time video pipeline.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.033,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.0,
    5.0,
)

#: Stamps in the order a frame passes them.
STAMP_ORDER: tuple[Stage, ...] = (
    Stage.SOURCE,
    Stage.GENERATION_START,
    Stage.RTP_ARRIVAL,
    Stage.FRAME_COMPLETE,
    Stage.NODE_IN,
    Stage.DECODE_START,
    Stage.DECODE_END,
    Stage.INFERENCE_START,
    Stage.MODEL_START,
    Stage.MODEL_END,
    Stage.PACED,
    Stage.INFERENCE_END,
    Stage.OVERLAY_START,
    Stage.OVERLAY_END,
    Stage.ENCODE_START,
    Stage.ENCODE_END,
    Stage.NODE_OUT,
    Stage.RTP_DEPARTURE,
)
#: Stamps that may begin a frame's end-to-end span.
START_STAMPS = (Stage.SOURCE, Stage.GENERATION_START, Stage.RTP_ARRIVAL)


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    name: str
    process: str  # the service it happens in; "inference" means inference/<pipeline>
    kind: str  # "work" | "queue"
    description: str


#: A segment is named by the stamp that ends it.
SEGMENTS: dict[Stage, SegmentInfo] = {
    Stage.FRAME_COMPLETE: SegmentInfo(
        "receive", "signalling", "work", "first RTP packet → frame reassembled (jitter buffer)"
    ),
    Stage.NODE_IN: SegmentInfo(
        "to_node", "nodes", "queue", "signalling → a media node over the network"
    ),
    Stage.DECODE_START: SegmentInfo(
        "to_decode", "decode", "queue", "signalling (or a node's link) → decode over ZeroMQ"
    ),
    Stage.DECODE_END: SegmentInfo(
        "decode", "decode", "work", "decode + scale to RGB into the ring"
    ),
    Stage.INFERENCE_START: SegmentInfo(
        "to_inference", "inference", "queue", "wait in the input ring"
    ),
    Stage.MODEL_START: SegmentInfo(
        "inference_in", "inference", "work", "prepare the input, batch sessions"
    ),
    Stage.MODEL_END: SegmentInfo("model", "inference", "work", "the pipeline call"),
    Stage.PACED: SegmentInfo(
        "pacing",
        "inference",
        "queue",
        "a block model's frame held to leave at its production rate (even frame intervals)",
    ),
    Stage.INFERENCE_END: SegmentInfo(
        "inference_out", "inference", "work", "result into the output ring"
    ),
    Stage.OVERLAY_START: SegmentInfo("to_overlay", "overlay", "queue", "wait in the ring"),
    Stage.OVERLAY_END: SegmentInfo("overlay", "overlay", "work", "draw the overlay"),
    Stage.ENCODE_START: SegmentInfo("to_encode", "encode", "queue", "wait in the output ring"),
    Stage.ENCODE_END: SegmentInfo("encode", "encode", "work", "RGB → VP8/H264 packet"),
    Stage.NODE_OUT: SegmentInfo(
        "from_node", "nodes", "queue", "a media node's encode → the front over the network"
    ),
    Stage.RTP_DEPARTURE: SegmentInfo(
        "send",
        "signalling",
        "work",
        "encode → signalling over ZeroMQ, track queue, RTP packetize + SRTP + send",
    ),
}
#: Every segment name, in pipeline order.
SEGMENT_ORDER: tuple[str, ...] = tuple(SEGMENTS[s].name for s in STAMP_ORDER if s in SEGMENTS)
_SEGMENT_BY_NAME = {info.name: info for info in SEGMENTS.values()}
_STAGE_NAMES = {s: s.name.lower() for s in Stage}


def segment_info(name: str) -> SegmentInfo:
    return _SEGMENT_BY_NAME[name]


def process_of(segment: str, pipeline_id: str) -> str:
    """The process a segment happens in, as ``supervisor status`` names it."""
    process = _SEGMENT_BY_NAME[segment].process
    return topology.inference_service(pipeline_id) if process == "inference" else process


def present_stamps(stamps: Sequence[int]) -> list[tuple[Stage, int]]:
    """The frame's stamps in pipeline order, leaving out the stages it did not pass."""
    out = [(s, int(stamps[s])) for s in STAMP_ORDER if s < len(stamps) and stamps[s]]
    # A no-input frame's INFERENCE_START is its GENERATION_START: one instant, one stamp.
    if any(s is Stage.GENERATION_START for s, _ in out):
        out = [(s, t) for s, t in out if s is not Stage.INFERENCE_START]
    return out


def segments(stamps: Sequence[int]) -> list[tuple[str, int, int]]:
    """``(segment, start_ns, end_ns)`` between consecutive present stamps."""
    present = present_stamps(stamps)
    out = []
    for (_, t0), (stage, t1) in itertools.pairwise(present):
        info = SEGMENTS.get(stage)
        name = info.name if info is not None else stage.name.lower()
        out.append((name, t0, t1))
    return out


def end_to_end_ns(stamps: Sequence[int]) -> int | None:
    """First stamp → RTP departure, or None for a frame that has not departed."""
    present = present_stamps(stamps)
    if not present or present[-1][0] is not Stage.RTP_DEPARTURE:
        return None
    if present[0][0] not in START_STAMPS:
        return None
    return present[-1][1] - present[0][1]


# ------------------------------------------------------------------ aggregation


def latency_stats(samples_ns: Iterable[float]) -> LatencyStats:
    values = np.fromiter(samples_ns, dtype=np.float64)
    if values.size == 0:
        return LatencyStats(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    ms = values / 1e6
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return LatencyStats(
        count=int(ms.size),
        mean_ms=round(float(ms.mean()), 3),
        p50_ms=round(float(p50), 3),
        p95_ms=round(float(p95), 3),
        p99_ms=round(float(p99), 3),
        max_ms=round(float(ms.max()), 3),
    )


class _Samples:
    """The last ``SAMPLES`` frames: end-to-end and per-segment durations (ns)."""

    def __init__(self) -> None:
        self.end_to_end: collections.deque[int] = collections.deque(maxlen=SAMPLES)
        self.segments: dict[str, collections.deque[int]] = {}

    def add(self, e2e: int, spans: list[tuple[str, int, int]]) -> None:
        self.end_to_end.append(e2e)
        for name, t0, t1 in spans:
            dq = self.segments.get(name)
            if dq is None:
                dq = self.segments[name] = collections.deque(maxlen=SAMPLES)
            dq.append(t1 - t0)

    def stages(self, pipeline_id: str) -> tuple[LatencyStats, list[StageLatency]]:
        e2e = latency_stats(self.end_to_end)
        out = []
        for name in sorted(self.segments, key=_segment_rank):
            stats = latency_stats(self.segments[name])
            info = _SEGMENT_BY_NAME.get(name)
            out.append(
                StageLatency(
                    stage=name,
                    process=process_of(name, pipeline_id) if info else "?",
                    kind=info.kind if info else "work",
                    latency=stats,
                    share=round(stats.mean_ms / e2e.mean_ms, 4) if e2e.mean_ms > 0 else 0.0,
                )
            )
        return e2e, out


def _segment_rank(name: str) -> int:
    try:
        return SEGMENT_ORDER.index(name)
    except ValueError:
        return len(SEGMENT_ORDER)


class _Rate:
    """Events per second over the trailing ``FPS_WINDOW_S``."""

    def __init__(self) -> None:
        self.times: collections.deque[int] = collections.deque(maxlen=1024)
        self.total = 0

    def tick(self, now_ns: int) -> None:
        self.times.append(now_ns)
        self.total += 1

    def per_second(self, now_ns: int) -> float:
        horizon = now_ns - int(FPS_WINDOW_S * 1e9)
        recent = [t for t in self.times if t >= horizon]
        if len(recent) < 2:
            return 0.0
        span = max(now_ns - recent[0], recent[-1] - recent[0])
        return round((len(recent) - 1) / (span / 1e9), 2) if span > 0 else 0.0


@dataclass
class _SessionState:
    session_id: str
    pipeline_id: str
    mode: str
    stages: list[str]
    opened_ns: int
    samples: _Samples = field(default_factory=_Samples)
    rate_in: _Rate = field(default_factory=_Rate)
    rate_out: _Rate = field(default_factory=_Rate)
    drops: collections.Counter[str] = field(default_factory=collections.Counter)


@dataclass
class _PipelineState:
    samples: _Samples = field(default_factory=_Samples)
    frames_out: int = 0
    drops: collections.Counter[str] = field(default_factory=collections.Counter)


class MetricsAggregator:
    """Everything signalling knows about its frames' timing. Call from the event loop only."""

    def __init__(self, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        self.sessions: dict[str, _SessionState] = {}
        self.pipelines: dict[str, _PipelineState] = {}
        self.traces: collections.deque[TraceRecord] = collections.deque(maxlen=TRACE_BUFFER)
        self.trace_seq = 0
        self.last_status: p.StatusReport | None = None
        self._stage_hist = Histogram(
            "dreamwire_stage_latency_seconds",
            "Time a frame spends in one stage (segment between two timestamps)",
            ["pipeline", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._e2e_hist = Histogram(
            "dreamwire_frame_latency_seconds",
            "Server-side latency: RTP arrival (or generation start) to RTP departure",
            ["pipeline"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self._frames_in = Counter(
            "dreamwire_frames_in", "Encoded frames received", ["pipeline"], registry=self.registry
        )
        self._frames_out = Counter(
            "dreamwire_frames_out", "Frames sent", ["pipeline"], registry=self.registry
        )
        self._drops = Counter(
            "dreamwire_frames_dropped",
            "Frames dropped, by the stage that dropped them (signalling's own counts)",
            ["pipeline", "stage"],
            registry=self.registry,
        )
        self._hist_children: dict[tuple[str, str], object] = {}
        self.registry.register(_StatusCollector(self))

    # -------------------------------------------------------------- events (sessions.py)

    def session_opened(
        self, session_id: str, pipeline_id: str, mode: str, stages: list[str]
    ) -> None:
        self.sessions[session_id] = _SessionState(
            session_id, pipeline_id, mode, list(stages), self.clock()
        )
        self.pipelines.setdefault(pipeline_id, _PipelineState())

    def session_closed(self, session_id: str) -> None:
        self.sessions.pop(session_id, None)

    def frame_in(self, session_id: str, forwarded: bool = True) -> None:
        """An encoded frame came off the network (``forwarded``: decode's inbox took it)."""
        state = self.sessions.get(session_id)
        if state is None:
            return
        state.rate_in.tick(self.clock())
        self._frames_in.labels(state.pipeline_id).inc()
        if not forwarded:
            self.dropped(session_id, "to_decode")

    def dropped(self, session_id: str, stage: str, count: int = 1) -> None:
        state = self.sessions.get(session_id)
        if state is None:
            return
        state.drops[stage] += count
        self.pipelines[state.pipeline_id].drops[stage] += count
        self._drops.labels(state.pipeline_id, stage).inc(count)

    def departure_callback(
        self, session_id: str, frame_number: int, stamps: Sequence[int]
    ) -> Callable[[bool], None]:
        """For ``EncodedVideoTrack.push(on_done=…)``: stamps RTP departure when sent."""

        def on_done(sent: bool) -> None:
            if sent:
                trace = list(stamps)
                trace[Stage.RTP_DEPARTURE] = self.clock()
                self.frame_departed(session_id, frame_number, trace)
            else:
                self.dropped(session_id, "send")

        return on_done

    def frame_departed(self, session_id: str, frame_number: int, stamps: Sequence[int]) -> None:
        """A frame's last RTP packet left: record its complete trace."""
        state = self.sessions.get(session_id)
        if state is None:
            return
        now = self.clock()
        state.rate_out.tick(now)
        pipe = self.pipelines[state.pipeline_id]
        pipe.frames_out += 1
        self._frames_out.labels(state.pipeline_id).inc()
        e2e = end_to_end_ns(stamps)
        present = present_stamps(stamps)
        self.trace_seq += 1
        self.traces.append(
            TraceRecord(
                seq=self.trace_seq,
                session_id=session_id,
                pipeline_id=state.pipeline_id,
                frame_number=frame_number,
                stamps={_STAGE_NAMES[s]: t for s, t in present},
            )
        )
        if e2e is None:
            return
        spans = segments(stamps)
        state.samples.add(e2e, spans)
        pipe.samples.add(e2e, spans)
        self._e2e_hist.labels(state.pipeline_id).observe(e2e / 1e9)
        for name, t0, t1 in spans:
            key = (state.pipeline_id, name)
            child = self._hist_children.get(key)
            if child is None:
                child = self._hist_children[key] = self._stage_hist.labels(*key)
            child.observe((t1 - t0) / 1e9)  # type: ignore[attr-defined]

    # -------------------------------------------------------------- reading

    def traces_after(self, after: int, limit: int = TRACE_BUFFER) -> TraceFeed:
        if after > self.trace_seq:
            after = 0  # a feed from an earlier signalling process: start over
        traces = self.traces
        oldest = traces[0].seq if traces else self.trace_seq + 1
        missed = max(0, oldest - after - 1) if traces else 0
        start = max(0, after + 1 - oldest)
        picked = [traces[i] for i in range(start, min(len(traces), start + limit))]
        return TraceFeed(next=picked[-1].seq if picked else after, missed=missed, traces=picked)

    def report(
        self, status: p.StatusReport | None = None, session_id: str | None = None
    ) -> MetricsReport:
        """The JSON report; ``session_id`` limits it to one session (KeyError if unknown)."""
        if status is not None:
            self.last_status = status
        now = self.clock()
        if session_id is not None:
            chosen = [self.sessions[session_id]]
        else:
            chosen = list(self.sessions.values())
        rings = _rings_by_session(status)
        sessions = [self._session_metrics(s, now, rings.get(s.session_id, [])) for s in chosen]
        pipeline_ids = [chosen[0].pipeline_id] if session_id is not None else sorted(self.pipelines)
        pipelines = []
        for pid in pipeline_ids:
            pipe = self.pipelines[pid]
            e2e, stages = pipe.samples.stages(pid)
            live = [s for s in self.sessions.values() if s.pipeline_id == pid]
            pipelines.append(
                PipelineMetrics(
                    pipeline_id=pid,
                    sessions=len(live),
                    frames_out=pipe.frames_out,
                    fps_out=round(sum(s.rate_out.per_second(now) for s in live), 2),
                    end_to_end=e2e,
                    stages=stages,
                    drops=dict(pipe.drops)
                    | _ring_drops([r for s in live for r in rings.get(s.session_id, [])]),
                )
            )
        return MetricsReport(
            time=time.time(),
            window_frames=SAMPLES,
            stage_order=list(SEGMENT_ORDER),
            sessions=sessions,
            pipelines=pipelines,
            processes=_processes(status),
            trace_seq=self.trace_seq,
        )

    def _session_metrics(
        self, s: _SessionState, now: int, rings: list[RingMetrics]
    ) -> SessionMetrics:
        e2e, stages = s.samples.stages(s.pipeline_id)
        drops = dict(s.drops)
        for stage, n in _ring_drops(rings).items():
            drops[stage] = drops.get(stage, 0) + n
        return SessionMetrics(
            session_id=s.session_id,
            pipeline_id=s.pipeline_id,
            mode=s.mode,
            age_s=round((now - s.opened_ns) / 1e9, 3),
            frames_in=s.rate_in.total,
            frames_out=s.rate_out.total,
            fps_in=s.rate_in.per_second(now),
            fps_out=s.rate_out.per_second(now),
            end_to_end=e2e,
            stages=stages,
            drops=drops,
            rings=rings,
        )


def _queue_segment(consumer: str) -> str:
    """The wait segment in front of a service: drops in its input ring are counted there."""
    kind = consumer.split("/", 1)[0]
    return f"to_{kind}"


def _ring_drops(rings: list[RingMetrics]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rings:
        lost = r.skipped + r.torn
        if lost:
            key = _queue_segment(r.consumer)
            out[key] = out.get(key, 0) + lost
    return out


def _rings_by_session(status: p.StatusReport | None) -> dict[str, list[RingMetrics]]:
    out: dict[str, list[RingMetrics]] = {}
    if status is None:
        return out
    for r in status.rings:
        out.setdefault(r.session_id, []).append(
            RingMetrics(**{name: getattr(r, name) for name in RingMetrics.__struct_fields__})
        )
    return out


def _processes(status: p.StatusReport | None) -> list[ProcessMetrics]:
    if status is None:
        return []
    return [
        ProcessMetrics(
            name=s.name,
            pid=s.pid,
            state=s.state,
            cpu_percent=s.cpu_percent,
            rss_bytes=s.rss_bytes,
            gpu_memory_bytes=s.gpu_memory_bytes,
            frames_done=s.frames_done,
            restarts=s.restarts,
            stage_ms=s.stage_ms,
        )
        for s in status.services
    ]


class _StatusCollector(Collector):
    """Gauges from the supervisor's last status (per-process resources, ring counters)."""

    def __init__(self, metrics: MetricsAggregator) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # collected lazily from the last status; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        sessions = GaugeMetricFamily(
            "dreamwire_sessions", "Live WebRTC sessions", labels=["pipeline"]
        )
        counts = collections.Counter(s.pipeline_id for s in m.sessions.values())
        for pid in sorted(m.pipelines):
            sessions.add_metric([pid], counts.get(pid, 0))
        yield sessions
        status = m.last_status
        if status is None:
            return
        cpu = GaugeMetricFamily(
            "dreamwire_process_cpu_percent",
            "CPU use per process (100 = one core)",
            labels=["process"],
        )
        rss = GaugeMetricFamily(
            "dreamwire_process_resident_memory_bytes", "Resident memory", labels=["process"]
        )
        gpu = GaugeMetricFamily(
            "dreamwire_process_gpu_memory_bytes", "GPU memory (nvidia-smi)", labels=["process"]
        )
        stages = GaugeMetricFamily(
            "dreamwire_block_stage_seconds",
            "A split block loop: recent median time a block spends in each stage",
            labels=["process", "stage"],
        )
        for s in status.services:
            for stage, ms in sorted(s.stage_ms.items()):
                stages.add_metric([s.name, stage], ms / 1000.0)
            cpu.add_metric([s.name], s.cpu_percent)
            rss.add_metric([s.name], s.rss_bytes)
            if s.gpu_memory_bytes is not None:
                gpu.add_metric([s.name], s.gpu_memory_bytes)
        yield cpu
        yield rss
        yield gpu
        yield stages
        frames = CounterMetricFamily(
            "dreamwire_ring_frames",
            "Frames through each session's rings, by outcome",
            labels=["session", "consumer", "outcome"],
        )
        pending = GaugeMetricFamily(
            "dreamwire_ring_pending",
            "Frames waiting in a ring for its consumer (0 or 1: latest wins)",
            labels=["session", "consumer"],
        )
        for r in status.rings:
            for outcome in ("published", "consumed", "skipped", "torn"):
                frames.add_metric([r.session_id, r.consumer, outcome], getattr(r, outcome))
            pending.add_metric([r.session_id, r.consumer], r.pending)
        yield frames
        yield pending
