"""The JSON shapes of the metrics endpoints (``signalling.metrics_routes``).

``GET /api/v1/metrics`` answers :class:`MetricsReport`; ``GET /api/v1/metrics/traces`` answers
:class:`TraceFeed`. Latencies are milliseconds; stage names and their meaning are
``signalling.metrics.SEGMENTS`` (``receive``, ``to_decode``, ``decode``, ``to_inference``,
``inference_in``, ``model``, ``inference_out``, ``to_overlay``, ``overlay``, ``to_encode``,
``encode``, ``send``). A stage list is in pipeline order and its ``mean_ms`` values add up to
``end_to_end.mean_ms`` (percentiles do not add up; means do), which makes a stacked bar of the
means an honest picture of where the milliseconds go.
"""

from __future__ import annotations

import msgspec

from services.protocol import RingCounters


class LatencyStats(msgspec.Struct, forbid_unknown_fields=True):
    """Latency over the last ``count`` frames, milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float


class StageLatency(msgspec.Struct, forbid_unknown_fields=True):
    """One segment of the frame's life (see the module docstring)."""

    stage: str
    process: str
    kind: str  # "work" | "queue"
    latency: LatencyStats
    #: This stage's share of the end-to-end mean (stage means add up to it).
    share: float


class RingMetrics(RingCounters, forbid_unknown_fields=True):
    """A shared-memory ring between two stages (counters since the session opened)."""


class SessionMetrics(msgspec.Struct, forbid_unknown_fields=True):
    session_id: str
    pipeline_id: str
    mode: str  # "video" | "text"
    age_s: float
    frames_in: int
    frames_out: int
    fps_in: float
    fps_out: float
    #: Server side: RTP arrival (or generation start) → RTP departure.
    end_to_end: LatencyStats
    #: In pipeline order; their means add up to ``end_to_end.mean_ms``.
    stages: list[StageLatency]
    #: Frames lost, by the stage (segment) where they were dropped.
    drops: dict[str, int]
    rings: list[RingMetrics]


class PipelineMetrics(msgspec.Struct, forbid_unknown_fields=True):
    """Every session of one pipeline, including closed ones (last ``SAMPLES`` frames)."""

    pipeline_id: str
    sessions: int
    frames_out: int
    fps_out: float
    end_to_end: LatencyStats
    stages: list[StageLatency]
    drops: dict[str, int]


class ProcessMetrics(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    pid: int | None
    state: str
    cpu_percent: float
    rss_bytes: int
    #: Only where ``nvidia-smi`` reports the process.
    gpu_memory_bytes: int | None
    frames_done: int
    restarts: int
    #: A split block loop's ms a block spends in each stage (encode, transformer, decode).
    stage_ms: dict[str, float] = {}


class MetricsReport(msgspec.Struct, forbid_unknown_fields=True):
    """``GET /api/v1/metrics`` (``?session=<id>``: that session only)."""

    #: Unix time of this report.
    time: float
    #: The samples behind the percentiles: at most this many frames per session/pipeline.
    window_frames: int
    #: Every stage name, in pipeline order (chart series order).
    stage_order: list[str]
    sessions: list[SessionMetrics]
    pipelines: list[PipelineMetrics]
    processes: list[ProcessMetrics]
    #: The newest trace's sequence number (``/api/v1/metrics/traces?after=``).
    trace_seq: int


class TraceRecord(msgspec.Struct, forbid_unknown_fields=True):
    """One departed frame: its stamps by stage name (``rtp_arrival`` …), monotonic ns."""

    seq: int
    session_id: str
    pipeline_id: str
    frame_number: int
    stamps: dict[str, int]


class TraceFeed(msgspec.Struct, forbid_unknown_fields=True):
    """``GET /api/v1/metrics/traces?after=<seq>``: traces newer than ``after``, oldest first."""

    #: Pass this as ``after`` next time.
    next: int
    #: Traces newer than ``after`` that were already evicted from the buffer.
    missed: int
    traces: list[TraceRecord]
