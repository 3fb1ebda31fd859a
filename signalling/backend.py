"""The real ApiBackend: the supervisor, the sessions, the models."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, assert_never

import msgspec

from services import protocol as p
from services import topology
from services.inference.catalog import ParameterError, PipelineCatalog
from services.inference.lora_files import LoraFileError, lora_path
from signalling.api.errors import (
    ApiError,
    ConcurrencyLimitReached,
    InvalidParameters,
    InvalidSdp,
    NoPipelineLoaded,
    OutOfResources,
    UnknownPipeline,
    UnknownSession,
)
from signalling.api.types import (
    HardwareInfoResponse,
    IceCandidate,
    ModelsStatusResponse,
    PipelineLoadItem,
    PipelineStatusResponse,
    WebRtcOfferRequest,
    WebRtcOfferResponse,
)
from signalling.connections import DESCRIPTORS_LOW_SHARE, ConnectionGuard, descriptor_use
from signalling.intent import Intent, offer_modes, read_intent
from signalling.links import AdminLink
from signalling.models import ModelsLink
from signalling.recording_routes import start_recording
from signalling.recordings import Recordings
from signalling.sessions import SessionManager, SessionRefused
from signalling.webrtc.offer_limits import check_offer

logger = logging.getLogger(__name__)


class SignallingBackend:
    def __init__(
        self,
        admin: AdminLink,
        sessions: SessionManager,
        catalog: PipelineCatalog,
        models: ModelsLink,
        max_sessions: int,
        connections: ConnectionGuard | None = None,
        recordings: Recordings | None = None,
    ) -> None:
        self.admin = admin
        self.connections = connections
        self.recordings = recordings
        self.sessions = sessions
        self.catalog = catalog
        self.models = models
        self.max_sessions = max_sessions
        self.started = time.time()

    # ------------------------------------------------------------------ pipelines

    async def load_pipelines(self, items: list[PipelineLoadItem]) -> None:
        loads = []
        for item in items:
            pid = item.pipeline_id
            if not self.catalog.known(pid):
                raise UnknownPipeline(pid)
            sorted_params = self.catalog.sort((pid,), dict(item.load_params or {}), load=True)
            if sorted_params.errors:
                raise InvalidParameters(
                    "load_params." + "; load_params.".join(sorted_params.errors)
                )
            if sorted_params.unknown:  # Scope's UI sends height and width to every pipeline
                logger.info(
                    "load %s: ignoring load_params it does not have: %s",
                    pid,
                    ", ".join(sorted_params.unknown),
                )
            await self._check_loras(sorted_params.valid.get("loras"))
            loads.append(p.PipelineLoad(pid, sorted_params.valid, self.catalog.load_keys(pid)))
        reply = await self.admin.request(p.LoadPipelines(pipelines=loads))
        if isinstance(reply, p.Rejected):
            raise InvalidParameters(reply.reason)

    async def _check_loras(self, loras: list[dict[str, Any]] | None) -> None:
        """Each LoRA file a load names is checked here, before the running pipeline is
        touched (whether it fits the model is known only where the model is)."""
        for i, item in enumerate(loras or []):
            try:
                await asyncio.to_thread(lora_path, item["path"], self.models.models_dir)
            except LoraFileError as exc:
                raise InvalidParameters(f"load_params.loras[{i}].path: {exc}") from None

    async def pipeline_status(self) -> PipelineStatusResponse:
        states = (await self.admin.status()).pipelines
        if not states:
            return PipelineStatusResponse(status="not_loaded")
        # The first pipeline asked for is the one Scope's single-pipeline status describes;
        # an error in any of them is reported.
        state = next((s for s in states if s.status == "error"), states[0])
        if state.status == "loaded" and any(s.status == "loading" for s in states):
            state = next(s for s in states if s.status == "loading")
        # Scope's shape: every pipeline's LoRAs, once per path; null when there are none.
        adapters: dict[str, dict[str, Any]] = {}
        for s in states:
            for lora in s.loras:
                adapters.setdefault(lora.path, msgspec.to_builtins(lora))
        return PipelineStatusResponse(
            status=state.status,
            pipeline_id=state.pipeline_id,
            load_params=state.load_params,
            loaded_lora_adapters=list(adapters.values()) or None,
            error=state.error,
        )

    async def pipeline_schemas(self) -> dict[str, dict[str, Any]]:
        return self.catalog.schemas()

    # ------------------------------------------------------------------ sessions

    async def create_session(self, offer: WebRtcOfferRequest) -> WebRtcOfferResponse:
        try:
            check_offer(offer.sdp)  # before aiortc: its parsing blocks the event loop
        except ParameterError as exc:
            raise InvalidSdp(str(exc)) from None
        params = dict(offer.initialParameters or {})
        try:
            intent = read_intent(params)
        except ParameterError as exc:
            raise InvalidParameters(f"initialParameters.{exc}") from None
        if not self.sessions.reserve(self.max_sessions):
            raise ConcurrencyLimitReached(self.max_sessions)
        try:
            return await self._create_session(offer, intent, params)
        finally:
            self.sessions.release()

    async def _create_session(
        self, offer: WebRtcOfferRequest, intent: Intent, params: dict[str, Any]
    ) -> WebRtcOfferResponse:
        modes = offer_modes(offer.sdp, intent.mode)
        try:
            session_id, answer = await self.sessions.create(
                offer.sdp,
                intent.pipeline_ids,
                modes,
                params,
                nodes=intent.nodes,
                record_nodes=intent.record_nodes,
            )
        except SessionRefused as exc:
            match exc.why:
                case "unavailable":
                    raise OutOfResources(str(exc)) from None
                case "invalid":
                    raise InvalidParameters(str(exc)) from None
                case "not_loaded" | "refused":
                    raise NoPipelineLoaded(str(exc)) from None
                case _:
                    assert_never(exc.why)
        except ValueError as exc:
            raise InvalidSdp(f"invalid SDP offer: {exc}") from None
        if intent.recording and not intent.record_nodes and self.recordings is not None:
            self._record_from_start(session_id)
        return WebRtcOfferResponse(sdp=answer.sdp, type=answer.type, sessionId=session_id)

    def _record_from_start(self, session_id: str) -> None:
        """``initialParameters.recording``: the session records from its first frame; a
        recording that cannot start is reported on the data channel, the session goes on."""
        assert self.recordings is not None
        session = self.sessions.sessions[session_id]
        try:
            start_recording(self.recordings, session)
        except ApiError as exc:
            session.send_message({"type": "warning", "data": f"recording: {exc}"})

    async def add_ice_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        if session_id not in self.sessions.sessions:
            raise UnknownSession(session_id)
        try:
            await self.sessions.add_candidates(session_id, candidates)
        except ValueError as exc:
            raise InvalidParameters(str(exc)) from None

    async def close_session(self, session_id: str) -> None:
        if not await self.sessions.close(session_id):
            raise UnknownSession(session_id)

    # ------------------------------------------------------------------ models, hardware

    async def models_status(self, pipeline_id: str) -> ModelsStatusResponse:
        if not self.catalog.known(pipeline_id):
            raise UnknownPipeline(pipeline_id)
        return self.models.status(pipeline_id)

    async def download_models(self, pipeline_id: str) -> None:
        if not self.catalog.known(pipeline_id):
            raise UnknownPipeline(pipeline_id)
        self.models.start_download(pipeline_id)

    async def hardware_info(self) -> HardwareInfoResponse:
        return self.models.hardware_info()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        report = await self.admin.status()
        services = {s.name: s.state for s in report.services}
        # A pipeline still loading is not ill health; one that failed to load is.
        errors = {
            s.pipeline_id: s.error or "failed" for s in report.pipelines if s.status == "error"
        }
        ok = not errors and all(
            state == "ready" or topology.StageAddress.parse(name).kind == topology.INFERENCE
            for name, state in services.items()
        )
        detail: dict[str, Any] = {"services": services, "sessions": len(self.sessions)}
        if errors:
            detail["pipeline_errors"] = errors
        used, limit = descriptor_use()
        detail["file_descriptors"] = {"open": used, "limit": limit}
        if used >= DESCRIPTORS_LOW_SHARE * limit:
            ok = False
            detail["file_descriptors"]["problem"] = (
                f"signalling has {used} of its {limit} file descriptors open: new connections "
                "and sessions will fail"
            )
        if self.connections is not None:
            detail["connections"] = self.connections.stats()
        return ok, detail
