"""Request and response bodies of the Scope HTTP API, as msgspec Structs.

Field names are exactly those of Daydream Scope's API (``pipeline_id``, ``load_params``,
``iceServers``, ``initialParameters``, ``sessionId``, ``sdpMid``, ``sdpMLineIndex``), so Scope's
clients work unchanged. The same types validate requests, encode responses and generate the
OpenAPI document (``openapi.py``).

Unknown fields: request bodies *ignore* unknown fields. Scope validates with pydantic's default
(``extra="ignore"``), and real clients send extras (FastRTC-style clients add ``webrtc_id``,
newer Scope frontends add ``connection_id``/``user_id`` to a load). Refusing them would break a
client that works against Scope. Inter-process control messages are a different matter and keep
``forbid_unknown_fields=True`` (``services/protocol.py``).

Responses include ``null`` for unset optional fields, as FastAPI does for Scope, except the ICE
server entries: a browser turns ``username: null`` into the string ``"null"``, so those omit them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "ConcurrencyLimitMeta",
    "ConcurrencyLimitResponse",
    "DownloadModelsRequest",
    "ErrorResponse",
    "HardwareInfoResponse",
    "HealthResponse",
    "IceCandidate",
    "IceCandidateRequest",
    "IceServer",
    "IceServersResponse",
    "MessageResponse",
    "ModelsStatusResponse",
    "PipelineLoadItem",
    "PipelineLoadRequest",
    "PipelineSchemasResponse",
    "PipelineStatus",
    "PipelineStatusResponse",
    "WebRtcOfferRequest",
    "WebRtcOfferResponse",
]

JsonObject = dict[str, Any]
PipelineStatus = Literal["not_loaded", "loading", "loaded", "error"]


# --- pipelines -------------------------------------------------------------------------------


class PipelineLoadItem(msgspec.Struct, kw_only=True):
    """One pipeline to load, with its pipeline-specific load parameters."""

    pipeline_id: Annotated[str, msgspec.Meta(min_length=1, description="Pipeline to load")]
    load_params: Annotated[
        JsonObject | None,
        msgspec.Meta(description="Pipeline-specific load parameters (height, width, seed, ...)"),
    ] = None


class PipelineLoadRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /api/v1/pipeline/load``.

    Three equivalent shapes are accepted; exactly one must be used:

    - ``{"pipeline_id": "...", "load_params": {...}}`` (Scope's documented form),
    - ``{"pipelines": [{"pipeline_id": "...", "load_params": {...}}, ...]}``,
    - ``{"pipeline_ids": ["...", ...], "load_params": {...}}`` (newer Scope frontends; the same
      ``load_params`` apply to every listed pipeline).
    """

    pipeline_id: Annotated[str, msgspec.Meta(min_length=1)] | None = None
    load_params: JsonObject | None = None
    pipelines: Annotated[list[PipelineLoadItem], msgspec.Meta(min_length=1)] | None = None
    pipeline_ids: (
        Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(min_length=1)]
        | None
    ) = None

    def items(self) -> list[PipelineLoadItem]:
        """The pipelines to load, whatever shape was sent. Raises ``ValueError`` naming the
        problem when the body uses no shape, several shapes, or an empty list."""
        shapes = [
            name
            for name, value in (
                ("pipeline_id", self.pipeline_id),
                ("pipelines", self.pipelines),
                ("pipeline_ids", self.pipeline_ids),
            )
            if value is not None
        ]
        if not shapes:
            raise ValueError("Object missing required field `pipeline_id` (or `pipelines`)")
        if len(shapes) > 1:
            raise ValueError(
                "Give exactly one of `pipeline_id`, `pipelines`, `pipeline_ids`; got "
                + ", ".join(f"`{s}`" for s in shapes)
            )
        if self.pipeline_id is not None:
            return [PipelineLoadItem(pipeline_id=self.pipeline_id, load_params=self.load_params)]
        if self.pipelines is not None:
            if not self.pipelines:
                raise ValueError("`pipelines` must not be empty - at `$.pipelines`")
            if self.load_params is not None:
                raise ValueError(
                    "`load_params` goes inside each entry of `pipelines` - at `$.load_params`"
                )
            return list(self.pipelines)
        assert self.pipeline_ids is not None
        if not self.pipeline_ids:
            raise ValueError("`pipeline_ids` must not be empty - at `$.pipeline_ids`")
        return [
            PipelineLoadItem(pipeline_id=pid, load_params=self.load_params)
            for pid in self.pipeline_ids
        ]


class PipelineStatusResponse(msgspec.Struct, kw_only=True):
    """Body of ``GET /api/v1/pipeline/status``."""

    status: Annotated[
        PipelineStatus,
        msgspec.Meta(description="not_loaded | loading | loaded | error"),
    ]
    pipeline_id: str | None = None
    load_params: JsonObject | None = None
    loaded_lora_adapters: list[JsonObject] | None = None
    error: Annotated[str | None, msgspec.Meta(description="Error text when status is error")] = None
    #: Scope 0.2's spinner text; dreamwire's loads have no named stages.
    loading_stage: str | None = None
    produces_video: bool = True
    produces_audio: bool = False


