"""The supervisor's logic: one event in, effects out. No I/O.

:meth:`SupervisorCore.handle` is given what happened (:data:`supervisor.events.Event`: a
control message from a service, an admin request, a process started or exited, the time
passing, a shutdown) and answers with :data:`~supervisor.events.Effect` s: messages to send,
processes to start or signal, the reply to an admin request. :mod:`supervisor.process` owns
the sockets, the processes and the clock and carries the effects out; tests drive the core with
a fake clock. Its parts, each with one concern:

* :class:`~supervisor.children.Children`: the children's state machines and the routes to them;
* :class:`~supervisor.sessions.SessionTable`: sessions, their placement and rings (made through
  the :class:`~supervisor.sessions.RingStore` port);
* :class:`~supervisor.pipelines.PipelineSet`: the loaded pipelines and their status;
* here: start-up in order, heartbeats and deadlines, control messages, Dreams workers, status
  (process figures through the ``sample`` port).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import assert_never

from services import protocol as p
from services import topology
from services.runtime import ServiceSpec
from supervisor.children import Child, Children, State
from supervisor.config import Config, ServiceConfig
from supervisor.events import (
    AdminRequest,
    ControlMessage,
    Effect,
    Event,
    Exited,
    Kill,
    Reply,
    Shutdown,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    StartupFailed,
    StopRequested,
    Tick,
    Unreadable,
)
from supervisor.nodes import NodeTable
from supervisor.pipelines import PipelineSet
from supervisor.procstats import ProcessSample
from supervisor.sessions import NoRoom, RingStore, SessionTable
from supervisor.settle import InvalidRequest, NotLoaded

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """What every child's spec says about the run, and what status reports about it."""

    run_id: str
    run_dir: str
    pid: int
    secret: str
    models_dir: Path
    started: float


