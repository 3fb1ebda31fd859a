"""CORS for the API: a page served from another local port (a Vite dev server on
``http://localhost:5173``, say) may call it.

Origins are matched exactly on scheme and host; a pattern ending in ``:*`` accepts any port
(and none). ``"*"`` alone accepts every origin. Preflights (``OPTIONS`` with
``Access-Control-Request-Method``) are answered here, never reach a handler, and a disallowed
origin gets 403 without CORS headers, so the browser blocks the call. Credentials are not
allowed: Scope's clients call the API without cookies.

Writes (``POST``, ``PUT``, ``PATCH``, ``DELETE``) are guarded on the server too, since a
browser sends a "simple" cross-origin request (``text/plain`` or a form) without asking first:
one from an origin not allowed is refused with 403 before any handler runs, and a body that is
not ``application/json`` gets 415. Reads stay open to every client.

aiohttp-cors was considered and not used: unmaintained, and this is ~100 lines.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware

from signalling.api.types import ErrorResponse

__all__ = ["CorsConfig", "cors_middleware", "origin_allowed"]

logger = logging.getLogger(__name__)

DEFAULT_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*")
ALLOWED_METHODS = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
DEFAULT_ALLOWED_HEADERS = "Content-Type, Authorization"
PREFLIGHT_MAX_AGE_S = 600
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class CorsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    allow_origins: list[str] = msgspec.field(default_factory=lambda: list(DEFAULT_ORIGINS))


def _split(origin: str) -> tuple[str, str, str] | None:
    """(scheme, host, port-or-empty), or None when this is not a plain origin."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname or parts.path or parts.query or parts.fragment:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), "" if port is None else str(port)


def origin_allowed(origin: str, patterns: list[str]) -> bool:
    got = _split(origin)
    if got is None:
        return False
    for pattern in patterns:
        if pattern == "*":
            return True
        any_port = pattern.endswith(":*")
        want = _split(pattern[:-2] if any_port else pattern)
        if want is None:
            continue
        if got[:2] == want[:2] and (any_port or got[2] == want[2]):
            return True
    return False


def _refusal(status: int, code: str, detail: str) -> web.Response:
    body = msgspec.json.encode(ErrorResponse(error=code, detail=detail))
    return web.Response(status=status, body=body, content_type="application/json")


def _refuse_write(request: web.Request, patterns: list[str]) -> web.Response | None:
    """The answer to a write no page of another origin may make, or None to go ahead."""
    origin = request.headers.get("Origin")
    if origin is not None and not origin_allowed(origin, patterns):
        logger.warning("refused %s %s from origin %s", request.method, request.path, origin)
        return _refusal(
            403,
            "cross_origin_write_refused",
            f"Origin {origin} may not change this server (allowed: {', '.join(patterns)}; "
            "add it to [api.cors] allow_origins)",
        )
    # A write without a body (Scope's recording start/stop) carries nothing to refuse,
    # whatever type an HTTP library labels it with.
    has_body = bool(request.content_length) or request.headers.get("Transfer-Encoding")
    if has_body and request.content_type != JSON:
        return _refusal(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, got {request.content_type or 'none'}",
        )
    return None


def cors_middleware(config: CorsConfig) -> Middleware:
    patterns = list(config.allow_origins)

    def allow(response: web.StreamResponse, origin: str) -> None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers.add("Vary", "Origin")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method in WRITE_METHODS and (refused := _refuse_write(request, patterns)):
            return refused
        if origin is None:
            return await handler(request)
        allowed = origin_allowed(origin, patterns)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not allowed:
                body = msgspec.json.encode(
                    ErrorResponse(error="cors_origin_denied", detail=f"Origin {origin} not allowed")
                )
                return web.Response(status=403, body=body, content_type="application/json")
            preflight = web.Response(status=204)
            allow(preflight, origin)
            preflight.headers["Access-Control-Allow-Methods"] = ALLOWED_METHODS
            preflight.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", DEFAULT_ALLOWED_HEADERS
            )
            preflight.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
            return preflight
        if not allowed:
            return await handler(request)
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            allow(exc, origin)
            raise
        allow(response, origin)
        return response

    return middleware
