"""The supervisor's logic: what to do about each message, exit and tick. No I/O.

:class:`SupervisorCore` is given what happened (a control message from a service, an admin
request, a process that exited, the time) and answers with :data:`Effect`\\ s: messages to send
to services, processes to start or signal. :mod:`supervisor.process` owns the sockets, the
processes and the clock, and carries the effects out; tests drive the core with a fake clock.
Rings are made and freed through a :class:`RingStore`, the one piece of shared state it touches.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from services import protocol as p
from services import topology
from services.runtime import ServiceSpec
from shm.ring import RingError, RingStats
from supervisor.children import Child, State
from supervisor.config import Config, ServiceConfig, default_home
from supervisor.nodes import NodeTable, Placement
from supervisor.procstats import ProcessSample

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- effects


@dataclass(frozen=True, slots=True)
class Send:
    """A control message to the process behind ``route`` (a proven connection)."""

    route: bytes
    message: p.SupervisorToService


@dataclass(frozen=True, slots=True)
class Spawn:
    """Start a process for this spec; its pid goes back in :meth:`SupervisorCore.spawned`."""

    spec: ServiceSpec


@dataclass(frozen=True, slots=True)
class Kill:
    pid: int
    signal: signal.Signals = signal.SIGKILL


@dataclass(frozen=True, slots=True)
class StopRequested:
    """The admin asked the whole supervisor to stop."""

    reason: str


Effect = Send | Spawn | Kill | StopRequested


class RingStore(Protocol):
    """Where the core's session rings live (shared memory; a dict in tests)."""

    def create(self, key: str, slots: int, nbytes: int) -> str: ...
    def free(self, name: str) -> None: ...
    def stats(self, name: str) -> RingStats: ...
    def room(self, slots: int, nbytes: int) -> tuple[int, int]:
        """(bytes one such ring takes, bytes free where rings live)."""
        ...


class NoRoom(RuntimeError):
    """Not enough shared memory for a session's rings: the server is full, not the request
    wrong (503)."""


# ---------------------------------------------------------------- sessions


@dataclass
class ChainSession:
    """A session as the supervisor keeps it: its chain of stages and the rings between."""

    session_id: str
    stages: list[str]
    width: int
    height: int
    sink: str | None
    params: dict[str, object]
    owner: str | None = None
    mode: str = "video"
    codec: str = "VP8"
    rings: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: The media node it runs on (None: here); its stages are ``node/<name>/…``.
    node: str | None = None
    opened_at: float = 0.0

    def start_message(self, stage: str) -> p.StartSession:
        i = self.stages.index(stage)
        return p.StartSession(
            session_id=self.session_id,
            width=self.width,
            height=self.height,
            input_ring=self.rings[i - 1] if i > 0 else None,
            output_ring=self.rings[i] if i < len(self.rings) else None,
            downstream=self.stages[i + 1] if i + 1 < len(self.stages) else self.sink,
            params=dict(self.params),
            mode=self.mode,
            codec=self.codec,
        )


# ---------------------------------------------------------------- the service plan


def service_plan(config: Config, models_dir: Path) -> list[ServiceConfig]:
    """Data-plane services first, signalling last (the API answers once all are up)."""
    pipelines = config.pipelines if config.local_pipelines else []
    plan = [svc for pid in pipelines for svc in pipeline_services(config, models_dir, pid)]
    if config.media:
        decode, encode = msgspec.to_builtins(config.decode), msgspec.to_builtins(config.encode)
        plan.append(ServiceConfig(topology.DECODE, topology.DECODE, decode, config.restart))
        plan.append(ServiceConfig(topology.ENCODE, topology.ENCODE, encode, config.restart))
    plan += config.services
    if config.nodes is not None:
        options = {**msgspec.to_builtins(config.nodes)}
        plan.append(ServiceConfig(topology.NODES, topology.NODES, options, config.restart))
    if config.node is not None:
        node = config.node
        options = {
            "name": node.name,
            "join": node.join,
            "secret_key": node.secret_key,
            "front_public_key": node.front_public_key,
            "timeout_s": node.timeout_s,
            "beat_interval_s": config.heartbeat_interval_s,
        }
        plan.append(ServiceConfig(topology.NODE_LINK, topology.NODE_LINK, options, config.restart))
    if config.signalling:
        options = {
            "host": config.host,
            "port": config.port,
            "max_sessions": config.max_sessions,
            "connect_timeout_s": config.connect_timeout_s,
            "models_dir": str(models_dir),
            "home": str(Path(config.home).expanduser() if config.home else default_home()),
            "api": msgspec.to_builtins(config.api),
            "dreams": msgspec.to_builtins(config.dreams),
        }
        plan.append(
            ServiceConfig(topology.SIGNALLING, topology.SIGNALLING, options, config.restart)
        )
    return plan


