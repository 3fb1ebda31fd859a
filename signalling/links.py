"""signalling's asyncio links to the rest of the system: the supervisor's admin socket and
the inboxes of the media stages."""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import zmq
import zmq.asyncio

from services import protocol as p
from services.runtime import InboxSockets, admin_endpoint

logger = logging.getLogger(__name__)

ADMIN_TIMEOUT_S = 10.0


class SupervisorUnavailable(RuntimeError):
    pass


class AdminLink:
    """Requests to the supervisor's admin ROUTER, one at a time (a DEALER speaking REQ)."""

    def __init__(self, ctx: zmq.asyncio.Context, run_dir: str) -> None:
        self._ctx = ctx
        self._endpoint = admin_endpoint(run_dir)
        self._codec = p.admin_client_codec()
        self._lock = asyncio.Lock()
        self._sock: zmq.asyncio.Socket | None = None

    def _socket(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._endpoint)
            self._sock = sock
        return self._sock

    async def request(self, message: p.AdminRequest) -> p.AdminReply:
        async with self._lock:
            sock = self._socket()
            await sock.send_multipart([b"", self._codec.encode(message)])
            if not await sock.poll(int(ADMIN_TIMEOUT_S * 1000)):
                # Drop the socket so a late reply never answers the next request.
                sock.close(linger=0)
                self._sock = None
                raise SupervisorUnavailable("the supervisor did not answer")
            frames = await sock.recv_multipart()
            return self._codec.decode(frames[-1])

    async def status(self) -> p.StatusReport:
        reply = await self.request(p.GetStatus())
        assert isinstance(reply, p.StatusReport)
        return reply

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class AsyncOutbox(InboxSockets[zmq.asyncio.Socket]):
    """Non-blocking sends to other services' inboxes from the event loop; a stage that is
    down costs a drop."""

    def send(self, service: str, message: p.InboxMessage) -> bool:
        sock = self._socket(service)
        # zmq.asyncio's send with NOBLOCK returns a future that is already done, holding
        # zmq.Again when the peer is down or full.
        future = cast(
            "asyncio.Future[object]",
            sock.send(self._codec.encode(message), zmq.NOBLOCK, copy=False),
        )
        if not future.done():
            future.add_done_callback(_consume)
            return True
        exc = future.exception()
        if isinstance(exc, zmq.Again):
            self.dropped += 1
            return False
        if exc is not None:
            raise exc
        return True


def _consume(future: asyncio.Future[object]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.debug("send failed: %s", future.exception())
