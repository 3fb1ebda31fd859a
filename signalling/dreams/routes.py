"""The Dreams API on aiohttp (``../shared/reference/dreams-api.md``), mounted by
:func:`add_dreams_routes`.

Viewer side: ``GET /dreams``, ``/api/dreams/{status,current,health,frames/recent,frame/{n},
embed,sse}`` and ``WS /ws/dreams``. Generator side: ``WS /ws/gpu``. Everything lives in
``app[DREAMS]``; the hub's tasks run in the app's ``cleanup_ctx``.

Rate limit: 60 requests per 60 s per client IP and endpoint on every ``/api/dreams/`` endpoint
but ``health`` (the SSE stream counts its connection), answered 429 with
``{"detail": "Rate limit exceeded. Max 60 requests per 60s."}`` and ``Retry-After``. Every
``/api/dreams/`` endpoint but ``health`` counts as viewer activity (starts generation, keeps it
warm). Long-lived connections (WebSocket viewers and SSE streams) are capped per IP and in all:
over the cap the upgrade is answered 429 with a ``detail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from signalling.dreams.client_ip import Network, client_ip, parse_networks
from signalling.dreams.config import DreamsConfig, resolve_auth_token
from signalling.dreams.frames import Frame
from signalling.dreams.hub import DreamsHub
from signalling.dreams.launcher import (
    AdminRequester,
    ExternalWorker,
    Launcher,
    LocalWorkerLauncher,
    SupervisedWorker,
    WorkerCommand,
)
from signalling.dreams.links import ProtocolError, ViewerChannel, WorkerLink
from signalling.dreams.page import render_page
from signalling.dreams.ratelimit import RateLimiter

__all__ = ["DREAMS", "DreamsRoutes", "add_dreams_routes", "close_dreams"]

logger = logging.getLogger(__name__)

VIEWER_HEARTBEAT_S = 30.0
VIEWER_MAX_MESSAGE_BYTES = 64 * 1024
MAX_RECENT = 30
CLOSE_REASON_BYTES = 120

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_JSON = msgspec.json.Encoder()
_PONG = '{"type":"pong"}'
_HOST = re.compile(r"[A-Za-z0-9.\-]+(:\d+)?|\[[0-9A-Fa-f:.]+\](:\d+)?")


@dataclass(slots=True)
class DreamsRoutes:
    hub: DreamsHub
    config: DreamsConfig
    token: str
    limiter: RateLimiter
    last_prune: float = 0.0
    proxies: tuple[Network, ...] = ()


DREAMS: web.AppKey[DreamsRoutes] = web.AppKey("dreamwire_dreams", DreamsRoutes)


def _json(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=_JSON.encode(obj), content_type="application/json", headers=headers
    )


def _detail(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json({"detail": detail}, status, headers)


def _state(request: web.Request) -> DreamsRoutes:
    return request.config_dict[DREAMS]


def _client_ip(request: web.Request) -> str:
    """The address the per-IP limits count (see :mod:`signalling.dreams.client_ip`)."""
    proxies = _state(request).proxies
    return client_ip(request.remote, request.headers.get("X-Forwarded-For"), proxies)


def _note_origin(request: web.Request, hub: DreamsHub) -> None:
    """Remember our own port for a local worker's connect URL (unless configured)."""
    if hub.connect_url or request.transport is None:
        return
    sockname = request.transport.get_extra_info("sockname")
    if isinstance(sockname, tuple) and len(sockname) >= 2:
        hub.connect_url = f"ws://127.0.0.1:{sockname[1]}/ws/gpu"


def _window_text(seconds: float) -> str:
    return f"{seconds:g}s"