class PipelineSchemasResponse(msgspec.Struct, kw_only=True):
    """Body of ``GET /api/v1/pipelines/schemas``: one entry per pipeline id, each holding the
    pipeline's metadata and its config JSON Schema (with ``ui`` hints per property)."""

    pipelines: dict[str, JsonObject]


class MessageResponse(msgspec.Struct, kw_only=True):
    """A one-line acknowledgement (pipeline load started, model download started)."""

    message: str


# --- WebRTC ----------------------------------------------------------------------------------


class IceServer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of ``RTCConfiguration.iceServers``."""

    urls: str | list[str]
    username: str | None = None
    credential: str | None = None


class IceServersResponse(msgspec.Struct, kw_only=True):
    """Body of ``GET /api/v1/webrtc/ice-servers``."""

    iceServers: list[IceServer]


class WebRtcOfferRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /api/v1/webrtc/offer``."""

    sdp: Annotated[str, msgspec.Meta(min_length=1, description="SDP offer")]
    type: Annotated[Literal["offer"], msgspec.Meta(description='SDP type: "offer"')]
    initialParameters: Annotated[
        JsonObject | None,
        msgspec.Meta(description="Parameters applied before the first frame (prompts, ...)"),
    ] = None


class WebRtcOfferResponse(msgspec.Struct, kw_only=True):
    """Answer to an offer; ``sessionId`` addresses the session in PATCH/DELETE."""

    sdp: str
    type: str
    sessionId: str


class IceCandidate(msgspec.Struct, kw_only=True):
    """One trickled ICE candidate, as ``RTCIceCandidate`` gives it."""

    candidate: str
    sdpMid: str | None = None
    sdpMLineIndex: Annotated[int, msgspec.Meta(ge=0)] | None = None


class IceCandidateRequest(msgspec.Struct, kw_only=True):
    """Body of ``PATCH /api/v1/webrtc/offer/{sessionId}`` (trickle ICE)."""

    candidates: list[IceCandidate]


class ConcurrencyLimitMeta(msgspec.Struct, kw_only=True):
    error: Literal["concurrency_limit_reached"] = "concurrency_limit_reached"
    limit: int


class ConcurrencyLimitResponse(msgspec.Struct, kw_only=True):
    """FastRTC's answer (HTTP 429) when an offer would exceed the session limit."""

    status: Literal["failed"] = "failed"
    meta: ConcurrencyLimitMeta


# --- models, hardware, health ----------------------------------------------------------------


class ModelsStatusResponse(msgspec.Struct, kw_only=True):
    """Body of ``GET /api/v1/models/status``."""

    downloaded: bool
    progress: Annotated[
        JsonObject | None, msgspec.Meta(description="Download progress while one runs")
    ] = None


class DownloadModelsRequest(msgspec.Struct, kw_only=True):
    """Body of ``POST /api/v1/models/download``."""

    pipeline_id: Annotated[str, msgspec.Meta(min_length=1)]


class Integration(msgspec.Struct, kw_only=True):
    """A video-sharing integration of Scope 0.2 (Spout, NDI, Syphon): none in dreamwire."""

    available: bool = False
    reason: str | None = None
    install_hint: str | None = None


def _missing(name: str) -> Integration:
    return Integration(
        reason=f"dreamwire has no {name} input or output; video comes and goes over WebRTC"
    )


class GpuInfo(msgspec.Struct, kw_only=True):
    """One GPU of the machine (nvidia-smi)."""

    index: int
    name: str
    memory_total_gb: float
    memory_free_gb: float


class HardwareInfoResponse(msgspec.Struct, kw_only=True):
    """Body of ``GET /api/v1/hardware/info``: Scope 0.1's flags and 0.2's integrations, and
    dreamwire's list of GPUs (one inference process per pipeline per GPU with ``devices``)."""

    vram_gb: Annotated[
        float | None, msgspec.Meta(description="Total VRAM of the first GPU; null without CUDA")
    ] = None
    gpus: list[GpuInfo] = []
    spout_available: bool = False
    ndi_available: bool = False
    spout: Integration = msgspec.field(default_factory=lambda: _missing("Spout"))
    ndi: Integration = msgspec.field(default_factory=lambda: _missing("NDI"))
    syphon: Integration = msgspec.field(default_factory=lambda: _missing("Syphon"))


class HealthResponse(msgspec.Struct, kw_only=True):
    """Body of ``GET /health`` (200 when healthy, 503 when a stage is stale or down)."""

    status: Literal["healthy", "unhealthy"]
    timestamp: Annotated[str, msgspec.Meta(description="ISO 8601, local time")]
    server_start_time: Annotated[float, msgspec.Meta(description="Unix time the server started")]
    version: str
    git_commit: Annotated[str, msgspec.Meta(description="Build commit, when known")] = "unknown"
    detail: Annotated[JsonObject, msgspec.Meta(description="Per-stage health from the backend")]


# --- errors ----------------------------------------------------------------------------------


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error answer except 429 on an offer. ``error`` is a stable machine-readable code,
    ``detail`` the human-readable reason (FastAPI clients read ``detail``)."""

    error: str
    detail: str
