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

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from signalling.api.backend import ApiBackend
from signalling.api.config import ApiConfig
from signalling.api.cors import cors_middleware
from signalling.api.errors import ApiError, ConcurrencyLimitReached, InvalidSdp
from signalling.api.ice import IceServerProvider
from signalling.api.openapi import (
    HTML,
    Operation,
    QueryParam,
    Resp,
    build_openapi,
    render_docs_html,
)
from signalling.api.types import (
    ConcurrencyLimitMeta,
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
    "add_api_routes",
    "api_operations",
    "create_api_app",
    "json_errors_middleware",
]

logger = logging.getLogger(__name__)

API_TITLE = "dreamwire (Daydream Scope API)"
JSON_ERROR_PREFIXES = ("/api/", "/health", "/openapi.json", "/docs")

T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class ApiState:
    backend: ApiBackend
    ice: IceServerProvider
    max_body_bytes: int
    started_at: float
    version: str
    openapi_json: bytes = b""
    docs_html: str = ""


API_STATE: web.AppKey[ApiState] = web.AppKey("dreamwire_api_state")

_ENCODER = msgspec.json.Encoder()


class _BadRequest(ApiError):
    status = 400
    code = "invalid_request"


class _MalformedJson(ApiError):
    status = 400
    code = "invalid_json"


class _PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_ENCODER.encode(obj), content_type="application/json")


def _error(status: int, code: str, detail: str) -> web.Response:
    return _json(ErrorResponse(error=code, detail=detail), status)


def _state(request: web.Request) -> ApiState:
    return request.config_dict[API_STATE]


async def _decode(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    limit = _state(request).max_body_bytes
    too_large = _PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(body) > limit:
        raise too_large
    if not body.strip():
        raise _MalformedJson("Request body is empty; expected a JSON object")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise _BadRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise _MalformedJson(str(exc)) from None


def _guarded(handler: Handler) -> Handler:
    """Turn the backend's refusals into JSON answers; log and answer 500 for the rest."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConcurrencyLimitReached as exc:
            return _json(
                ConcurrencyLimitResponse(meta=ConcurrencyLimitMeta(limit=exc.limit)), exc.status
            )
        except ApiError as exc:
            return _error(exc.status, exc.code, str(exc))
        except web.HTTPException:
            raise
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.path)
            return _error(500, "internal_error", f"{type(exc).__name__}: {exc}")

    return wrapper


# --- decoders (immutable, one per request type) ----------------------------------------------

_LOAD = msgspec.json.Decoder(PipelineLoadRequest)
_OFFER = msgspec.json.Decoder(WebRtcOfferRequest)
_CANDIDATES = msgspec.json.Decoder(IceCandidateRequest)
_DOWNLOAD = msgspec.json.Decoder(DownloadModelsRequest)


# --- handlers --------------------------------------------------------------------------------


@_guarded
async def health(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    ok, detail = await state.backend.health()
    body = HealthResponse(
        status="healthy" if ok else "unhealthy",
        timestamp=datetime.now().isoformat(),
        server_start_time=state.started_at,
        version=state.version,
        detail=detail,
    )
    return _json(body, 200 if ok else 503)


@_guarded
async def load_pipeline(request: web.Request) -> web.StreamResponse:
    body = await _decode(request, _LOAD)
    try:
        items = body.items()
    except ValueError as exc:
        raise _BadRequest(str(exc)) from None
    await _state(request).backend.load_pipelines(items)
    return _json(MessageResponse(message="Pipeline loading initiated successfully"))


@_guarded
async def pipeline_status(request: web.Request) -> web.StreamResponse:
    return _json(await _state(request).backend.pipeline_status())


@_guarded
async def pipeline_schemas(request: web.Request) -> web.StreamResponse:
    schemas = await _state(request).backend.pipeline_schemas()
    return _json(PipelineSchemasResponse(pipelines=schemas))


@_guarded
async def ice_servers(request: web.Request) -> web.StreamResponse:
    return _json(IceServersResponse(iceServers=await _state(request).ice.ice_servers()))


@_guarded
async def webrtc_offer(request: web.Request) -> web.StreamResponse:
    offer = await _decode(request, _OFFER)
    if offer.type != "offer":
        raise InvalidSdp(f'Expected `type` "offer", got {offer.type!r} - at `$.type`')
    if not offer.sdp.strip():
        raise InvalidSdp("SDP is empty - at `$.sdp`")
    return _json(await _state(request).backend.create_session(offer))


@_guarded
async def add_ice_candidates(request: web.Request) -> web.StreamResponse:
    session_id = request.match_info["sessionId"]
    body = await _decode(request, _CANDIDATES)
    await _state(request).backend.add_ice_candidates(session_id, body.candidates)
    return web.Response(status=204)


@_guarded
async def close_session(request: web.Request) -> web.StreamResponse:
    await _state(request).backend.close_session(request.match_info["sessionId"])
    return web.Response(status=204)


@_guarded
async def models_status(request: web.Request) -> web.StreamResponse:
    pipeline_id = request.query.get("pipeline_id", "")
    if not pipeline_id:
        raise _BadRequest("Missing required query parameter `pipeline_id`")
    return _json(await _state(request).backend.models_status(pipeline_id))


@_guarded
async def download_models(request: web.Request) -> web.StreamResponse:
    body = await _decode(request, _DOWNLOAD)
    await _state(request).backend.download_models(body.pipeline_id)
    return _json(MessageResponse(message=f"Model download started for {body.pipeline_id}"))


@_guarded
async def hardware_info(request: web.Request) -> web.StreamResponse:
    return _json(await _state(request).backend.hardware_info())


async def openapi_json(request: web.Request) -> web.StreamResponse:
    return web.Response(body=_state(request).openapi_json, content_type="application/json")


async def docs(request: web.Request) -> web.StreamResponse:
    return web.Response(text=_state(request).docs_html, content_type="text/html")


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
        response = _error(exc.status, code, exc.text or exc.reason)
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
) -> ApiState:
    """Register every API route on ``app`` (not yet started) and keep the state in
    ``app[API_STATE]``. With ``install_middlewares`` also adds CORS and JSON error answers.
    An ``IceServerProvider`` is made from ``config.ice`` unless given; it is closed on the
    app's cleanup either way.

    The body limit is ``config.max_body_bytes``; the app's own ``client_max_size`` must not be
    smaller (``create_api_app`` sets it)."""
    config = config or ApiConfig()
    provider = ice if ice is not None else IceServerProvider(config.ice)
    state = ApiState(
        backend=backend,
        ice=provider,
        max_body_bytes=config.max_body_bytes,
        started_at=time.time(),
        version=_package_version(),
    )
    operations = api_operations()
    document = build_openapi(operations, title=API_TITLE, version=state.version)
    state.openapi_json = msgspec.json.encode(document)
    state.docs_html = render_docs_html(document)
    app[API_STATE] = state
    for op in operations:
        app.router.add_route(op.method, op.path, op.handler, name=op.operation_id)
        if op.method == "GET":
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
