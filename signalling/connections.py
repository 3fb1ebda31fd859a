"""The HTTP server's connections: how many, from whom, and how long one may hold a socket idle.

aiohttp keeps a connection open as long as its peer wants: one that never sends a request, or
sends its headers a byte a minute, holds a descriptor for ever (its keep-alive timer only starts
after a response, at an hour). A few hundred such connections exhaust a process's descriptors,
and then every new session fails. So the listening socket's connections pass through a guard:

* **admission**: at most ``max_connections`` open, and ``max_per_client`` from one address;
  the connection over either limit is closed as it opens (the others are not touched);
* **idle time**: a connection with no request in a handler must bring a complete request head
  within ``idle_timeout_s`` of opening or of its last response, else it is closed. A request
  being handled (a long upload, an event stream, a WebSocket) is not idle; the routes that hold a
  connection open bound themselves (per-address limits on event streams).

A protocol wrapper sees each connection open and close; a middleware (the outermost) sees each
request begin and end; a sweeper task closes what waited too long. Counts go to ``/health``,
and the log gets a summary every ``SUMMARY_INTERVAL_S``, never a line per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from aiohttp import web

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 0.5
SUMMARY_INTERVAL_S = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ConnectionLimits(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    #: From a connection's opening or its last response to its next complete request head.
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 15.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1024
    max_per_client: Annotated[int, msgspec.Meta(ge=1)] = 64


@dataclass(slots=True)
class Connection:
    client: str
    transport: asyncio.BaseTransport
    idle_since: float
    in_handler: int = 0


class ConnectionGuard:
    """Admission and idle limits for one listening socket's connections."""

    def __init__(
        self, limits: ConnectionLimits, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limits = limits
        self.clock = clock
        self.open: dict[asyncio.BaseTransport, Connection] = {}
        self.per_client: Counter[str] = Counter()
        self.refused = 0
        self.timed_out = 0
        self._reported = (0, 0)
        self._reported_at = clock()

    # ------------------------------------------------------------ connections

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        limits = self.limits
        if (
            len(self.open) >= limits.max_connections
            or self.per_client[client] >= limits.max_per_client
        ):
            self.refused += 1
            return False
        self.open[transport] = Connection(client, transport, self.clock())
        self.per_client[client] += 1
        return True

    def closed(self, transport: asyncio.BaseTransport) -> None:
        conn = self.open.pop(transport, None)
        if conn is not None:
            self.per_client[conn.client] -= 1
            if self.per_client[conn.client] <= 0:
                del self.per_client[conn.client]

    def sweep(self) -> int:
        """Close the connections idle for too long; how many."""
        now = self.clock()
        limit = self.limits.idle_timeout_s
        stale = [c for c in self.open.values() if not c.in_handler and now - c.idle_since > limit]
        for conn in stale:
            conn.transport.close()
            self.closed(conn.transport)
        self.timed_out += len(stale)
        self._summarise(now)
        return len(stale)

    def _summarise(self, now: float) -> None:
        if now - self._reported_at < SUMMARY_INTERVAL_S:
            return
        refused = self.refused - self._reported[0]
        timed_out = self.timed_out - self._reported[1]
        if refused or timed_out:
            logger.warning(
                "connections in the last %.0f s: %d refused (over %d open or %d per client), "
                "%d closed idle (no request within %.0f s); %d open now",
                now - self._reported_at,
                refused,
                self.limits.max_connections,
                self.limits.max_per_client,
                timed_out,
                self.limits.idle_timeout_s,
                len(self.open),
            )
        self._reported = (self.refused, self.timed_out)
        self._reported_at = now

    def stats(self) -> dict[str, Any]:
        return {
            "open": len(self.open),
            "clients": len(self.per_client),
            "refused": self.refused,
            "closed_idle": self.timed_out,
        }

    # ------------------------------------------------------------ requests

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.in_handler += 1
        try:
            return await handler(request)
        finally:
            conn.in_handler -= 1
            conn.idle_since = self.clock()

    async def run_sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's request handler for one connection, admitted (or not) by the guard."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard.admit(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return
        self.guard.closed(self.transport)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard):
        super().__init__(runner)
        self.host, self.port, self.guard = host, port, guard

    @property
    def name(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self.guard
        self._server = await asyncio.get_running_loop().create_server(
            lambda: GuardedProtocol(guard, server()),
            self.host,
            self.port,
            reuse_address=True,
            backlog=self._backlog,
        )


#: Above this share of the soft limit in use, /health says the process is running out.
DESCRIPTORS_LOW_SHARE = 0.9


def descriptor_use() -> tuple[int, int]:
    """(descriptors this process has open, its soft limit)."""
    import os
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        used = len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux, or out of descriptors for the listing itself
        used = soft
    return used, soft


class StreamCap:
    """At most ``per_client`` open event streams from one address: each holds a connection for
    as long as its client wants, so the idle limit does not apply to them."""

    def __init__(self, per_client: int = 10) -> None:
        self.per_client = per_client
        self.open: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, request: web.Request) -> Iterator[None]:
        client = request.remote or "?"
        if self.open[client] >= self.per_client:
            raise web.HTTPTooManyRequests(
                text=json.dumps(
                    {
                        "error": "too_many_streams",
                        "detail": f"at most {self.per_client} open event streams per client",
                    }
                ),
                content_type="application/json",
            )
        self.open[client] += 1
        try:
            yield
        finally:
            self.open[client] -= 1
            if self.open[client] <= 0:
                del self.open[client]


stream_cap_key = web.AppKey("stream_cap", StreamCap)


@contextlib.contextmanager
def event_stream_slot(request: web.Request) -> Iterator[None]:
    """A slot under the app's :class:`StreamCap` (none configured: no limit)."""
    cap = request.app.get(stream_cap_key)
    if cap is None:
        yield
        return
    with cap.hold(request):
        yield
