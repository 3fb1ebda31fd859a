"""signalling's end of the control connection, on asyncio (``zmq.asyncio``).

The protocol's service side is :class:`services.control.ControlSide`, as in every service
process (``Hello`` → ``Ready``, heartbeats acked, what is refused counted once); this module is
its I/O on the event loop: ``Stop`` honoured, signalling's own messages (a session failed, a
Dreams worker ended) handed on, and the process stops with the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from services import protocol as p
from services.control import ControlSide, Progress
from services.runtime import ServiceSpec, service_sockets

logger = logging.getLogger(__name__)


class ControlLink:
    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.ctx = zmq.asyncio.Context()
        self.control, self.inbox = service_sockets(self.ctx, spec)
        self.side = ControlSide(spec.name, spec.secret)
        self.inbox_codec = p.inbox_codec(p.SignallingInbox)
        self.frames_done = 0
        self.stopped = asyncio.Event()
        self.on_session_failed: Callable[[p.SessionFailed], Awaitable[None]] | None = None
        #: A Dreams worker the supervisor ran for us ended by itself.
        self.on_worker_exited: Callable[[p.WorkerExited], None] | None = None
        self.on_inbox: Callable[[p.SignallingInbox], Awaitable[None]] | None = None
        self.session_count: Callable[[], int] = lambda: 0

    @property
    def rejected(self) -> int:
        return self.side.rejected

    async def send(self, message: p.ServiceToSupervisor) -> None:
        await self.control.send(self.side.encode(message))

    async def hello(self) -> None:
        await self.control.send(self.side.hello())

    async def ready(self) -> None:
        await self.control.send(self.side.ready())

    async def run(self) -> None:
        """Serve control and inbox until Stop or the supervisor's death."""
        tasks = [
            asyncio.create_task(self._control_loop(), name="signalling.control"),
            asyncio.create_task(self._inbox_loop(), name="signalling.inbox"),
            asyncio.create_task(self._parent_watch(), name="signalling.parent"),
        ]
        try:
            await self.stopped.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _control_loop(self) -> None:
        while True:
            if (msg := self.side.decode(await self.control.recv())) is None:
                continue
            match msg:
                case p.Heartbeat(seq=seq):
                    progress = Progress(self.frames_done, sessions=self.session_count())
                    await self.control.send(self.side.ack(seq, progress))
                case p.Stop(reason=reason):
                    logger.info("stopping (%s)", reason or "requested")
                    self.stopped.set()
                case p.SessionFailed():
                    if self.on_session_failed is not None:
                        await self.on_session_failed(msg)
                case p.WorkerExited():
                    if self.on_worker_exited is not None:
                        self.on_worker_exited(msg)
                case _:
                    self.side.reject(f"{type(msg).__name__}: signalling does not take it")

    async def _inbox_loop(self) -> None:
        while True:
            raw = await self.inbox.recv()
            try:
                msg = self.inbox_codec.decode(raw)
            except p.MessageRejected as exc:
                self.side.reject(f"inbox message: {exc}")
                continue
            if self.on_inbox is None:
                self.side.reject(f"{type(msg).__name__}: no handler")
                continue
            try:
                await self.on_inbox(msg)
            except (KeyError, ValueError) as exc:
                self.side.reject(f"{type(msg).__name__}: {exc}")

    async def _parent_watch(self) -> None:
        """Stop when the supervisor exits: its pidfd becomes readable then."""
        try:
            fd = os.pidfd_open(self.spec.supervisor_pid)
        except ProcessLookupError:
            fd = None
        if fd is not None:
            gone = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_reader(fd, gone.set)
            try:
                await gone.wait()
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        logger.warning("supervisor is gone; exiting")
        self.stopped.set()

    def close(self) -> None:
        self.control.close(linger=100)
        self.inbox.close(linger=0)
        self.ctx.term()
