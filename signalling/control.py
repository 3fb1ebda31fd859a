"""signalling's side of the control protocol, on asyncio (``zmq.asyncio``).

Mirrors :class:`services.runtime.ServiceProc`: ``Hello`` → ``Ready``, heartbeats answered,
``Stop`` honoured, garbage rejected and counted, the process exits with the supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio

from services import protocol as p
from services.runtime import ServiceSpec, service_sockets

logger = logging.getLogger(__name__)


class ControlLink:
    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.ctx = zmq.asyncio.Context()
        self.control, self.inbox = service_sockets(self.ctx, spec)
        self.control_codec = p.service_control_codec()
        self.inbox_codec = p.inbox_codec(p.SignallingInbox)
        self.rejected = 0
        self.frames_done = 0
        self.stopped = asyncio.Event()
        self.on_session_failed: Callable[[p.SessionFailed], Awaitable[None]] | None = None
        #: A Dreams worker the supervisor ran for us ended by itself.
        self.on_worker_exited: Callable[[p.WorkerExited], None] | None = None
        self.on_inbox: Callable[[p.SignallingInbox], Awaitable[None]] | None = None
        self.session_count: Callable[[], int] = lambda: 0

    async def send(self, message: p.ServiceToSupervisor) -> None:
        await self.control.send(self.control_codec.encode(message))

    async def hello(self) -> None:
        await self.send(p.Hello(service=self.spec.name, pid=os.getpid(), secret=self.spec.secret))

    async def ready(self) -> None:
        await self.send(p.Ready(service=self.spec.name))

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
            raw = await self.control.recv()
            try:
                msg = self.control_codec.decode(raw)
            except p.MessageRejected as exc:
                self.rejected += 1
                logger.warning("rejected control message: %s", exc)
                continue
            match msg:
                case p.Heartbeat(seq=seq):
                    await self.send(
                        p.HeartbeatAck(
                            seq=seq,
                            frames_done=self.frames_done,
                            frames_waiting=0,
                            rejected=self.rejected,
                            sessions=self.session_count(),
                        )
                    )
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
                    self.rejected += 1
                    logger.warning("rejected %s: signalling does not take it", type(msg).__name__)

    async def _inbox_loop(self) -> None:
        while True:
            raw = await self.inbox.recv()
            try:
                msg = self.inbox_codec.decode(raw)
            except p.MessageRejected as exc:
                self.rejected += 1
                logger.warning("rejected inbox message: %s", exc)
                continue
            if self.on_inbox is None:
                self.rejected += 1
                logger.warning("rejected %s: no handler", type(msg).__name__)
                continue
            try:
                await self.on_inbox(msg)
            except (KeyError, ValueError) as exc:
                self.rejected += 1
                logger.warning("rejected %s: %s", type(msg).__name__, exc)

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