def pipeline_services(
    config: Config, models_dir: Path, pipeline_id: str, load_params: dict[str, Any] | None = None
) -> list[ServiceConfig]:
    """The process of a pipeline, or with ``devices`` configured one per device (a model
    pipeline; the overlay stays one process)."""
    options: dict[str, object] = {
        "pipeline": pipeline_id,
        "load_params": dict(load_params or {}),
        "models_dir": str(models_dir),
    }
    name = topology.service_of_pipeline(pipeline_id)
    kind = topology.kind_of_service(name)
    if kind == topology.OVERLAY:
        if config.overlay_model:
            options["model"] = config.overlay_model
            options["model_options"] = dict(config.overlay_model_options)
        return [ServiceConfig(name, kind, options, config.restart)]
    if not config.devices:
        return [ServiceConfig(name, kind, options, config.restart)]
    return [
        ServiceConfig(
            topology.device_service(pipeline_id, device),
            kind,
            {**options, "device": device},
            config.restart,
        )
        for device in config.devices
    ]


def same_load(running: dict[str, Any], wanted: dict[str, Any], load_keys: list[str]) -> bool:
    """Whether a pipeline process started with ``running`` options serves a load asking for
    ``wanted``: everything equal but the load params outside ``load_keys`` (none: all count)."""

    def identity(options: dict[str, Any]) -> dict[str, Any]:
        params = dict(options.get("load_params", {}))
        if load_keys:
            params = {k: v for k, v in params.items() if k in load_keys}
        return {**options, "load_params": params}

    return identity(running) == identity(wanted)