class SupervisorCore:
    def __init__(
        self,
        config: Config,
        run: RunInfo,
        rings: RingStore,
        sample: Callable[[int | None], ProcessSample] = lambda pid: ProcessSample(),
    ) -> None:
        self.config = config
        self.run = run
        self.sample = sample
        self.children = Children()
        #: The media nodes of a front (``[nodes]``), as its link reports them.
        self.nodes = NodeTable()
        self.sessions = SessionTable(config, self.children, rings, self.nodes)
        self.pipelines = PipelineSet(
            config, run.models_dir, self.children, self.sessions, self.nodes
        )
        self.phase: p.SupervisorPhase = "starting"
        #: Services still to bring up, in order (the first one is starting).
        self._startup: list[ServiceConfig] = []
        self.rejected = 0
        self._heartbeat_seq = 0
        self._next_heartbeat = 0.0

    # ------------------------------------------------------------ the one entry point

    def handle(self, event: Event, now: float) -> list[Effect]:
        match event:
            case Start(services=services):
                self._startup = list(services)
                return self._start_next()
            case ControlMessage(route=route, message=message):
                return self._control(route, message, now)
            case AdminRequest(request=request):
                reply, effects = self._admin(request, now)
                return [*effects, Reply(reply)]
            case Unreadable(what=what):
                self.rejected += 1
                logger.warning("rejected %s", what)
                return []
            case Spawned(name=name, pid=pid):
                self.children[name].started(pid, now)
                return []
            case SpawnFailed(name=name, reason=reason):
                return self._spawn_failed(name, reason, now)
            case Exited(pid=pid, code=code):
                return self._exited(pid, code, now)
            case Tick():
                return self._tick(now)
            case Shutdown(reason=reason):
                return self._shutdown(reason, now)
            case _:
                assert_never(event)

    def next_timer(self, now: float) -> float:
        """When the core next wants a :class:`Tick`."""
        due = self._next_heartbeat or now
        for child in self.children.values():
            if (at := child.next_due()) is not None:
                due = min(due, at)
        return due

    def close_all(self) -> None:
        """The process layer is done with every child: free every ring, mark every child."""
        self.sessions.close_all()
        for child in self.children.values():
            child.shut_down()

    # ------------------------------------------------------------ processes

    def add(self, svc: ServiceConfig) -> list[Effect]:
        """A new child under ``svc.name``, to be started."""
        child = Child(self._spec(svc), svc.restart)
        self.children[child.name] = child
        return [Spawn(child.spec)]

    def _start_next(self) -> list[Effect]:
        """Start-up: the next service once the one before is ready (or, for a pipeline,
        failed: its load error is its status, the server still serves)."""
        while self._startup:
            head = self.children.get(self._startup[0].name)
            if head is None:
                return self.add(self._startup[0])
            if head.state is State.READY or (head.state is State.FAILED and head.is_pipeline):
                self._startup.pop(0)
                continue
            return []
        if self.phase == "starting":
            self.phase = "running"
        return []

    def _startup_step(self, child: Child) -> list[Effect]:
        """A child of the start-up sequence went down: a service given up on (``failed``)
        ends the run; a pipeline's failed load is its status, and start-up goes on."""
        if self.phase != "starting" or not self._startup or self._startup[0].name != child.name:
            return []
        if child.state is State.FAILED and not child.is_pipeline:
            return [StartupFailed(f"{child.name} failed to start: {child.last_error}")]
        return self._start_next()

    def _spawn_failed(self, name: str, reason: str, now: float) -> list[Effect]:
        child = self.children.get(name)
        if child is None:
            return []
        child.pid = None
        child.schedule_restart(f"{name} could not be started: {reason}", now)
        return self._startup_step(child)

    def _exited(self, pid: int, code: int, now: float) -> list[Effect]:
        if (old := self.pipelines.retiring.pop(pid, None)) is not None:
            old.exited(code, now)
            return []
        child = self.children.by_pid(pid)
        if child is None:
            return []
        why = child.exited(code, now)
        if why is None:
            if child.removing:
                del self.children[child.name]
            return []
        if not child.controlled:  # a Dreams worker: gone; its owner decides what next
            del self.children[child.name]
            return list(self.children.send_to(child.owner or "", p.WorkerExited(child.name, why)))
        return self._child_down(child, why) + self._startup_step(child)

    def _child_down(self, child: Child, reason: str) -> list[Effect]:
        effects: list[Effect] = []
        # The process that owned sessions (signalling: their peer connections) took them with
        # it: close them everywhere and free their rings; its restart starts with none.
        for session_id in self.sessions.owned_by(child.name):
            logger.warning("session %s closed: its owner %s died", session_id, child.name)
            effects += self.sessions.close(session_id)
        if not child.fatal_to_sessions:
            # decode / encode / overlay carry their sessions on after a restart (a keyframe).
            return effects
        for session in self.sessions.through(child.name):
            effects += self.sessions.fail(session.session_id, child.name, reason)
        return effects

    def _shutdown(self, reason: str, now: float) -> list[Effect]:
        """Stop every running child (the process layer then waits, terminates, kills)."""
        self.phase = "stopping"
        self._startup.clear()
        effects: list[Effect] = []
        for child in self.children.values():
            if child.pid is not None:
                child.stop(now, self.config.stop_timeout_s)
                if child.controlled:
                    effects += self.children.send(child, p.Stop(reason=reason))
                else:  # a Dreams worker hears no Stop: SIGTERM is its clean shutdown
                    effects.append(Kill(child.pid, signal.SIGTERM))
        return effects

    # ------------------------------------------------------------ the clock

    def _tick(self, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for child in list(self.children.values()):
            if child.state is State.RESTARTING and now >= child.restart_due:
                effects.append(Spawn(child.spec))
            elif child.overdue(now, self.config) and child.pid is not None:
                effects.append(Kill(child.pid))
        if now >= self._next_heartbeat:
            self._heartbeat_seq += 1
            for child in self.children.values():
                if child.state is State.READY:
                    child.heartbeat_sent(now)
                    effects += self.children.send(child, p.Heartbeat(seq=self._heartbeat_seq))
            self._next_heartbeat = now + self.config.heartbeat_interval_s
        return effects

    # ------------------------------------------------------------ control messages

    def _control(self, route: bytes, msg: p.ServiceToSupervisor, now: float) -> list[Effect]:
        if isinstance(msg, p.Hello):
            child = self.children.get(msg.service)
            if child is None or not child.proven(msg, self.run.secret, route):
                self.rejected += 1
                logger.warning("rejected Hello from %r claiming %s", route, msg.service)
                return []
            logger.debug("hello from %s (pid %d)", child.name, msg.pid)
            return []
        child = self.children.by_route(route)
        if child is None:
            self.rejected += 1
            logger.warning("rejected %s from unknown peer %r", type(msg).__name__, route)
            return []
        match msg:
            case p.Ready():
                child.ready(now)
                return self.sessions.starts_for(child.name, route) + self._start_next()
            case p.HeartbeatAck():
                child.acked(msg, now)
            case p.ServiceFailed(reason=reason):
                child.said_failed(reason)
            case p.SessionFailed():
                logger.error("session %s failed in %s: %s", msg.session_id, msg.service, msg.reason)
                return self.sessions.notify_owner(msg)
            case p.SessionStarted():
                pass
            case p.NodeReport():
                return self.sessions.node_report(msg, self.pipelines.loads, now)
            case _:
                assert_never(msg)
        return []

    # ------------------------------------------------------------ admin requests

    def _admin(self, request: p.AdminRequest, now: float) -> tuple[p.AdminReply, list[Effect]]:
        match request:
            case p.GetStatus():
                return self.status(now), []
            case p.Shutdown(reason=reason):
                return p.Ack(), [StopRequested(reason or "supervisor stop")]
            case p.OpenSession():
                try:
                    states = self.pipelines.states()
                    return self.sessions.open(request, self.pipelines.order, states, now)
                except NoRoom as exc:
                    logger.warning("session %s refused: %s", request.session_id, exc)
                    return p.Rejected(reason=str(exc), why="unavailable"), []
                except NotLoaded as exc:
                    return p.Rejected(reason=str(exc), why="not_loaded"), []
                except InvalidRequest as exc:
                    return p.Rejected(str(exc), "invalid", exc.problems), []
                except topology.ChainError as exc:  # names pipeline_ids
                    return p.Rejected(str(exc), "invalid", [str(exc)]), []
                except (ValueError, OSError) as exc:
                    return p.Rejected(reason=str(exc)), []
            case p.CloseSession(session_id=session_id):
                if session_id not in self.sessions:
                    return p.Rejected(reason=f"unknown session {session_id!r}"), []
                return p.Ack(), self.sessions.close(session_id)
            case p.LoadPipelines(pipelines=loads):
                try:
                    return p.Ack(), self.pipelines.load(loads, self.add, now)
                except ValueError as exc:
                    return p.Rejected(reason=str(exc)), []
            case p.StartWorker():
                try:
                    return p.Ack(), self._start_worker(request)
                except ValueError as exc:
                    return p.Rejected(reason=str(exc)), []
            case p.StopWorker(name=name):
                return p.Ack(), self._stop_worker(name, now)
            case _:
                assert_never(request)

    # ------------------------------------------------------------ Dreams workers

    def _start_worker(self, req: p.StartWorker) -> list[Effect]:
        if not req.name or not all(c.isalnum() or c in "-_." for c in req.name):
            raise ValueError(f"invalid worker name {req.name!r}")
        name = topology.dreams_worker_service(req.name)
        effects: list[Effect] = []
        current = self.children.pop(name, None)
        if current is not None and current.pid is not None:
            self.pipelines.retiring[current.pid] = current  # replaced: its exit is no news
            effects.append(Kill(current.pid))
        options = {"args": list(req.args), "token": req.token}
        svc = ServiceConfig(name, topology.DREAMS_WORKER, options, self.config.restart)
        effects += self.add(svc)
        self.children[name].owner = req.owner
        return effects

    def _stop_worker(self, name: str, now: float) -> list[Effect]:
        child = self.children.get(topology.dreams_worker_service(name))
        if child is None or child.pid is None or child.state is State.STOPPING:
            return []
        child.stop(now, self.config.stop_timeout_s, removing=True)
        return [Kill(child.pid, signal.SIGTERM)]

    # ------------------------------------------------------------ status

    def status(self, now: float) -> p.StatusReport:
        return p.StatusReport(
            run_id=self.run.run_id,
            pid=self.run.pid,
            uptime_s=now - self.run.started,
            services=[
                p.ServiceStatus(
                    name=c.name,
                    state=c.state.value,
                    pid=c.pid,
                    uptime_s=c.uptime_s(now),
                    restarts=c.restarts,
                    frames_done=c.frames_done,
                    rejected=c.rejected,
                    sessions=c.sessions,
                    last_error=c.last_error,
                    device=c.device,
                    memory_free_bytes=c.memory_free_bytes,
                    stage_ms=c.stage_ms,
                    **asdict(self.sample(c.pid)),
                )
                for c in self.children.values()
            ],
            sessions=sorted(self.sessions.sessions),
            rejected=self.rejected,
            phase=self.phase,
            pipelines=self.pipelines.states(),
            rings=self.sessions.ring_states(),
            nodes=list(self.nodes.reports.values()),
        )

    def _spec(self, svc: ServiceConfig) -> ServiceSpec:
        return ServiceSpec(
            name=svc.name,
            kind=svc.kind,
            run_dir=self.run.run_dir,
            run_id=self.run.run_id,
            supervisor_pid=self.run.pid,
            log_level=self.config.log_level,
            options=svc.options,
            secret=self.run.secret,
        )
