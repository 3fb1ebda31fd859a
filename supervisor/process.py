"""The supervisor process: sockets, child processes and the clock around :class:`SupervisorCore`.

One thread, one ``zmq.Poller`` (kept, not rebuilt) over: the control ROUTER (services), the
admin ROUTER (CLI and tests), every child's pidfd (a death is noticed at once), and a wake-up
socket the SIGINT/SIGTERM handler writes to. What to do about each event is the core's answer
(:mod:`supervisor.core`); this module only carries its effects out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import zmq

from dreams.wire import AUTH_TOKEN_ENV
from services import protocol as p
from services import topology
from services.models.store import resolve_models_dir
from services.runtime import (
    SPEC_ENV,
    ServiceSpec,
    add_log_file,
    admin_endpoint,
    control_endpoint,
)
from shm.ring import FrameRing, RingStats, ring_bytes
from supervisor.config import Config, default_run_base
from supervisor.core import RunInfo, SupervisorCore
from supervisor.events import (
    AdminRequest,
    ControlMessage,
    Effect,
    Event,
    Exited,
    Kill,
    Reply,
    Send,
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
from supervisor.plan import service_plan
from supervisor.procstats import ProcessSampler
from supervisor.rundir import Run, create_run, reclaim_stale, shm_free_bytes

logger = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The system could not be brought up; the message says why."""


class SharedRings:
    """The core's rings in shared memory, owned (created and unlinked) by this process."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.rings: dict[str, FrameRing] = {}

    def create(self, key: str, slots: int, nbytes: int) -> str:
        ring = FrameRing.create(self.run_id, key, slots, nbytes)
        self.rings[ring.name] = ring
        return ring.name

    def free(self, name: str) -> None:
        ring = self.rings.pop(name, None)
        if ring is not None:
            ring.unlink()
            ring.close()

    def stats(self, name: str) -> RingStats:
        return self.rings[name].stats()

    def room(self, slots: int, nbytes: int) -> tuple[int, int]:
        return ring_bytes(slots, nbytes), shm_free_bytes()


@dataclass
class ChildProcess:
    name: str
    popen: subprocess.Popen[bytes]
    #: Readable when the process exits (None: polled instead, on old kernels).
    pidfd: int | None


#: The soft limit asked for when the hard limit is unlimited.
DESCRIPTOR_LIMIT_CAP = 1 << 20


def raise_descriptor_limit() -> None:
    """Raise this process's soft file-descriptor limit to its hard limit (the children inherit
    it): a soft limit of 1024, the usual default, is a few hundred idle connections away from
    failing every new session."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = DESCRIPTOR_LIMIT_CAP if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("file descriptors: could not raise the limit of %d: %s", soft, exc)
            return
        logger.info(
            "file descriptors: soft limit raised from %d to %d (the hard limit)", soft, target
        )
    else:
        logger.info("file descriptors: limit %d", soft)


def command_for(spec: ServiceSpec) -> list[str]:
    """signalling has its own asyncio entry, a Dreams worker its command line; every other
    kind runs on services.main."""
    if spec.kind == topology.DREAMS_WORKER:
        args = [str(a) for a in spec.options.get("args", [])]
        return [sys.executable, "-m", "dreams.worker", *args, "--die-with-parent", str(os.getpid())]
    module = "signalling.main" if spec.kind == topology.SIGNALLING else "services.main"
    return [sys.executable, "-m", module]


class Supervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.base = (
            default_run_base() if config.run_dir is None else Path(config.run_dir).expanduser()
        )
        self.models_dir = resolve_models_dir(config.models_dir)
        self.run: Run | None = None
        self.core: SupervisorCore | None = None
        self.procs: dict[int, ChildProcess] = {}
        self._log_handler: logging.Handler | None = None
        self._stop_reason: str | None = None
        self._startup_error: str | None = None
        #: Handed to every child in its spec; a Hello must carry it.
        self.secret = secrets.token_hex(16)
        self.sampler = ProcessSampler()
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.control_codec = p.supervisor_control_codec()
        self.admin_codec = p.admin_server_codec()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.poller = zmq.Poller()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        reclaim_stale(self.base)
        self._check_shm()
        self.run = run = create_run(self.base)
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        # No ROUTER_HANDOVER: each process connects under its own name#pid identity, and the
        # route to a service moves only when its Hello proves it (pid and the run's secret).
        self.control.bind(control_endpoint(run.path))
        self.admin = self.ctx.socket(zmq.ROUTER)
        self.admin.setsockopt(zmq.LINGER, 0)
        self.admin.bind(admin_endpoint(run.path))
        for sock in (self.control, self.admin, self._wake_r):
            self.poller.register(sock, zmq.POLLIN)
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
        raise_descriptor_limit()
        info = RunInfo(
            run.run_id, str(run.path), os.getpid(), self.secret, self.models_dir, time.monotonic()
        )
        self.core = SupervisorCore(self.config, info, SharedRings(run.run_id), self.sampler.sample)
        self._handle(Start(service_plan(self.config, self.models_dir)))
        while self.core.phase == "starting":
            if self._startup_error is not None:
                raise StartupError(self._startup_error)
            if self._stop_reason is not None:
                raise StartupError(f"stopped while starting ({self._stop_reason})")
            self.run_once(0.1)

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
        logger.info("stopping (%s)", self._stop_reason)

    def shutdown(self) -> None:
        """Stop every child (Stop → SIGTERM → SIGKILL, one deadline), free every segment."""
        core = self.core
        if core is not None:
            self._handle(Shutdown(self._stop_reason or "shutdown"))
            self._wait_exit(time.monotonic() + self.config.stop_timeout_s)
            for pid in list(self.procs):
                self._signal(pid, signal.SIGTERM)
            self._wait_exit(time.monotonic() + 1.0)
            for pid in list(self.procs):
                self._signal(pid, signal.SIGKILL)
            self._wait_exit(time.monotonic() + 1.0)
            core.close_all()
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

    def _wait_exit(self, deadline: float) -> None:
        for pid, proc in list(self.procs.items()):
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = proc.popen.wait(max(0.0, deadline - time.monotonic()))
                self._reaped(pid, code)

    # ------------------------------------------------------------------ effects

    def _handle(self, event: Event) -> p.AdminReply | None:
        """The core's answer to one event, carried out; the reply, for an admin request."""
        assert self.core is not None
        try:
            effects = self.core.handle(event, time.monotonic())
        except Exception as exc:  # the supervisor never dies of one message
            logger.exception("%s failed", type(event).__name__)
            if isinstance(event, AdminRequest):
                return p.Rejected(reason=f"internal error: {exc!r}")
            return None
        return self._apply(effects)

    def _apply(self, effects: list[Effect]) -> p.AdminReply | None:
        reply: p.AdminReply | None = None
        for effect in effects:
            match effect:
                case Send(route=route, message=message):
                    try:
                        self.control.send_multipart(
                            [route, self.control_codec.encode(message)], zmq.NOBLOCK
                        )
                    except zmq.ZMQError as exc:
                        logger.warning("could not send %s: %s", type(message).__name__, exc)
                case Spawn(spec=spec):
                    try:
                        pid = self._spawn(spec)
                    except OSError as exc:  # out of processes or descriptors: try again later
                        logger.error("cannot start %s: %s", spec.name, exc)
                        self._handle(SpawnFailed(spec.name, str(exc)))
                        continue
                    self._handle(Spawned(spec.name, pid))
                case Kill(pid=pid, signal=sig):
                    self._signal(pid, sig)
                case StopRequested(reason=reason):
                    self.request_stop(reason)
                case StartupFailed(reason=reason):
                    self._startup_error = reason
                case Reply(reply=answer):
                    reply = answer
        return reply

    def _spawn(self, spec: ServiceSpec) -> int:
        env = {k: v for k, v in os.environ.items() if k != AUTH_TOKEN_ENV}
        if spec.kind == topology.DREAMS_WORKER:
            if token := spec.options.get("token"):  # never on the command line (ps shows it)
                env[AUTH_TOKEN_ENV] = str(token)
        else:
            env[SPEC_ENV] = msgspec.json.encode(spec).decode()
        device = str(spec.options.get("device") or "")
        if device.startswith("cuda:"):  # the process sees its one GPU, as cuda:0
            env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
        popen = subprocess.Popen(command_for(spec), env=env, close_fds=True)
        try:
            pidfd: int | None = os.pidfd_open(popen.pid)
        except (AttributeError, OSError):
            pidfd = None  # polled instead (non-Linux / old kernel)
        if pidfd is not None:
            self.poller.register(pidfd, zmq.POLLIN)
        self.procs[popen.pid] = ChildProcess(spec.name, popen, pidfd)
        return popen.pid

    def _signal(self, pid: int, sig: signal.Signals) -> None:
        proc = self.procs.get(pid)
        if proc is not None and proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(sig)

    def _reaped(self, pid: int, code: int) -> None:
        proc = self.procs.pop(pid)
        if proc.pidfd is not None:
            self.poller.unregister(proc.pidfd)
            os.close(proc.pidfd)
        self._handle(Exited(pid, code))

    # ------------------------------------------------------------------ loop

    def run_once(self, timeout_s: float) -> None:
        assert self.core is not None
        now = time.monotonic()
        timeout_s = min(timeout_s, max(0.0, self.core.next_timer(now) - now))
        events = dict(self.poller.poll(int(timeout_s * 1000)))
        if self._wake_r.fileno() in events:
            self._drain_wakeups()
        if self.control in events:
            self._drain_control()
        for pid, proc in list(self.procs.items()):
            code = proc.popen.poll()
            if code is not None:
                self._reaped(pid, code)
        if self.admin in events:
            self._drain_admin()
        self._handle(Tick())

    def _drain_wakeups(self) -> None:
        try:
            while self._wake_r.recv(64):
                pass
        except BlockingIOError:
            pass

    def _drain_control(self) -> None:
        assert self.core is not None
        while True:
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._handle(Unreadable(f"control message with {len(frames)} frames"))
                continue
            identity, raw = frames
            try:
                msg = self.control_codec.decode(raw)
            except p.MessageRejected as exc:
                self._handle(Unreadable(f"control message from {identity!r}: {exc}"))
                continue
            self._handle(ControlMessage(identity, msg))

    def _drain_admin(self) -> None:
        assert self.core is not None
        while True:
            try:
                frames = self.admin.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 3:
                self._handle(Unreadable(f"admin message with {len(frames)} frames"))
                continue
            envelope, raw = frames[:-1], frames[-1]
            try:
                request = self.admin_codec.decode(raw)
            except p.MessageRejected as exc:
                self._handle(Unreadable(f"admin message: {exc}"))
                reply: p.AdminReply | None = p.Rejected(reason=str(exc))
            else:
                reply = self._handle(AdminRequest(request))
            if reply is None:  # cannot happen: every admin request gets one
                reply = p.Rejected(reason="internal error: no reply")
            self.admin.send_multipart([*envelope, self.admin_codec.encode(reply)])