def _limited(bucket: str, *, touch: bool = True) -> Callable[[Handler], Handler]:
    """Rate limit per (IP, ``bucket``); count the request as viewer activity."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: web.Request) -> web.StreamResponse:
            state = _state(request)
            limiter = state.limiter
            now = time.monotonic()
            if now - state.last_prune >= limiter.window_s:
                state.last_prune = now
                limiter.prune()
            key = (_client_ip(request), bucket)
            if not limiter.allow(key):
                retry = max(1, round(limiter.retry_after_s(key)))
                return _detail(
                    429,
                    f"Rate limit exceeded. Max {limiter.limit} requests per "
                    f"{_window_text(limiter.window_s)}.",
                    {"Retry-After": str(retry)},
                )
            if touch:
                _note_origin(request, state.hub)
                state.hub.touch()
            return await handler(request)

        return wrapper

    return decorate


# --- viewer pages and REST --------------------------------------------------------------------


async def dreams_page(request: web.Request) -> web.StreamResponse:
    embed = request.query.get("embed", "0").strip() == "1"
    return web.Response(
        text=render_page(embed), content_type="text/html", headers={"Cache-Control": "no-cache"}
    )


@_limited("status")
async def status(request: web.Request) -> web.StreamResponse:
    return _json(_state(request).hub.status())


def _frame_response(frame: Frame, cache_control: str) -> web.Response:
    return web.Response(
        body=frame.data,
        content_type="image/webp",
        headers={
            "X-Frame-Number": str(frame.number),
            "X-Keyframe-Number": str(frame.keyframe),
            "X-Generation-Time-Ms": str(round(frame.generation_time_ms)),
            "Cache-Control": cache_control,
        },
    )


@_limited("current")
async def current(request: web.Request) -> web.StreamResponse:
    frame = _state(request).hub.cache.latest()
    if frame is None:
        return web.Response(status=204, headers={"Cache-Control": "no-store"})
    return _frame_response(frame, "no-store")


async def health(request: web.Request) -> web.StreamResponse:
    """Not rate limited and not viewer activity: monitoring never wakes the generator."""
    hub = _state(request).hub
    ok, error = hub.healthy()
    if not ok:
        return _json({"status": "unhealthy", "error": error}, 503)
    return _json(
        {
            "status": "healthy",
            "gpu_connected": hub.worker is not None,
            "viewer_count": hub.viewer_count,
            "frames_cached": len(hub.cache) > 0,
        }
    )


@_limited("frames/recent")
async def recent(request: web.Request) -> web.StreamResponse:
    raw_count = request.query.get("count", "5")
    fmt = request.query.get("format", "metadata")
    try:
        count = int(raw_count)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_RECENT:
        return _detail(400, f"count must be an integer from 1 to {MAX_RECENT}, got {raw_count!r}")
    if fmt not in ("metadata", "urls"):
        return _detail(400, f"format must be 'metadata' or 'urls', got {fmt!r}")
    frames = []
    for frame in _state(request).hub.cache.recent(count):
        item: dict[str, Any] = frame.metadata()
        if fmt == "urls":
            item["data_url"] = "data:image/webp;base64," + frame.base64
        frames.append(item)
    return _json({"frames": frames, "count": len(frames)})


@_limited("frame")
async def frame_by_number(request: web.Request) -> web.StreamResponse:
    number = int(request.match_info["frame_number"])
    frame = _state(request).hub.cache.get(number)
    if frame is None:
        return _detail(404, f"Frame {number} not in cache")
    return _frame_response(frame, "public, max-age=60")


@_limited("embed")
async def embed(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    host = request.host if _HOST.fullmatch(request.host) else "localhost"  # no markup via Host
    base = state.config.public_url.rstrip("/") or f"{request.scheme}://{host}"
    ws_base = "wss" + base[len("https") :] if base.startswith("https") else "ws" + base[4:]
    width, height = state.hub.resolution
    iframe = (
        f'<iframe src="{base}/dreams?embed=1" width="{width}" height="{height}" '
        'frameborder="0" allow="autoplay" loading="lazy"></iframe>'
    )
    return _json(
        {
            "iframe": iframe,
            "image_url": f"{base}/api/dreams/current",
            "stream_url": f"{ws_base}/ws/dreams",
            "status_url": f"{base}/api/dreams/status",
            "resolution": {"width": width, "height": height},
        }
    )


# --- SSE --------------------------------------------------------------------------------------


def _sse_status(hub: DreamsHub) -> bytes:
    data = _JSON.encode(
        {
            "status": hub.state,
            "gpu_connected": hub.worker is not None,
            "viewer_count": hub.viewer_count,
            "frame_count": hub.last_number,
        }
    )
    return b"event: status\ndata: " + data + b"\n\n"


def _sse_frame(frame: Frame) -> bytes:
    return b'event: frame\ndata: {"frame_number":%d,"data":"%s"}\n\n' % (
        frame.number,
        frame.base64.encode("ascii"),
    )


@_limited("sse", touch=False)
async def sse(request: web.Request) -> web.StreamResponse:
    """``status`` every ``status_interval_s`` (and at once), ``frame`` for each released frame
    (pushed as released, newest first when the client lags, rather than polled at 10 Hz)."""
    state = _state(request)
    hub = state.hub
    ip = _client_ip(request)
    refused = hub.admit(ip)
    if refused is not None:
        return _detail(429, refused)
    try:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        _note_origin(request, hub)
        hub.add_sse()
        try:
            last = 0
            next_status = 0.0
            while not hub.closing:
                now = time.monotonic()
                if now >= next_status:
                    await response.write(_sse_status(hub))
                    next_status = now + state.config.status_interval_s
                frame = await hub.next_frame(last, next_status - time.monotonic())
                if frame is not None:
                    await response.write(_sse_frame(frame))
                    last = frame.number
        except ConnectionError:
            pass
        finally:
            hub.remove_sse()
    finally:
        hub.release(ip)
    return response


# --- WebSockets -------------------------------------------------------------------------------


def _is_ping(text: str) -> bool:
    try:
        message = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return False
    return isinstance(message, dict) and message.get("type") == "ping"


async def viewer_ws(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    hub = state.hub
    ip = _client_ip(request)
    refused = hub.admit(ip)
    if refused is not None:
        return _detail(429, refused)
    try:
        ws = web.WebSocketResponse(
            heartbeat=VIEWER_HEARTBEAT_S, compress=False, max_msg_size=VIEWER_MAX_MESSAGE_BYTES
        )
        await ws.prepare(request)
        _note_origin(request, hub)
        channel = ViewerChannel(ws, ip, state.config.viewer_queue_frames)
        hub.add_viewer(channel)
        sender = asyncio.create_task(channel.drain(), name=f"dreams.viewer-{id(ws):x}.send")
        try:
            channel.offer(hub.status_message())
            channel.offer(hub.config_message())
            if (latest := hub.cache.latest()) is not None:
                channel.offer(latest.ws_message)
            async for message in ws:
                # Only ping is answered; anything else a viewer sends is ignored.
                if message.type == WSMsgType.TEXT and _is_ping(message.data):
                    channel.offer(_PONG)
        finally:
            hub.remove_viewer(channel)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await sender
    finally:
        hub.release(ip)
    return ws


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _authorize_worker(request: web.Request, token: str, hub: DreamsHub) -> web.Response | None:
    """None when the worker may connect, else the refusal (logged). A browser page (it always
    sends ``Origin`` on a WebSocket) is never a worker, whatever its address."""
    peer = request.remote
    if "Origin" in request.headers:
        logger.warning(
            "refused GPU worker from %s: a browser page (Origin %s)",
            peer,
            request.headers["Origin"],
        )
        return _detail(403, "GPU workers are programs, not web pages (the request has an Origin)")
    if not token:
        if _is_loopback(peer) and hub.worker is not None:
            logger.warning("refused GPU worker from %s: no token, and a worker is live", peer)
            return _detail(409, "A worker is connected; without a token none may replace it")
        if _is_loopback(peer):
            return None
        logger.warning("refused GPU worker from %s: no token configured, loopback only", peer)
        return _detail(403, "DREAM_GEN_AUTH_TOKEN is not set: only loopback workers are accepted")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        logger.warning("refused GPU worker from %s: no bearer token", peer)
        return _detail(401, "Missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        logger.warning("refused GPU worker from %s: wrong token", peer)
        return _detail(403, "Invalid token")
    return None


async def gpu_ws(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    refused = _authorize_worker(request, state.token, state.hub)
    if refused is not None:
        return refused
    hub = state.hub
    ws = web.WebSocketResponse(
        compress=False,
        # One type byte and a frame, or a state snapshot: nothing larger is worth reading.
        max_msg_size=1
        + min(
            state.config.max_worker_message_bytes,
            max(hub.max_frame_bytes, state.config.max_state_bytes),
        ),
        receive_timeout=state.config.worker_timeout_s,
    )
    await ws.prepare(request)
    link = WorkerLink(ws, str(request.remote), time.monotonic())
    reason = "worker closed the connection"
    try:
        await hub.attach_worker(link)
        while True:
            try:
                message = await ws.receive()
            except TimeoutError:
                reason = f"no message for {state.config.worker_timeout_s:g} s"
                await _close_worker(ws, WSCloseCode.GOING_AWAY, reason)
                break
            if message.type == WSMsgType.BINARY:
                try:
                    await hub.on_worker_message(link, message.data)
                except ProtocolError as exc:
                    reason = f"protocol error: {exc}"
                    await _close_worker(ws, WSCloseCode.PROTOCOL_ERROR, reason)
                    break
            elif message.type == WSMsgType.TEXT:
                reason = "protocol error: text message (the worker protocol is binary)"
                await _close_worker(ws, WSCloseCode.UNSUPPORTED_DATA, reason)
                break
            elif message.type == WSMsgType.ERROR:
                reason = f"connection error: {ws.exception()}"
                break
            else:  # CLOSE, CLOSING, CLOSED
                if ws.close_code is not None:
                    reason = f"worker closed the connection ({ws.close_code})"
                break
    finally:
        if reason.startswith(("protocol error", "connection error", "no message")):
            logger.warning("closed worker %s: %s", link.peer, reason)
        hub.detach_worker(link, reason)
    return ws


async def _close_worker(ws: web.WebSocketResponse, code: int, reason: str) -> None:
    message = reason.encode("utf-8", "replace")[:CLOSE_REASON_BYTES]
    with contextlib.suppress(ConnectionError):
        await ws.close(code=code, message=message)


# --- mounting ---------------------------------------------------------------------------------


async def close_dreams(app: web.Application) -> None:
    """Save and stop the generator; call before ``runner.cleanup()`` (see ``DreamsHub.close``)."""
    if DREAMS in app:
        await app[DREAMS].hub.close()


def make_launcher(
    config: DreamsConfig, token: str, supervisor: AdminRequester | None = None
) -> Launcher:
    """The launcher ``config.launcher`` describes: a local worker is the supervisor's child
    when there is one (``supervisor start``), else the hub's own."""
    if config.launcher.kind == "external":
        return ExternalWorker()
    command = WorkerCommand(
        config.launcher, fps=config.target_fps, width=config.width, height=config.height
    )
    if supervisor is not None:
        return SupervisedWorker(command, token, supervisor)
    return LocalWorkerLauncher(command, token=token)


