"""What the HTTP API needs from the rest of signalling.

The handlers in ``routes.py`` only validate, delegate to an ``ApiBackend`` and encode; they hold
no state. The real backend (supervisor link, WebRTC sessions) lives elsewhere; tests use a small
in-memory one. Refusals are raised as the ``ApiError`` subclasses in ``errors.py``; any other
exception becomes a logged 500.
"""

from __future__ import annotations

from typing import Any, Protocol

from signalling.api.types import (
    HardwareInfoResponse,
    IceCandidate,
    ModelsStatusResponse,
    PipelineLoadItem,
    PipelineStatusResponse,
    WebRtcOfferRequest,
    WebRtcOfferResponse,
)

__all__ = ["ApiBackend"]


class ApiBackend(Protocol):
    async def load_pipelines(self, items: list[PipelineLoadItem]) -> None:
        """Start loading these pipelines and return without waiting for the load (clients poll
        ``pipeline_status``). May raise ``UnknownPipeline`` or ``InvalidParameters`` for what
        can be checked at once; failures during the load show up as status ``error``."""
        ...

    async def pipeline_status(self) -> PipelineStatusResponse: ...

    async def pipeline_schemas(self) -> dict[str, dict[str, Any]]:
        """Pipeline id -> metadata and config JSON Schema (with ``ui`` hints)."""
        ...

    async def create_session(self, offer: WebRtcOfferRequest) -> WebRtcOfferResponse:
        """Create a session from an offer (``offer.type == "offer"`` already checked).
        Raises ``NoPipelineLoaded``, ``ConcurrencyLimitReached``, ``InvalidSdp`` or
        ``InvalidParameters`` (bad ``initialParameters``)."""
        ...

    async def add_ice_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        """Trickle ICE. Raises ``UnknownSession``."""
        ...

    async def close_session(self, session_id: str) -> None:
        """End a session and free its resources. Raises ``UnknownSession``."""
        ...

    async def models_status(self, pipeline_id: str) -> ModelsStatusResponse:
        """Raises ``UnknownPipeline``."""
        ...

    async def download_models(self, pipeline_id: str) -> None:
        """Start downloading, return at once. Raises ``UnknownPipeline``,
        ``DownloadInProgress``."""
        ...

    async def hardware_info(self) -> HardwareInfoResponse: ...

    async def health(self) -> tuple[bool, dict[str, Any]]:
        """(every stage alive and making progress, per-stage detail for the body)."""
        ...