# ---------------------------------------------------------------- the core


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
        self.rings = rings
        self.sample = sample
        self.children: dict[str, Child] = {}
        #: Processes replaced under their name (an unload still stopping, then a new load):
        #: by pid, until their exit is seen.
        self.retiring: dict[int, Child] = {}
        self.sessions: dict[str, ChainSession] = {}
        #: The pipelines last asked for, in order (the first is the one status reports).
        self.pipeline_order: list[str] = list(config.pipelines)
        #: The media nodes of a front (``[nodes]``), as its link reports them.
        self.node_table = NodeTable()
        #: The pipelines a client last asked for (a node that joins later is given them).
        self.loads: list[p.PipelineLoad] | None = None
        self.phase: p.SupervisorPhase = "starting"
        self.rejected = 0
        self._heartbeat_seq = 0
        self._next_heartbeat = 0.0

    # ------------------------------------------------------------ processes

    def add(self, svc: ServiceConfig) -> list[Effect]:
        """A new child under ``svc.name``, to be started."""
        child = Child(self._spec(svc), svc.restart)
        self.children[child.name] = child
        return [Spawn(child.spec)]

    def spawned(self, name: str, pid: int, now: float) -> None:
        self.children[name].started(pid, now)

    def spawn_failed(self, name: str, reason: str, now: float) -> list[Effect]:
        """The process could not even be started (no pids or descriptors left)."""
        child = self.children.get(name)
        if child is None:
            return []
        child.pid = None
        why = f"{name} could not be started: {reason}"
        child.schedule_restart(why, now)
        return []

    def exited(self, pid: int, code: int, now: float) -> list[Effect]:
        """The process ``pid`` is gone (the process layer reaped it)."""
        if (old := self.retiring.pop(pid, None)) is not None:
            old.exited(code, now)
            return []
        child = next((c for c in self.children.values() if c.pid == pid), None)
        if child is None:
            return []
        why = child.exited(code, now)
        if why is None:
            if child.removing:
                del self.children[child.name]
            return []
        if not child.controlled:  # a Dreams worker: gone; its owner decides what next
            del self.children[child.name]
            return self._send_to(child.owner or "", p.WorkerExited(child.name, why))
        return self._child_down(child, why)

    def _child_down(self, child: Child, reason: str) -> list[Effect]:
        effects: list[Effect] = []
        # The process that owned sessions (signalling: their peer connections) took them with
        # it: close them everywhere and free their rings; its restart starts with none.
        for session_id in [sid for sid, s in self.sessions.items() if s.owner == child.name]:
            logger.warning("session %s closed: its owner %s died", session_id, child.name)
            effects += self.close_session(session_id)
        if not child.fatal_to_sessions:
            # decode / encode / overlay carry their sessions on after a restart (a keyframe).
            return effects
        for session in self.sessions.values():
            if child.name in session.stages:
                failed = p.SessionFailed(session.session_id, child.name, reason)
                effects += self._notify_owner(failed)
        return effects

    def begin_shutdown(self, reason: str, now: float) -> list[Effect]:
        """Stop every running child (the process layer then waits, terminates, kills)."""
        self.phase = "stopping"
        effects: list[Effect] = []
        for child in self.children.values():
            if child.pid is not None:
                child.stop(now, self.config.stop_timeout_s)
                if child.controlled:
                    effects += self._send(child, p.Stop(reason=reason))
                else:  # a Dreams worker hears no Stop: SIGTERM is its clean shutdown
                    effects.append(Kill(child.pid, signal.SIGTERM))
        return effects

    def close_all(self) -> None:
        for session_id in list(self.sessions):
            self._free_rings(self.sessions.pop(session_id))
        for child in self.children.values():
            child.shut_down()

    # ------------------------------------------------------------ the clock

    def next_timer(self, now: float) -> float:
        due = self._next_heartbeat or now
        for child in self.children.values():
            if (at := child.next_due()) is not None:
                due = min(due, at)
        return due

    def timers(self, now: float) -> list[Effect]:
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
                    effects += self._send(child, p.Heartbeat(seq=self._heartbeat_seq))
            self._next_heartbeat = now + self.config.heartbeat_interval_s
        return effects

    # ------------------------------------------------------------ control messages

    def control(self, route: bytes, msg: p.ServiceToSupervisor, now: float) -> list[Effect]:
        """A message on control.sock from the connection ``route``."""
        if isinstance(msg, p.Hello):
            child = self.children.get(msg.service)
            if child is None or not child.proven(msg, self.run.secret, route):
                self.rejected += 1
                logger.warning("rejected Hello from %r claiming %s", route, msg.service)
                return []
            logger.debug("hello from %s (pid %d)", child.name, msg.pid)
            return []
        child = next((c for c in self.children.values() if c.route == route), None)
        if child is None:
            self.rejected += 1
            logger.warning("rejected %s from unknown peer %r", type(msg).__name__, route)
            return []
        match msg:
            case p.Ready():
                child.ready(now)
                return [
                    Send(route, session.start_message(child.name))
                    for session in self.sessions.values()
                    if child.name in session.stages
                ]
            case p.HeartbeatAck():
                child.acked(msg, now)
            case p.ServiceFailed(reason=reason):
                child.said_failed(reason)
            case p.SessionFailed():
                logger.error("session %s failed in %s: %s", msg.session_id, msg.service, msg.reason)
                return self._notify_owner(msg)
            case p.SessionStarted():
                pass
            case p.NodeReport():
                return self._node_report(msg, now)
        return []

    def reject(self, what: str) -> None:
        """A message the process layer could not read."""
        self.rejected += 1
        logger.warning("rejected %s", what)

    def _send(self, child: Child, message: p.SupervisorToService) -> list[Effect]:
        if child.route is None:
            return []  # not (yet) proven: nothing is routed to it
        return [Send(child.route, message)]

    def _send_to(self, name: str, message: p.SupervisorToService) -> list[Effect]:
        child = self.children.get(name)
        if child is None or child.state is not State.READY:
            return []
        return self._send(child, message)

    def _notify_owner(self, msg: p.SessionFailed) -> list[Effect]:
        """Session failures go to the session's owner (signalling), which tells the client."""
        session = self.sessions.get(msg.session_id)
        if session is None:
            return []
        session.failures.append(msg.reason)
        return self._send_to(session.owner or "", msg)

    # ------------------------------------------------------------ admin requests

    def admin(self, request: p.AdminRequest, now: float) -> tuple[p.AdminReply, list[Effect]]:
        match request:
            case p.GetStatus():
                return self.status(now), []
            case p.Shutdown(reason=reason):
                return p.Ack(), [StopRequested(reason or "supervisor stop")]
            case p.OpenSession():
                try:
                    return self.open_session(request, now)
                except NoRoom as exc:
                    logger.warning("session %s refused: %s", request.session_id, exc)
                    return p.Rejected(reason=str(exc), unavailable=True), []
                except (ValueError, OSError) as exc:
                    return p.Rejected(reason=str(exc)), []
            case p.CloseSession(session_id=session_id):
                if session_id not in self.sessions:
                    return p.Rejected(reason=f"unknown session {session_id!r}"), []
                return p.Ack(), self.close_session(session_id)
            case p.LoadPipelines(pipelines=loads):
                try:
                    return p.Ack(), self.load_pipelines(loads, now)
                except ValueError as exc:
                    return p.Rejected(reason=str(exc)), []
            case p.StartWorker():
                try:
                    return p.Ack(), self.start_worker(request, now)
                except ValueError as exc:
                    return p.Rejected(reason=str(exc)), []
            case p.StopWorker(name=name):
                return p.Ack(), self.stop_worker(name, now)
        return p.Rejected(reason="unhandled request"), []

    # ------------------------------------------------------------ pipelines

    def load_pipelines(self, loads: list[p.PipelineLoad], now: float) -> list[Effect]:
        """Start the inference processes asked for; stop those no longer wanted."""
        wanted: dict[str, ServiceConfig] = {}
        load_keys: dict[str, list[str]] = {}
        for load in loads:
            pid = load.pipeline_id
            if not pid or not all(c.isalnum() or c in "-_." for c in pid) or len(pid) > 64:
                raise ValueError(f"invalid pipeline id {pid!r}")
            if not self.config.local_pipelines:
                continue
            for svc in pipeline_services(self.config, self.run.models_dir, pid, load.load_params):
                wanted[svc.name] = svc
                load_keys[svc.name] = load.load_keys
        self.loads = list(loads)
        self.node_table.wanted = {load.pipeline_id: dict(load.load_params) for load in loads}
        effects: list[Effect] = []
        for node in self.node_table.up():
            effects += self._to_node(node.node, p.LoadPipelines(list(loads)))
        for name, child in list(self.children.items()):
            if not child.is_pipeline or child.removing:
                continue
            same = wanted.get(name)
            if same is not None and same_load(child.spec.options, same.options, load_keys[name]):
                # Only session settings changed (Scope's UI sends them with every load): the
                # process stays; status shows them and new sessions take them as defaults.
                child.spec.options["load_params"] = same.options["load_params"]
                if child.state is State.FAILED:  # asked again after a failed load: once more
                    child.retry()
                    effects.append(Spawn(child.spec))
                continue
            effects += self._unload(child, now)
        for name, svc in wanted.items():
            current = self.children.get(name)
            if current is not None and not current.removing:
                continue
            if current is not None and current.pid is not None:
                # Still stopping with other load params: killed, replaced under the same name.
                self.retiring[current.pid] = current
                effects.append(Kill(current.pid))
            effects += self.add(svc)
        self.pipeline_order = [load.pipeline_id for load in loads]
        return effects

    def _unload(self, child: Child, now: float) -> list[Effect]:
        effects: list[Effect] = []
        for session in list(self.sessions.values()):
            if child.name in session.stages:
                reason = f"{child.name} was unloaded"
                effects += self._notify_owner(
                    p.SessionFailed(session.session_id, child.name, reason)
                )
        if child.pid is None:
            del self.children[child.name]
            return effects
        effects += self._send(child, p.Stop(reason="unloaded"))
        child.stop(now, self.config.stop_timeout_s, removing=True)
        return effects

    # ------------------------------------------------------------ Dreams workers

    def start_worker(self, req: p.StartWorker, now: float) -> list[Effect]:
        if not req.name or not all(c.isalnum() or c in "-_." for c in req.name):
            raise ValueError(f"invalid worker name {req.name!r}")
        name = topology.dreams_worker_service(req.name)
        effects: list[Effect] = []
        current = self.children.pop(name, None)
        if current is not None and current.pid is not None:
            self.retiring[current.pid] = current  # replaced: its exit is no news
            effects.append(Kill(current.pid))
        options = {"args": list(req.args), "token": req.token}
        svc = ServiceConfig(name, topology.DREAMS_WORKER, options, self.config.restart)
        effects += self.add(svc)
        self.children[name].owner = req.owner
        return effects

    def stop_worker(self, name: str, now: float) -> list[Effect]:
        child = self.children.get(topology.dreams_worker_service(name))
        if child is None or child.pid is None or child.state is State.STOPPING:
            return []
        child.stop(now, self.config.stop_timeout_s, removing=True)
        return [Kill(child.pid, signal.SIGTERM)]

    def pipeline_children(self, pipeline_id: str) -> list[Child]:
        """The processes of a pipeline: one, or one per device."""
        return [
            c for c in self.children.values() if c.pipeline_id == pipeline_id and not c.removing
        ]

    def pipeline_states(self) -> list[p.PipelineState]:
        """A pipeline is loaded while one of its processes (one per device) is up: sessions go
        to those; an error only when all failed; else loading."""
        states = []
        on_nodes = {s.pipeline_id: s for s in self.node_table.pipeline_states()}
        for pid in self.pipeline_order:
            children = self.pipeline_children(pid)
            remote = on_nodes.pop(pid, None)
            if remote is not None and (
                remote.status == "loaded" or not any(c.state is State.READY for c in children)
            ):
                states.append(remote)  # loaded on a node, and not (or not better) here
                continue
            if not children:
                continue
            if any(c.state is State.READY for c in children):
                status = "loaded"
            elif all(c.state is State.FAILED for c in children):
                status = "error"
            else:
                status = "loading"
            failed = next((c for c in children if c.state is State.FAILED), children[0])
            states.append(
                p.PipelineState(
                    pipeline_id=pid,
                    status=status,
                    load_params=dict(children[0].spec.options.get("load_params", {})),
                    error=(failed.failure_reason or failed.last_error)
                    if status == "error"
                    else None,
                )
            )
        return states + list(on_nodes.values())

    # ------------------------------------------------------------ status

    def status(self, now: float) -> p.StatusReport:
        return p.StatusReport(
            run_id=self.run.run_id,
            pid=self.run.pid,
            uptime_s=now - self.run.started,
            services=[
                p.ServiceStatus(
                    name=c.name,
                    state=str(c.state),
                    pid=c.pid,
                    uptime_s=c.uptime_s(now),
                    restarts=c.restarts,
                    frames_done=c.frames_done,
                    rejected=c.rejected,
                    sessions=c.sessions,
                    last_error=c.last_error,
                    device=c.device,
                    memory_free_bytes=c.memory_free_bytes,
                    **asdict(self.sample(c.pid)),
                )
                for c in self.children.values()
            ],
            sessions=sorted(self.sessions),
            rejected=self.rejected,
            phase=self.phase,
            pipelines=self.pipeline_states(),
            rings=self.ring_states(),
            nodes=list(self.node_table.reports.values()),
        )

    def ring_states(self) -> list[p.RingStatus]:
        """Every session ring's counters (metrics): ring i joins stages i and i+1."""
        out = []
        for session in self.sessions.values():
            for i, ring in enumerate(session.rings):
                st = self.rings.stats(ring)
                out.append(
                    p.RingStatus(
                        session_id=session.session_id,
                        ring=ring,
                        producer=session.stages[i],
                        consumer=session.stages[i + 1],
                        slots=self.config.ring_slots,
                        published=st.published,
                        consumed=st.consumed,
                        skipped=st.skipped,
                        torn=st.torn,
                        pending=st.pending,
                    )
                )
        return out

    # ------------------------------------------------------------ sessions

    def open_session(
        self, req: p.OpenSession, now: float = 0.0
    ) -> tuple[p.SessionOpened, list[Effect]]:
        cfg = self.config
        if req.session_id in self.sessions:
            raise ValueError(f"session {req.session_id!r} already exists")
        if not req.session_id.replace("-", "").isalnum() or len(req.session_id) > 64:
            raise ValueError("session_id must be 1-64 letters, digits or '-'")
        if req.stages:
            if req.pipeline_ids:
                raise ValueError("give pipeline_ids or stages, not both")
            stages = list(req.stages)
        else:
            placement = self._place(req)
            if (node := topology.split_node(placement.stages[0])[0]) is not None:
                return self._open_on_node(req, node, placement, now)
            stages = placement.stages
        unknown = [s for s in stages if s not in self.children]
        if unknown or not stages:
            raise ValueError(
                f"unknown stage(s): {', '.join(unknown) or '(none given)'}"
                f" (this server runs: {', '.join(self.children) or 'nothing'})"
            )
        self._check_size(req)
        session = ChainSession(
            req.session_id, stages, req.width, req.height, req.sink, dict(req.params),
            owner=req.owner, mode=req.mode, codec=req.codec, opened_at=now,
        )  # fmt: skip
        frame_bytes = req.width * req.height * 3
        ring_bytes, free = self.rings.room(cfg.ring_slots, frame_bytes)
        needed = ring_bytes * (len(stages) - 1)
        no_room = (
            f"no room in /dev/shm for a {req.width}×{req.height} session: "
            f"{needed / 2**20:.1f} MB needed, {free / 2**20:.1f} MB free"
        )
        if needed > free:
            raise NoRoom(no_room)
        try:
            for i in range(len(stages) - 1):
                key = f"{req.session_id}.{i}"
                session.rings.append(self.rings.create(key, cfg.ring_slots, frame_bytes))
        except RingError as exc:  # taken between the check and now, or another failure
            self._free_rings(session)
            raise NoRoom(f"{no_room} ({exc})") from exc
        except Exception:
            self._free_rings(session)
            raise
        self.sessions[req.session_id] = session
        effects: list[Effect] = []
        for stage in stages:
            effects += self._send_to(stage, session.start_message(stage))
        logger.info("session %s opened: %s", req.session_id, " → ".join(stages))
        opened = p.SessionOpened(req.session_id, stages=stages, rings=list(session.rings))
        return opened, effects

    def _check_size(self, req: p.OpenSession) -> None:
        cfg = self.config
        if not (0 < req.width <= cfg.max_frame_width and 0 < req.height <= cfg.max_frame_height):
            raise ValueError(
                f"{req.width}x{req.height} is outside 1x1..{cfg.max_frame_width}x"
                f"{cfg.max_frame_height}"
            )

    def _place(self, req: p.OpenSession) -> Placement:
        """The session's chain, planned from its pipelines where they are loaded: here, or on
        a media node; the place with the most room takes it (:func:`topology.place`)."""
        asked = req.pipeline_ids or None
        options: list[Placement] = []
        error: topology.ChainError | None = None
        loaded = [
            c.pipeline_id
            for c in self.children.values()
            if c.pipeline_id is not None and c.state is State.READY and not c.removing
        ]
        try:
            ordered = [pid for pid in self.pipeline_order if pid in loaded]
            chain = topology.plan_chain(ordered + [x for x in loaded if x not in ordered], asked)
        except topology.ChainError as exc:
            error = exc
        else:
            stages = [self._placed(stage) for stage in chain.stages(req.mode)]
            first = next(
                (s for s in stages if topology.stage_kind(s) in chain.processing), stages[0]
            )
            child = self.children.get(first)
            free = child.memory_free_bytes if child is not None else None
            room = topology.Room(first, free, self._sessions_in(first))
            options.append(Placement(stages, chain.pipeline_ids, room))
        placed: dict[str, int] = {}
        for session in self.sessions.values():
            if session.node is not None:
                placed[session.node] = placed.get(session.node, 0) + 1
        options += self.node_table.placements(asked, req.mode, placed)
        if not options:
            remote = self.node_table.pipeline_states()
            everywhere = loaded + [s.pipeline_id for s in remote if s.status == "loaded"]
            topology.plan_chain([s for s in everywhere if s], asked)  # says what is missing
            raise error or topology.ChainError(
                f"pipeline_ids: no server has all of {', '.join(asked or everywhere)} loaded"
            )
        best = topology.place([o.room for o in options])
        return next(o for o in options if o.room.service == best)

    def _open_on_node(
        self, req: p.OpenSession, node: str, placement: Placement, now: float
    ) -> tuple[p.SessionOpened, list[Effect]]:
        """A session on a media node: its rings are the node's; the front's link carries the
        request there (a failure comes back as ``SessionFailed``)."""
        self._check_size(req)
        session = ChainSession(
            req.session_id, placement.stages, req.width, req.height, req.sink,
            dict(req.params), owner=req.owner, mode=req.mode, codec=req.codec, node=node,
            opened_at=now,
        )  # fmt: skip
        self.sessions[req.session_id] = session
        request = p.OpenSession(
            session_id=req.session_id,
            width=req.width,
            height=req.height,
            pipeline_ids=list(placement.pipeline_ids),
            params=dict(req.params),
            mode=req.mode,
            codec=req.codec,
        )
        logger.info(
            "session %s opened on node %s: %s", req.session_id, node, " → ".join(session.stages)
        )
        opened = p.SessionOpened(req.session_id, stages=list(session.stages), rings=[])
        return opened, self._to_node(node, request)

    def _to_node(
        self, node: str, request: p.OpenSession | p.CloseSession | p.LoadPipelines
    ) -> list[Effect]:
        return self._send_to(topology.NODES, p.ToNode(node, request))

    def _node_report(self, report: p.NodeReport, now: float) -> list[Effect]:
        """A node's beat (or its loss): its sessions stop when it is lost; what it and the
        front disagree on is settled (the front's view wins)."""
        joined = self.node_table.update(report)
        effects: list[Effect] = []
        mine = [s for s in self.sessions.values() if s.node == report.node]
        if not report.up:
            for session in mine:
                failed = p.SessionFailed(
                    session.session_id, topology.node_service(report.node, ""), report.reason
                )
                effects += self._notify_owner(failed)
            return effects
        if joined:
            logger.info("media node %s is up (%s)", report.node, report.address)
            if self.loads is not None:
                effects += self._to_node(report.node, p.LoadPipelines(list(self.loads)))
        for session_id in set(report.sessions) - {s.session_id for s in mine}:
            effects += self._to_node(report.node, p.CloseSession(session_id))
        grace = self.config.heartbeat_interval_s * 4
        for session in mine:
            if session.session_id not in report.sessions and now - session.opened_at > grace:
                if session.failures:
                    continue  # told once
                reason = f"media node {report.node} no longer serves the session"
                failed = p.SessionFailed(
                    session.session_id, topology.node_service(report.node, ""), reason
                )
                effects += self._notify_owner(failed)
        return effects

    def _placed(self, stage: str) -> str:
        """A pipeline's per-device processes: the one with the most room takes the session."""
        if stage in self.children:
            return stage
        rooms = [
            topology.Room(c.name, c.memory_free_bytes, self._sessions_in(c.name))
            for c in self.children.values()
            if topology.split_device(c.name)[0] == stage and c.state is State.READY
        ]
        return topology.place(rooms) if rooms else stage

    def _sessions_in(self, service: str) -> int:
        return sum(1 for s in self.sessions.values() if service in s.stages)

    def close_session(self, session_id: str) -> list[Effect]:
        session = self.sessions.pop(session_id)
        if session.node is not None:
            logger.info("session %s closed (node %s)", session_id, session.node)
            return self._to_node(session.node, p.CloseSession(session_id))
        effects: list[Effect] = []
        for stage in session.stages:
            effects += self._send_to(stage, p.EndSession(session_id=session_id))
        self._free_rings(session)
        logger.info("session %s closed", session_id)
        return effects

    def _free_rings(self, session: ChainSession) -> None:
        for ring in session.rings:
            self.rings.free(ring)
        session.rings.clear()

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
