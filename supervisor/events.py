"""What happens to the supervisor (events) and what it does about it (effects): the two
vocabularies between :mod:`supervisor.core` (logic, no I/O) and :mod:`supervisor.process`
(sockets, processes, the clock).

The process layer turns everything it sees into one :data:`Event` and hands it to
``SupervisorCore.handle(event, now)``; it carries out the :data:`Effect` s that come back.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from services import protocol as p
from services.runtime import ServiceSpec
from supervisor.config import ServiceConfig

# ---------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Start:
    """Bring these services up, one after the other (each ready before the next starts)."""

    services: list[ServiceConfig]


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """A message on control.sock from the connection ``route``."""

    route: bytes
    message: p.ServiceToSupervisor


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """A request on admin.sock; its answer comes back as one :class:`Reply`."""

    request: p.AdminRequest


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A message the process layer could not decode (counted, logged)."""

    what: str


@dataclass(frozen=True, slots=True)
class Spawned:
    name: str
    pid: int


@dataclass(frozen=True, slots=True)
class SpawnFailed:
    """The process could not even be started (no pids or descriptors left)."""

    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Exited:
    """The process ``pid`` is gone (the process layer reaped it)."""

    pid: int
    code: int


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed: restarts, deadlines and heartbeats that are due."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The supervisor stops: every running child is asked to."""

    reason: str


Event = (
    Start
    | ControlMessage
    | AdminRequest
    | Unreadable
    | Spawned
    | SpawnFailed
    | Exited
    | Tick
    | Shutdown
)

# ---------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Send:
    """A control message to the process behind ``route`` (a proven connection)."""

    route: bytes
    message: p.SupervisorToService


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start a process for this spec; its pid comes back as :class:`Spawned`."""

    spec: ServiceSpec


@dataclass(frozen=True, slots=True)
class Kill:
    pid: int
    signal: signal.Signals = signal.SIGKILL


@dataclass(frozen=True, slots=True)
class StopRequested:
    """The whole supervisor should stop (an admin asked)."""

    reason: str


@dataclass(frozen=True, slots=True)
class StartupFailed:
    """A service the run cannot do without failed before it was ready: the run ends."""

    reason: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to the :class:`AdminRequest` being handled."""

    reply: p.AdminReply


Effect = Send | Spawn | Kill | StopRequested | StartupFailed | Reply
