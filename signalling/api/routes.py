"""Scope's HTTP API on aiohttp: validate with msgspec, delegate to an ``ApiBackend``, encode.

Mount on an application before it starts::

    app = web.Application()
    add_api_routes(app, backend, ApiConfig())

or take a ready application with ``create_api_app(backend, config)``. Handlers keep no state of
their own: everything lives in ``app[API_STATE]``.

Error answers are JSON ``{"error": code, "detail": text}`` (``ErrorResponse``): 400 for
malformed JSON (msgspec's message) or a wrong shape (msgspec's message, naming the field path
such as ``$.pipeline_id``), for an unusable SDP and for an offer before a pipeline is loaded
(Scope answers that one 400 too); 404 for an unknown session or pipeline; 413 for a body over
``ApiConfig.max_body_bytes``; 500 for anything unexpected (logged with its traceback). An offer
over the session limit answers 429 with FastRTC's body
``{"status": "failed", "meta": {"error": "concurrency_limit_reached", "limit": N}}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import msgspec
from aiohttp import web

from signalling.api.backend import ApiBackend
from signalling.api.config import ApiConfig
from signalling.api.cors import cors_middleware
from signalling.api.errors import BadRequest, InvalidSdp
from signalling.api.ice import IceServerProvider
from signalling.api.openapi import (
    HTML,
    Operation,
    QueryParam,
    Resp,
    build_openapi,
    render_docs_html,
)
from signalling.api.state import (
    API_STATE,
    ApiState,
    Handler,
    StudioState,
    api_state,
    decode_body,
    error_response,
    guarded,
    json_response,
)
from signalling.api.studio import studio_operations
from signalling.api.types import (
    ConcurrencyLimitResponse,
    DownloadModelsRequest,
    ErrorResponse,
    HardwareInfoResponse,
    HealthResponse,
    IceCandidateRequest,
    IceServersResponse,
    MessageResponse,
    ModelsStatusResponse,
    PipelineLoadRequest,
    PipelineSchemasResponse,
    PipelineStatusResponse,
    WebRtcOfferRequest,
    WebRtcOfferResponse,
)

__all__ = [
    "API_STATE",
    "ApiState",
    "StudioState",
    "add_api_routes",
    "api_operations",
    "create_api_app",
    "json_errors_middleware",
]

logger = logging.getLogger(__name__)

API_TITLE = "dreamwire (Daydream Scope API)"
JSON_ERROR_PREFIXES = ("/api/", "/health", "/openapi.json", "/docs")

# --- decoders (immutable, one per request type) ----------------------------------------------

_LOAD = msgspec.json.Decoder(PipelineLoadRequest)
_OFFER = msgspec.json.Decoder(WebRtcOfferRequest)
_CANDIDATES = msgspec.json.Decoder(IceCandidateRequest)
_DOWNLOAD = msgspec.json.Decoder(DownloadModelsRequest)


# --- handlers --------------------------------------------------------------------------------


@guarded
async def health(request: web.Request) -> web.StreamResponse:
    state = api_state(request)
    ok, detail = await state.backend.health()
    body = HealthResponse(
        status="healthy" if ok else "unhealthy",
        timestamp=datetime.now().isoformat(),
        server_start_time=state.started_at,
        version=state.version,
        detail=detail,
    )
    return json_response(body, 200 if ok else 503)


@guarded
async def load_pipeline(request: web.Request) -> web.StreamResponse:
    body = await decode_body(request, _LOAD)
    try:
        items = body.items()
    except ValueError as exc:
        raise BadRequest(str(exc)) from None
    await api_state(request).backend.load_pipelines(items)
    return json_response(MessageResponse(message="Pipeline loading initiated successfully"))


@guarded
async def pipeline_status(request: web.Request) -> web.StreamResponse:
    return json_response(await api_state(request).backend.pipeline_status())


@guarded
async def pipeline_schemas(request: web.Request) -> web.StreamResponse:
    schemas = await api_state(request).backend.pipeline_schemas()
    return json_response(PipelineSchemasResponse(pipelines=schemas))


@guarded
async def ice_servers(request: web.Request) -> web.StreamResponse:
    return json_response(IceServersResponse(iceServers=await api_state(request).ice.ice_servers()))


@guarded
async def webrtc_offer(request: web.Request) -> web.StreamResponse:
    offer = await decode_body(request, _OFFER)
    if not offer.sdp.strip():
        raise InvalidSdp("SDP is empty - at `$.sdp`")
    return json_response(await api_state(request).backend.create_session(offer))


@guarded
async def add_ice_candidates(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["sessionId"]
    body = await decode_body(request, _CANDIDATES)
    await api_state(request).backend.add_ice_candidates(session_id, body.candidates)
    return web.Response(status=204)


@guarded
async def close_session(request: web.Request) -> web.StreamResponse:
    await api_state(request).backend.close_session(request.match_info["sessionId"])
    return web.Response(status=204)


@guarded
async def models_status(request: web.Request) -> web.StreamResponse:
    pipeline_id = request.query.get("pipeline_id", "")
    if not pipeline_id:
        raise BadRequest("Missing required query parameter `pipeline_id`")
    return json_response(await api_state(request).backend.models_status(pipeline_id))


@guarded
async def download_models(request: web.Request) -> web.StreamResponse:
    body = await decode_body(request, _DOWNLOAD)
    await api_state(request).backend.download_models(body.pipeline_id)
    return json_response(MessageResponse(message=f"Model download started for {body.pipeline_id}"))


@guarded
async def hardware_info(request: web.Request) -> web.StreamResponse:
    return json_response(await api_state(request).backend.hardware_info())


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=api_state(request).openapi_json, content_type="application/json")


async def docs(request: web.Request) -> web.StreamResponse:
    return web.Response(text=api_state(request).docs_html, content_type="text/html")


# --- the route table -------------------------------------------------------------------------


def _err(description: str) -> Resp:
    return Resp(description, ErrorResponse)


def api_operations() -> list[Operation]:
    """Every route, with what it takes and answers; registered and documented from here."""
    return [
        Operation(
            "GET",
            "/health",
            health,
            "Health of the server and every stage",
            "system",
            responses={
                200: Resp("Every stage alive and making progress", HealthResponse),
                503: Resp("A stage is stale or down", HealthResponse),
            },
        ),
        Operation(
            "POST",
            "/api/v1/pipeline/load",
            load_pipeline,
            "Start loading one or more pipelines (returns at once; poll the status)",
            "pipelines",
            request=PipelineLoadRequest,
            responses={
                200: Resp("Loading started", MessageResponse),
                404: _err("Unknown pipeline"),
            },
            description="Body: {pipeline_id, load_params} or {pipelines: [{pipeline_id, "
            "load_params}, ...]} or {pipeline_ids: [...], load_params}.",
        ),
        Operation(
            "GET",
            "/api/v1/pipeline/status",
            pipeline_status,
            "Pipeline status: not_loaded | loading | loaded | error",
            "pipelines",
            responses={200: Resp("Current status", PipelineStatusResponse)},
        ),
        Operation(
            "GET",
            "/api/v1/pipelines/schemas",
            pipeline_schemas,
            "Config JSON Schema (with UI hints) of every available pipeline",
            "pipelines",
            responses={200: Resp("Schemas by pipeline id", PipelineSchemasResponse)},
        ),
        Operation(
            "GET",
            "/api/v1/webrtc/ice-servers",
            ice_servers,
            "ICE servers for RTCPeerConnection (STUN, and TURN when configured)",
            "webrtc",
            responses={200: Resp("ICE servers", IceServersResponse)},
        ),
        Operation(
            "POST",
            "/api/v1/webrtc/offer",
            webrtc_offer,
            "Start a session from an SDP offer; answers the SDP answer and a sessionId",
            "webrtc",
            request=WebRtcOfferRequest,
            responses={
                200: Resp("SDP answer", WebRtcOfferResponse),
                400: _err("Malformed body, unusable SDP, or no pipeline loaded"),
                429: Resp("Concurrency limit reached (FastRTC's body)", ConcurrencyLimitResponse),
                503: _err("No room for the session's frames now (shared memory)"),
            },
        ),
        Operation(
            "PATCH",
            "/api/v1/webrtc/offer/{sessionId}",
            add_ice_candidates,
            "Add trickled ICE candidates to a session",
            "webrtc",
            request=IceCandidateRequest,
            responses={204: Resp("Candidates added"), 404: _err("Unknown session")},
        ),
        Operation(
            "DELETE",
            "/api/v1/webrtc/offer/{sessionId}",
            close_session,
            "End a session",
            "webrtc",
            responses={204: Resp("Session ended"), 404: _err("Unknown session")},
        ),
        Operation(
            "GET",
            "/api/v1/models/status",
            models_status,
            "Whether a pipeline's models are downloaded, with progress while downloading",
            "models",
            query=(QueryParam("pipeline_id", "Pipeline whose models to check"),),
            responses={
                200: Resp("Download status", ModelsStatusResponse),
                400: _err("Missing pipeline_id"),
                404: _err("Unknown pipeline"),
            },
        ),
        Operation(
            "POST",
            "/api/v1/models/download",
            download_models,
            "Start downloading a pipeline's models (returns at once; poll the status)",
            "models",
            request=DownloadModelsRequest,
            responses={
                200: Resp("Download started", MessageResponse),
                404: _err("Unknown pipeline"),
                409: _err("A download for this pipeline is already running"),
            },
        ),
        Operation(
            "GET",
            "/api/v1/hardware/info",
            hardware_info,
            "Hardware information (VRAM)",
            "system",
            responses={200: Resp("Hardware information", HardwareInfoResponse)},
        ),
        Operation(
            "GET",
            "/openapi.json",
            openapi_json,
            "This API as an OpenAPI 3.1 document",
            "docs",
            responses={200: Resp("OpenAPI document", dict[str, Any])},
        ),
        Operation(
            "GET",
            "/docs",
            docs,
            "This API as a readable HTML page",
            "docs",
            responses={200: Resp("HTML page", str, HTML)},
        ),
    ]


# --- mounting --------------------------------------------------------------------------------


@web.middleware
async def json_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 4xx/5xx (unknown route, wrong method) as JSON under the API's paths."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or not request.path.startswith(JSON_ERROR_PREFIXES):
            raise
        code = exc.reason.lower().replace(" ", "_")
        response = error_response(exc.status, code, exc.text or exc.reason)
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response


def _package_version() -> str:
    try:
        return version("dreamwire")
    except PackageNotFoundError:
        return "unknown"


def add_api_routes(
    app: web.Application,
    backend: ApiBackend,
    config: ApiConfig | None = None,
    *,
    ice: IceServerProvider | None = None,
    install_middlewares: bool = True,
    studio: StudioState | None = None,
    extra: Sequence[Operation] = (),
) -> ApiState:
    """Register every API route on ``app`` (not yet started) and keep the state in
    ``app[API_STATE]``. With ``install_middlewares`` also adds CORS and JSON error answers.
    An ``IceServerProvider`` is made from ``config.ice`` unless given; it is closed on the
    app's cleanup either way.

    The body limit is ``config.max_body_bytes``; the app's own ``client_max_size`` must not be
    smaller (``create_api_app`` sets it). ``studio`` says where the routes of Scope's UI find
    the dreamwire home, the models and the log (nothing on disk without it). ``extra``:
    routes of the rest of signalling, served and documented with these."""
    config = config or ApiConfig()
    provider = ice if ice is not None else IceServerProvider(config.ice)
    state = ApiState(
        backend=backend,
        ice=provider,
        max_body_bytes=config.max_body_bytes,
        started_at=time.time(),
        version=_package_version(),
        studio=studio or StudioState(),
    )
    operations = [*api_operations(), *studio_operations(), *extra]
    document = build_openapi(operations, title=API_TITLE, version=state.version)
    state.openapi_json = msgspec.json.encode(document)
    state.docs_html = render_docs_html(document)
    app[API_STATE] = state
    for op in operations:
        app.router.add_route(op.method, op.path, op.handler, name=op.operation_id)
        if op.method == "GET" and not op.streams:
            app.router.add_route("HEAD", op.path, op.handler)
    if install_middlewares:
        app.middlewares.append(cors_middleware(config.cors))
        app.middlewares.append(json_errors_middleware)

    async def close_ice(_app: web.Application) -> None:
        await provider.close()

    app.on_cleanup.append(close_ice)
    return state


def create_api_app(backend: ApiBackend, config: ApiConfig | None = None) -> web.Application:
    """A new application serving the API, with the body limit as its ``client_max_size``."""
    config = config or ApiConfig()
    app = web.Application(client_max_size=config.max_body_bytes)
    add_api_routes(app, backend, config)
    return app
