"""The supervisor: starts the services in order, watches them, restarts them, owns the rings.

One thread, one ``zmq.Poller`` over: the control ROUTER (services), the admin ROUTER (CLI and
tests), every child's pidfd (death is noticed at once, without polling), and a wake-up socket
the SIGINT/SIGTERM handler writes to. Timers (heartbeats, restarts, deadlines) bound the poll.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
import os
import secrets
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import zmq

from services import protocol as p
from services import topology
from services.models.store import resolve_models_dir
from services.runtime import ServiceSpec, add_log_file, admin_endpoint, control_endpoint
from shm.ring import FrameRing, ring_bytes
from supervisor.children import Child, State
from supervisor.config import (
    Config,
    ServiceConfig,
    default_home,
    default_run_base,
)
from supervisor.procstats import ProcessSampler
from supervisor.rundir import Run, create_run, reclaim_stale, shm_free_bytes

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The system could not be brought up; the message says why."""


@dataclass
class Session:
    session_id: str
    stages: list[str]
    width: int
    height: int
    sink: str | None
    params: dict[str, object]
    owner: str | None = None
    mode: str = "video"
    codec: str = "VP8"
    rings: list[FrameRing] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def start_message(self, stage: str) -> p.StartSession:
        i = self.stages.index(stage)
        return p.StartSession(
            session_id=self.session_id,
            width=self.width,
            height=self.height,
            input_ring=self.rings[i - 1].name if i > 0 else None,
            output_ring=self.rings[i].name if i < len(self.rings) else None,
            downstream=self.stages[i + 1] if i + 1 < len(self.stages) else self.sink,
            params=dict(self.params),
            mode=self.mode,
            codec=self.codec,
        )


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base = (
            default_run_base() if config.run_dir is None else Path(config.run_dir).expanduser()
        )
        self.models_dir = resolve_models_dir(config.models_dir)
        #: The pipelines last asked for, in order (the first is the one status reports).
        self.pipeline_order: list[str] = list(config.pipelines)
        self.run: Run | None = None
        self._log_handler: logging.Handler | None = None
        self.children: dict[str, Child] = {}
        self.sessions: dict[str, Session] = {}
        self.started = time.monotonic()
        self.rejected = 0
        self.sampler = ProcessSampler()  # per-process CPU/memory for status (issue 5)
        self._stop_reason: str | None = None
        self.phase: p.SupervisorPhase = "starting"
        self._heartbeat_seq = 0
        #: Handed to every child in its spec; a Hello must carry it.
        self.secret = secrets.token_hex(16)
        self._next_heartbeat = 0.0
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.control_codec = p.supervisor_control_codec()
        self.admin_codec = p.admin_server_codec()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        reclaim_stale(self.base)
        self._check_shm()
        self.run = create_run(self.base)
        run = self.run
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        # No ROUTER_HANDOVER: each process connects under its own name#pid identity, and the
        # route to a service moves only when its Hello proves it (pid and the run's secret).
        self.control.bind(control_endpoint(run.path))
        self.admin = self.ctx.socket(zmq.ROUTER)
        self.admin.setsockopt(zmq.LINGER, 0)
        self.admin.bind(admin_endpoint(run.path))
        run.write_info(
            {
                "run_id": run.run_id,
                "pid": os.getpid(),
                "host": self.config.host,
                "port": self.config.port,
                "run_dir": str(run.path),
                "started": time.time(),
            }
        )
        self._log_handler = add_log_file(run.path, "supervisor")
        logger.info("run %s in %s", run.run_id, run.path)
        for svc in self._service_plan():
            child = Child(self._spec(svc), svc.restart)
            self.children[child.name] = child
            child.spawn()
            self._wait_ready(child)
        self.phase = "running"

    def _service_plan(self) -> list[ServiceConfig]:
        """Data-plane services first, signalling last (the API answers once all are up)."""
        cfg = self.config
        plan = [self._pipeline_service(p.PipelineLoad(pid)) for pid in cfg.pipelines]
        if cfg.media:
            decode, encode = msgspec.to_builtins(cfg.decode), msgspec.to_builtins(cfg.encode)
            plan.append(ServiceConfig(topology.DECODE, topology.DECODE, decode, cfg.restart))
            plan.append(ServiceConfig(topology.ENCODE, topology.ENCODE, encode, cfg.restart))
        plan += cfg.services
        if cfg.signalling:
            options = {
                "host": cfg.host,
                "port": cfg.port,
                "max_sessions": cfg.max_sessions,
                "connect_timeout_s": cfg.connect_timeout_s,
                "models_dir": str(self.models_dir),
                "home": str(Path(cfg.home).expanduser() if cfg.home else default_home()),
                "api": msgspec.to_builtins(cfg.api),
                "dreams": msgspec.to_builtins(cfg.dreams),
            }
            plan.append(
                ServiceConfig(topology.SIGNALLING, topology.SIGNALLING, options, cfg.restart)
            )
        return plan

    def _pipeline_service(self, load: p.PipelineLoad) -> ServiceConfig:
        options: dict[str, object] = {
            "pipeline": load.pipeline_id,
            "load_params": dict(load.load_params),
            "models_dir": str(self.models_dir),
        }
        name = topology.service_of_pipeline(load.pipeline_id)
        kind = topology.kind_of_service(name)
        if kind == topology.OVERLAY and self.config.overlay_model:
            options["model"] = self.config.overlay_model
            options["model_options"] = dict(self.config.overlay_model_options)
        return ServiceConfig(name, kind, options, self.config.restart)

    def _spec(self, svc: ServiceConfig) -> ServiceSpec:
        assert self.run is not None
        return ServiceSpec(
            name=svc.name,
            kind=svc.kind,
            run_dir=str(self.run.path),
            run_id=self.run.run_id,
            supervisor_pid=os.getpid(),
            log_level=self.config.log_level,
            options=svc.options,
            secret=self.secret,
        )

    def _check_shm(self) -> None:
        cfg = self.config
        needed = ring_bytes(cfg.ring_slots, cfg.max_frame_width * cfg.max_frame_height * 3) * 2
        free = shm_free_bytes()
        if free < needed:
            raise StartupError(
                f"/dev/shm has {free // 2**20} MiB free but one session at "
                f"{cfg.max_frame_width}x{cfg.max_frame_height} needs {needed // 2**20} MiB: "
                "give the container more shared memory (docker run --shm-size=1g) "
                "or lower max_frame_width/max_frame_height"
            )

    def _wait_ready(self, child: Child) -> None:
        deadline = time.monotonic() + self._ready_timeout(child)
        while child.state is not State.READY:
            if self._stop_reason is not None:
                raise StartupError(f"stopped while starting {child.name}")
            if child.state is State.FAILED:
                if child.is_pipeline:
                    return  # reported as the pipeline's error status; the server still serves
                raise StartupError(f"{child.name} failed to start: {child.last_error}")
            if time.monotonic() > deadline:
                raise StartupError(
                    f"{child.name} was not ready within {self._ready_timeout(child):.0f} s"
                )
            self.run_once(0.1)

    def _ready_timeout(self, child: Child) -> float:
        cfg = self.config
        return cfg.load_timeout_s if child.is_pipeline else cfg.ready_timeout_s

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

        def on_signal(signum: int, frame: object) -> None:
            self.request_stop(signal.Signals(signum).name)

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    @property
    def stop_requested(self) -> bool:
        return self._stop_reason is not None

    def request_stop(self, reason: str) -> None:
        if self._stop_reason is None:
            self._stop_reason = reason

    def serve_forever(self) -> None:
        while self._stop_reason is None:
            self.run_once(self.config.heartbeat_interval_s)
        self.phase = "stopping"
        logger.info("stopping (%s)", self._stop_reason)

    def shutdown(self) -> None:
        """Stop every child (Stop → SIGTERM → SIGKILL, one deadline), free every segment."""
        live = [c for c in self.children.values() if c.proc is not None]
        for child in live:
            child.state = State.STOPPING
            self._send(child.name, p.Stop(reason=self._stop_reason or "shutdown"))
        deadline = time.monotonic() + self.config.stop_timeout_s
        self._wait_exit(live, deadline)
        for child in live:
            child.terminate()
        self._wait_exit(live, time.monotonic() + 1.0)
        for child in live:
            child.kill()
        self._wait_exit(live, time.monotonic() + 1.0)
        for child in self.children.values():
            child.state = State.STOPPED
        for session in list(self.sessions.values()):
            self._free_session(session)
        self.sessions.clear()
        for sock in (getattr(self, "control", None), getattr(self, "admin", None)):
            if sock is not None:
                sock.close(linger=0)
        self.ctx.term()
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self.run is not None:
            self.run.close()
        self._wake_r.close()
        self._wake_w.close()

    def _wait_exit(self, children: list[Child], deadline: float) -> None:
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except Exception:
                continue
            child.reap()

    # ------------------------------------------------------------------ loop

    def run_once(self, timeout_s: float) -> None:
        now = time.monotonic()
        timeout_s = min(timeout_s, max(0.0, self._next_timer(now) - now))
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.admin, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for child in self.children.values():
            if child.pidfd is not None:
                poller.register(child.pidfd, zmq.POLLIN)
        events = dict(poller.poll(int(timeout_s * 1000)))
        if self._wake_r.fileno() in events:
            self._drain_wakeups()
        if self.control in events:
            self._drain_control()
        self._check_children()
        if self.admin in events:
            self._drain_admin()
        self._timers(time.monotonic())

    def _next_timer(self, now: float) -> float:
        due = self._next_heartbeat or now
        for child in self.children.values():
            if child.state is State.RESTARTING:
                due = min(due, child.restart_due)
        return due

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _check_children(self) -> None:
        for child in list(self.children.values()):
            if child.proc is None:
                continue
            code = child.exited()
            if code is None:
                continue
            child.reap()
            if child.state is State.STOPPING:
                child.state = State.STOPPED
                if child.removing:
                    del self.children[child.name]
                logger.info("%s stopped", child.name)
                continue
            reason = child.failure_reason or child.kill_reason
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            why = f"{child.name} died ({how})" + (f": {reason}" if reason else "")
            logger.error("%s", why)
            self._on_child_down(child, why)

    def _on_child_down(self, child: Child, reason: str) -> None:
        child.schedule_restart(reason)
        # The process that owned sessions (signalling: their peer connections) took them with
        # it: close them everywhere and free their rings; its restart starts with none.
        for session_id in [sid for sid, s in self.sessions.items() if s.owner == child.name]:
            logger.warning("session %s closed: its owner %s died", session_id, child.name)
            self.close_session(session_id)
        if not child.fatal_to_sessions:
            # decode / encode / overlay carry their sessions on after a restart (a keyframe).
            return
        for session in self.sessions.values():
            if child.name in session.stages:
                self._notify_owner(
                    p.SessionFailed(
                        session_id=session.session_id, service=child.name, reason=reason
                    )
                )

    def _timers(self, now: float) -> None:
        for child in list(self.children.values()):
            if child.state is State.RESTARTING and now >= child.restart_due:
                child.spawn()
            elif child.state is State.STARTING and now - child.started_at > self._ready_timeout(
                child
            ):
                child.kill_reason = "not ready in time"
                child.kill()
            elif child.state is State.READY:
                self._check_liveness(child, now)
            elif child.state is State.STOPPING and child.removing and now > child.restart_due:
                child.kill()
        if now >= self._next_heartbeat:
            self._heartbeat_seq += 1
            for child in self.children.values():
                if child.state is State.READY:
                    if child.unanswered_since is None:
                        child.unanswered_since = now
                    self._send(child.name, p.Heartbeat(seq=self._heartbeat_seq))
            self._next_heartbeat = now + self.config.heartbeat_interval_s

    def _check_liveness(self, child: Child, now: float) -> None:
        """A live process is not a live loop: restart stages that stop answering or progressing."""
        if child.kill_reason:
            return  # killed already, its exit not yet seen
        timeout_s = self.config.heartbeat_timeout_s
        stall_s = self.config.stall_timeout_s
        if child.is_pipeline:
            # Heartbeats are answered between model calls, and one call may be long (a block of
            # a causal video model on a small GPU, a session's first call).
            timeout_s = max(timeout_s, self.config.model_heartbeat_timeout_s)
            stall_s = max(stall_s, self.config.model_heartbeat_timeout_s)
        elif child.is_media:
            timeout_s = min(timeout_s, self.config.media_heartbeat_timeout_s)
        unanswered_s = 0.0 if child.unanswered_since is None else now - child.unanswered_since
        # Stalls are judged on the process's own latest report (frames waiting, none done
        # since progress_at), not on the clock now: a late report is the heartbeat's business.
        stalled_s = child.last_ack - child.progress_at
        if unanswered_s > timeout_s:
            child.kill_reason = f"no heartbeat answered for {unanswered_s:.1f} s"
        elif stalled_s > stall_s:
            child.kill_reason = f"frames waiting but none done for {stalled_s:.1f} s"
        else:
            return
        logger.error("%s: %s; killing it", child.name, child.kill_reason)
        child.kill()

    # ------------------------------------------------------------------ control socket

    def _send(self, service: str, message: p.SupervisorToService) -> None:
        child = self.children.get(service)
        if child is None or child.route is None:
            return  # not (yet) proven: nothing is routed to it
        try:
            self.control.send_multipart(
                [child.route, self.control_codec.encode(message)], zmq.NOBLOCK
            )
        except zmq.ZMQError as exc:
            logger.warning("could not send %s to %s: %s", type(message).__name__, service, exc)

    def _drain_control(self) -> None:
        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.rejected += 1
                logger.warning("rejected control message with %d frames", len(frames))
                continue
            identity, raw = frames
            try:
                msg = self.control_codec.decode(raw)
            except p.MessageRejected as exc:
                self.rejected += 1
                logger.warning("rejected control message from %r: %s", identity, exc)
                continue
            if isinstance(msg, p.Hello):
                child = self._proven(identity, msg)
            else:
                child = next((c for c in self.children.values() if c.route == identity), None)
            if child is None:
                self.rejected += 1
                logger.warning("rejected %s from unknown peer %r", type(msg).__name__, identity)
                continue
            self._on_control(child, msg)

    def _proven(self, identity: bytes, hello: p.Hello) -> Child | None:
        """The child this Hello comes from, if it proves it: the pid the supervisor spawned
        under that name, and the run's secret. Its connection then becomes the child's route."""
        child = self.children.get(hello.service)
        if (
            child is None
            or child.proc is None
            or child.proc.pid != hello.pid
            or not hmac.compare_digest(hello.secret.encode(), self.secret.encode())
        ):
            logger.warning("rejected Hello from %r claiming %s", identity, hello.service)
            return None
        child.route = identity
        return child

    def _on_control(self, child: Child, msg: p.ServiceToSupervisor) -> None:
        now = time.monotonic()
        match msg:
            case p.Hello(pid=pid):
                logger.debug("hello from %s (pid %d)", child.name, pid)
            case p.Ready():
                child.state = State.READY
                child.ready_at = child.last_ack = child.progress_at = now
                child.unanswered_since = None
                logger.info("%s ready in %.2f s", child.name, now - child.started_at)
                for session in self.sessions.values():
                    if child.name in session.stages:
                        self._send(child.name, session.start_message(child.name))
            case p.HeartbeatAck(frames_done=done, frames_waiting=waiting):
                child.last_ack = now
                child.unanswered_since = None
                if done != child.frames_done or waiting == 0:
                    child.progress_at = now
                child.frames_done = done
                child.rejected = msg.rejected
                child.sessions = msg.sessions
            case p.ServiceFailed(reason=reason):
                child.failure_reason = reason
                logger.error("%s failed: %s", child.name, reason)
            case p.SessionFailed():
                logger.error("session %s failed in %s: %s", msg.session_id, msg.service, msg.reason)
                self._notify_owner(msg)
            case p.SessionStarted():
                pass

    def _notify_owner(self, msg: p.SessionFailed) -> None:
        """Session failures go to signalling, which tells the client."""
        session = self.sessions.get(msg.session_id)
        if session is None:
            return
        session.failures.append(msg.reason)
        owner = self.children.get(session.owner or "")
        if owner is not None and owner.state is State.READY:
            self._send(owner.name, msg)

    # ------------------------------------------------------------------ admin socket

    def _drain_admin(self) -> None:
        while True:
            try:
                frames = self.admin.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3:
                self.rejected += 1
                logger.warning("rejected admin message with %d frames", len(frames))
                continue
            envelope, raw = frames[:-1], frames[-1]
            try:
                request = self.admin_codec.decode(raw)
            except p.MessageRejected as exc:
                self.rejected += 1
                logger.warning("rejected admin message: %s", exc)
                reply: p.AdminReply = p.Rejected(reason=str(exc))
            else:
                reply = self._on_admin(request)
            self.admin.send_multipart([*envelope, self.admin_codec.encode(reply)])

    def _on_admin(self, request: p.AdminRequest) -> p.AdminReply:
        match request:
            case p.GetStatus():
                return self.status()
            case p.Shutdown(reason=reason):
                self.request_stop(reason or "supervisor stop")
                return p.Ack()
            case p.OpenSession():
                try:
                    return self.open_session(request)
                except (ValueError, OSError) as exc:
                    return p.Rejected(reason=str(exc))
            case p.CloseSession(session_id=session_id):
                if session_id not in self.sessions:
                    return p.Rejected(reason=f"unknown session {session_id!r}")
                self.close_session(session_id)
                return p.Ack()
            case p.LoadPipelines(pipelines=loads):
                try:
                    self.load_pipelines(loads)
                except ValueError as exc:
                    return p.Rejected(reason=str(exc))
                return p.Ack()
        return p.Rejected(reason="unhandled request")

    # ------------------------------------------------------------------ pipelines

    def load_pipelines(self, loads: list[p.PipelineLoad]) -> None:
        """Start the inference processes asked for; stop those no longer wanted."""
        wanted: dict[str, p.PipelineLoad] = {}
        for load in loads:
            pid = load.pipeline_id
            if not pid or not all(c.isalnum() or c in "-_." for c in pid) or len(pid) > 64:
                raise ValueError(f"invalid pipeline id {pid!r}")
            wanted[topology.service_of_pipeline(pid)] = load
        for name, child in list(self.children.items()):
            if not child.is_pipeline or child.removing:
                continue
            same = wanted.get(name)
            if same is not None and child.spec.options.get("load_params") == same.load_params:
                if child.state is State.FAILED:
                    # Asked again after a failed load: try once more.
                    child.restart_times.clear()
                    child.spawn()
                continue
            self._remove_child(child)
        for name, load in wanted.items():
            current = self.children.get(name)
            if current is not None and not current.removing:
                continue
            if current is not None:
                # Still stopping with other load params: replace it under the same name.
                current.kill()
                if current.proc is not None:
                    current.proc.wait(5)
                current.reap()
            child = Child(self._spec(self._pipeline_service(load)), self.config.restart)
            self.children[name] = child
            child.spawn()
        self.pipeline_order = [load.pipeline_id for load in loads]

    def _remove_child(self, child: Child) -> None:
        for session in list(self.sessions.values()):
            if child.name in session.stages:
                self._notify_owner(
                    p.SessionFailed(
                        session_id=session.session_id,
                        service=child.name,
                        reason=f"{child.name} was unloaded",
                    )
                )
        child.removing = True
        if child.proc is None:
            del self.children[child.name]
            return
        child.state = State.STOPPING
        self._send(child.name, p.Stop(reason="unloaded"))
        # A process that ignores Stop is killed by the same path as any other.
        child.restart_due = time.monotonic() + self.config.stop_timeout_s

    def pipeline_states(self) -> list[p.PipelineState]:
        states = []
        for pid in self.pipeline_order:
            child = self.children.get(topology.service_of_pipeline(pid))
            if child is None or child.removing:
                continue
            status = {
                State.READY: "loaded",
                State.FAILED: "error",
            }.get(child.state, "loading")
            states.append(
                p.PipelineState(
                    pipeline_id=pid,
                    status=status,
                    load_params=dict(child.spec.options.get("load_params", {})),
                    error=(child.failure_reason or child.last_error) if status == "error" else None,
                )
            )
        return states

    def status(self) -> p.StatusReport:
        assert self.run is not None
        return p.StatusReport(
            run_id=self.run.run_id,
            pid=os.getpid(),
            uptime_s=time.monotonic() - self.started,
            services=[
                p.ServiceStatus(
                    name=c.name,
                    state=str(c.state),
                    pid=c.pid,
                    uptime_s=c.uptime_s(),
                    restarts=c.restarts,
                    frames_done=c.frames_done,
                    rejected=c.rejected,
                    sessions=c.sessions,
                    last_error=c.last_error,
                    **dataclasses.asdict(self.sampler.sample(c.pid)),
                )
                for c in self.children.values()
            ],
            sessions=sorted(self.sessions),
            rejected=self.rejected,
            phase=self.phase,
            pipelines=self.pipeline_states(),
            rings=self.ring_states(),
        )

    def ring_states(self) -> list[p.RingStatus]:
        """Every session ring's counters (metrics, issue 5): ring i joins stages i and i+1."""
        out = []
        for session in self.sessions.values():
            for i, ring in enumerate(session.rings):
                st = ring.stats()
                out.append(
                    p.RingStatus(
                        session_id=session.session_id,
                        ring=ring.name,
                        producer=session.stages[i],
                        consumer=session.stages[i + 1],
                        slots=ring.n_slots,
                        published=st.published,
                        consumed=st.consumed,
                        skipped=st.skipped,
                        torn=st.torn,
                        pending=st.pending,
                    )
                )
        return out

    # ------------------------------------------------------------------ sessions

    def open_session(self, req: p.OpenSession) -> p.SessionOpened:
        assert self.run is not None
        cfg = self.config
        if req.session_id in self.sessions:
            raise ValueError(f"session {req.session_id!r} already exists")
        if not req.session_id.replace("-", "").isalnum() or len(req.session_id) > 64:
            raise ValueError("session_id must be 1-64 letters, digits or '-'")
        stages = self._stages(req)
        unknown = [s for s in stages if s not in self.children]
        if unknown or not stages:
            raise ValueError(
                f"unknown stage(s): {', '.join(unknown) or '(none given)'}"
                f" (this server runs: {', '.join(self.children) or 'nothing'})"
            )
        if not (0 < req.width <= cfg.max_frame_width and 0 < req.height <= cfg.max_frame_height):
            raise ValueError(
                f"{req.width}x{req.height} is outside 1x1..{cfg.max_frame_width}x"
                f"{cfg.max_frame_height}"
            )
        session = Session(
            req.session_id,
            stages,
            req.width,
            req.height,
            req.sink,
            dict(req.params),
            owner=req.owner,
            mode=req.mode,
            codec=req.codec,
        )
        try:
            for i in range(len(stages) - 1):
                session.rings.append(
                    FrameRing.create(
                        self.run.run_id,
                        f"{req.session_id}.{i}",
                        cfg.ring_slots,
                        req.width * req.height * 3,
                    )
                )
        except Exception:
            self._free_session(session)
            raise
        self.sessions[req.session_id] = session
        for stage in session.stages:
            if self.children[stage].state is State.READY:
                self._send(stage, session.start_message(stage))
        logger.info("session %s opened: %s", req.session_id, " → ".join(stages))
        return p.SessionOpened(
            session_id=req.session_id, stages=stages, rings=[r.name for r in session.rings]
        )

    def _stages(self, req: p.OpenSession) -> list[str]:
        """The session's chain: planned from its pipelines (among those loaded), or named."""
        if req.stages:
            if req.pipeline_ids:
                raise ValueError("give pipeline_ids or stages, not both")
            return list(req.stages)
        loaded = [s.pipeline_id for s in self.pipeline_states() if s.status == "loaded"]
        return topology.plan_chain(loaded, req.pipeline_ids or None).stages(req.mode)

    def close_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id)
        for stage in session.stages:
            if self.children[stage].state is State.READY:
                self._send(stage, p.EndSession(session_id=session_id))
        self._free_session(session)
        logger.info("session %s closed", session_id)

    def _free_session(self, session: Session) -> None:
        for ring in session.rings:
            ring.unlink()
            ring.close()
        session.rings.clear()
