"""The service side of the control protocol, without I/O: one implementation for every
process the supervisor runs (``services.runtime.ServiceProc`` on blocking ZeroMQ, signalling's
``ControlLink`` on asyncio).

It says who the process is (``Hello`` with its pid and the run's secret, then ``Ready``),
decodes what the supervisor sends and counts what it refuses (undecodable, or a message this
kind of process does not take: one counter, reported in every heartbeat ack), and builds the
ack from what the process reports of itself.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from services import protocol as p

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Progress:
    """What a service reports on each heartbeat."""

    frames_done: int = 0
    frames_waiting: int = 0
    sessions: int = 0
    memory_free_bytes: int | None = None
    call_running_s: float = 0.0
    longest_call_s: float = 0.0
    calls_done: int = 0
    loras: list[p.LoraAdapter] = field(default_factory=list)
    stage_ms: dict[str, float] = field(default_factory=dict)


class ControlSide:
    """One process's end of the control connection: its messages out, its rejects counted."""

    def __init__(self, service: str, secret: str) -> None:
        self.service = service
        self.secret = secret
        self.codec = p.service_control_codec()
        #: Messages refused (control or inbox): the heartbeat reports them.
        self.rejected = 0

    def hello(self) -> bytes:
        return self.codec.encode(p.Hello(service=self.service, pid=os.getpid(), secret=self.secret))

    def ready(self) -> bytes:
        return self.codec.encode(p.Ready(service=self.service))

    def encode(self, message: p.ServiceToSupervisor) -> bytes:
        return self.codec.encode(message)

    def decode(self, raw: bytes) -> p.SupervisorToService | None:
        """The supervisor's message, or None (refused, counted)."""
        try:
            return self.codec.decode(raw)
        except p.MessageRejected as exc:
            self.reject(f"control message: {exc}")
            return None

    def reject(self, what: str) -> None:
        """A message refused: counted, logged."""
        self.rejected += 1
        logger.warning("rejected %s", what)

    def ack(self, seq: int, progress: Progress) -> bytes:
        return self.codec.encode(
            p.HeartbeatAck(
                seq=seq,
                frames_done=progress.frames_done,
                frames_waiting=progress.frames_waiting,
                rejected=self.rejected,
                sessions=progress.sessions,
                memory_free_bytes=progress.memory_free_bytes,
                call_running_s=progress.call_running_s,
                longest_call_s=progress.longest_call_s,
                calls_done=progress.calls_done,
                loras=progress.loras,
                stage_ms=progress.stage_ms,
            )
        )
