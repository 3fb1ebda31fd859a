"""The hub's ends of its connections: a WebSocket viewer's outgoing queue, a worker's link."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from dreams.wire import MsgType, control

__all__ = ["ProtocolError", "ViewerChannel", "WorkerLink"]

logger = logging.getLogger(__name__)


class ProtocolError(ValueError):
    """A worker message that breaks the protocol; the worker's connection is closed."""


class ViewerChannel:
    """One WebSocket viewer's outgoing messages: a short queue, oldest dropped when full, drained
    by the viewer's own sender task so one slow viewer never holds up the others."""

    def __init__(self, ws: web.WebSocketResponse, ip: str, queue_frames: int) -> None:
        self.ws = ws
        self.ip = ip
        self.queue: asyncio.Queue[bytes | str] = asyncio.Queue(queue_frames)
        self.dropped = 0

    def offer(self, message: bytes | str) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(message)

    async def drain(self) -> None:
        """Send until the connection closes (run as the viewer's sender task)."""
        while True:
            message = await self.queue.get()
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_str(message)


class WorkerLink:
    """The hub's end of one ``/ws/gpu`` connection."""

    def __init__(self, ws: web.WebSocketResponse, peer: str, now: float) -> None:
        self.ws = ws
        self.peer = peer
        self.connected_at = now
        self.snapshot_received = asyncio.Event()
        self.closed = asyncio.Event()
        self.frames = 0

    async def send(self, kind: MsgType, payload: bytes = b"") -> bool:
        if self.ws.closed:
            return False
        try:
            await self.ws.send_bytes(control(kind, payload))
        except ConnectionError as exc:
            logger.info("cannot send %s to worker %s: %s", kind.name, self.peer, exc)
            return False
        return True
