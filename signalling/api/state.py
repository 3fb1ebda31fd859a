"""What every API handler shares: the application state, body decoding, error answers.

``routes.py`` (the streaming API) and ``studio.py`` (the rest of Scope's UI) both build on it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from signalling.api.backend import ApiBackend
from signalling.api.errors import (
    ApiError,
    BadRequest,
    ConcurrencyLimitReached,
    MalformedJson,
    PayloadTooLarge,
)
from signalling.api.ice import IceServerProvider
from signalling.api.types import ConcurrencyLimitMeta, ConcurrencyLimitResponse, ErrorResponse

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StudioState:
    """Where the studio routes find things on disk; None: nothing there (tests, no run dir)."""

    #: The user's dreamwire directory (``~/.dreamwire``): onboarding answers.
    home: Path | None = None
    #: The models directory: LoRA files under ``loras/``.
    models_dir: Path | None = None
    #: The server log every process of the run appends to.
    log_file: Path | None = None


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
    studio: StudioState = field(default_factory=StudioState)


API_STATE: web.AppKey[ApiState] = web.AppKey("dreamwire_api_state")

_ENCODER = msgspec.json.Encoder()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_ENCODER.encode(obj), content_type="application/json")


def error_response(status: int, code: str, detail: str) -> web.Response:
    return json_response(ErrorResponse(error=code, detail=detail), status)


def api_state(request: web.Request) -> ApiState:
    return request.config_dict[API_STATE]


async def decode_body(request: web.Request, decoder: msgspec.json.Decoder[T]) -> T:
    limit = api_state(request).max_body_bytes
    too_large = PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None
    if len(body) > limit:
        raise too_large
    if not body.strip():
        raise MalformedJson("Request body is empty; expected a JSON object")
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise BadRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise MalformedJson(str(exc)) from None
    except RecursionError:
        raise MalformedJson(f"Request body is nested deeper than {MAX_BODY_DEPTH} levels") from None
    if nesting_exceeds(value, MAX_BODY_DEPTH):
        raise MalformedJson(f"Request body is nested deeper than {MAX_BODY_DEPTH} levels")
    return value


#: No body Scope's clients send nests deeper than a handful of levels; a deeper one is refused
#: before anything walks it recursively.
MAX_BODY_DEPTH = 32


def nesting_exceeds(value: object, limit: int) -> bool:
    """Whether lists/dicts/structs in ``value`` nest deeper than ``limit`` (iteratively)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, msgspec.Struct):
            item = msgspec.structs.asdict(item)
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth >= limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def guarded(handler: Handler) -> Handler:
    """Turn the backend's refusals into JSON answers; log and answer 500 for the rest."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ConcurrencyLimitReached as exc:
            return json_response(
                ConcurrencyLimitResponse(meta=ConcurrencyLimitMeta(limit=exc.limit)), exc.status
            )
        except ApiError as exc:
            return error_response(exc.status, exc.code, str(exc))
        except web.HTTPException:
            raise
        except Exception as exc:
            logger.exception("%s %s failed", request.method, request.path)
            return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")

    return wrapper