def add_dreams_routes(
    app: web.Application,
    config: DreamsConfig | None = None,
    *,
    launcher: Launcher | None = None,
    supervisor: AdminRequester | None = None,
) -> DreamsHub:
    """Register the Dreams API on ``app`` (not yet started); returns the hub.

    ``launcher`` replaces the one ``config.launcher`` describes (a cloud launcher, or local
    mode driving dreamwire's own inference service and calling ``hub.publish_frame``);
    ``supervisor`` runs a local worker."""
    config = config or DreamsConfig()
    token = resolve_auth_token(config)
    if launcher is None:
        launcher = make_launcher(config, token, supervisor)
    hub = DreamsHub(config, launcher)
    if config.launcher.connect_url:
        hub.connect_url = config.launcher.connect_url
    app[DREAMS] = DreamsRoutes(
        hub=hub,
        config=config,
        token=token,
        limiter=RateLimiter(config.rate_limit_requests, config.rate_limit_window_s),
        proxies=parse_networks(config.trusted_proxies),
    )
    if not token:
        logger.warning(
            "DREAM_GEN_AUTH_TOKEN is not set: /ws/gpu accepts workers from loopback only"
        )
    router = app.router
    router.add_get("/dreams", dreams_page, name="dreams_page")
    router.add_get("/api/dreams/status", status, name="dreams_status")
    router.add_get("/api/dreams/current", current, name="dreams_current")
    router.add_get("/api/dreams/health", health, name="dreams_health")
    router.add_get("/api/dreams/frames/recent", recent, name="dreams_recent")
    router.add_get(r"/api/dreams/frame/{frame_number:\d+}", frame_by_number, name="dreams_frame")
    router.add_get("/api/dreams/embed", embed, name="dreams_embed")
    router.add_get("/api/dreams/sse", sse, name="dreams_sse")
    router.add_get("/ws/dreams", viewer_ws, name="dreams_ws", allow_head=False)
    router.add_get("/ws/gpu", gpu_ws, name="dreams_gpu_ws", allow_head=False)

    async def shutdown(_app: web.Application) -> None:
        await hub.close(handshake=False)

    app.cleanup_ctx.append(hub.run)
    app.on_shutdown.append(shutdown)
    return hub
