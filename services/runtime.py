"""The actor runtime every dreamwire service process runs on.

A service is a *core* (logic, no sockets: :class:`ServiceCore`) driven by :class:`ServiceProc`,
which owns the sockets and the loop:

* a DEALER on the supervisor's ``control.sock`` (``Hello`` → ``Ready``, heartbeats, ``Stop``,
  session commands),
* a PULL ``inbox`` other services push frame notifications and encoded media to,
* PUSH sockets to the inboxes of downstream services (created on first use, non-blocking, with
  a small high-water mark: while a stage restarts at most ``DOWNSTREAM_HWM`` messages wait for
  it, and past that they are dropped and counted). ``ZMQ_IMMEDIATE`` is deliberately off: with
  it, the first message on a socket still connecting would be dropped, and a one-shot message
  such as a parameter change must not be.

Control is polled before data so a ``Stop`` never waits behind frames. Anything that does not
decode as a message of the socket's union is logged, counted and dropped; the loop goes on.
The process dies with the supervisor: ``PR_SET_PDEATHSIG`` plus a parent-pid check.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import msgspec
import zmq

from services import protocol as p
from services.calls import CallClock
from services.control import ControlSide, Progress
from services.logsummary import REPEATS
from services.topology import Kind

logger = logging.getLogger(__name__)

PARENT_CHECK_INTERVAL_S = 0.25
#: A model call older than this has its heartbeats answered by the liveness thread (shorter
#: ones by the loop, between calls).
LIVENESS_AFTER_S = 0.5
#: How often the liveness thread looks at the control socket while it answers.
LIVENESS_POLL_S = 0.02
DOWNSTREAM_HWM = 16
PR_SET_PDEATHSIG = 1
#: The environment variable a child finds its ServiceSpec in (JSON), set by the supervisor.
SPEC_ENV = "DREAMWIRE_SERVICE_SPEC"


class ServiceSpec(msgspec.Struct, forbid_unknown_fields=True):
    """What the supervisor hands a child: its identity, where the sockets live, its options."""

    name: str
    kind: Kind
    run_dir: str
    run_id: str
    supervisor_pid: int
    log_level: str = "INFO"
    options: dict[str, Any] = {}
    #: The run's secret: a service's Hello proves it (see ``control_identity``).
    secret: str = ""


def control_identity(spec: ServiceSpec) -> str:
    """A service's identity on ``control.sock``: its name and pid, so a restarted process (or
    an impostor) never takes over a live process's route."""
    return f"{spec.name}#{os.getpid()}"


def endpoint(run_dir: str | Path, name: str) -> str:
    return f"ipc://{Path(run_dir) / name.replace('/', '_')}"


def inbox_endpoint(run_dir: str | Path, service: str) -> str:
    return endpoint(run_dir, f"{service}.inbox")


def control_endpoint(run_dir: str | Path) -> str:
    return endpoint(run_dir, "control.sock")


def admin_endpoint(run_dir: str | Path) -> str:
    return endpoint(run_dir, "admin.sock")


#: The run's log, in its run directory: every process appends to it (``/api/v1/logs/tail``).
LOG_FILE = "server.log"


def log_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / LOG_FILE


def _log_format(process_name: str) -> str:
    return f"%(asctime)s %(levelname)s [{process_name}] %(name)s: %(message)s"


def configure_logging(process_name: str, level: str = "INFO", run_dir: str | None = None) -> None:
    """Log to stderr and, given the run directory, to the run's log as well."""
    logging.basicConfig(
        level=level, stream=sys.stderr, format=_log_format(process_name), force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(REPEATS)
    if run_dir is not None:
        add_log_file(run_dir, process_name)


def add_log_file(run_dir: str | Path, process_name: str) -> logging.Handler:
    """Append this process's log lines to the run's log (one write a line, so the lines of
    the run's processes interleave whole)."""
    handler = logging.FileHandler(log_file(run_dir), encoding="utf-8")
    handler.setFormatter(logging.Formatter(_log_format(process_name)))
    handler.addFilter(REPEATS)
    logging.getLogger().addHandler(handler)
    return handler


def pid_alive(pid: int) -> bool:
    """Whether a process runs under this pid (a zombie has exited; one we may not signal is
    taken as alive: nothing proves it gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return True


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies (Linux), then close the race."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


S = TypeVar("S", bound=zmq.Socket[Any])


def connect_inbox(ctx: zmq.Context[S], run_dir: str, service: str) -> S:
    """A PUSH socket to ``service``'s inbox: no linger, a small high-water mark (see above)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, DOWNSTREAM_HWM)
    sock.connect(inbox_endpoint(run_dir, service))
    return sock


def service_sockets(ctx: zmq.Context[S], spec: ServiceSpec) -> tuple[S, S]:
    """A service's two sockets: its DEALER on the supervisor's control.sock (named for its
    Hello) and its inbox PULL, bound afresh (a restart's stale socket file is removed)."""
    control = ctx.socket(zmq.DEALER)
    control.setsockopt(zmq.LINGER, 0)
    control.setsockopt_string(zmq.IDENTITY, control_identity(spec))
    control.connect(control_endpoint(spec.run_dir))
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.LINGER, 0)
    inbox.setsockopt(zmq.RCVHWM, 1024)
    path = inbox_endpoint(spec.run_dir, spec.name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.removeprefix("ipc://"))
    inbox.bind(path)
    return control, inbox


class InboxSockets(Generic[S]):
    """PUSH sockets to other services' inboxes, one per service, made on first use; what the
    sync :class:`Outbox` and signalling's asyncio one share."""

    def __init__(self, ctx: zmq.Context[S], run_dir: str) -> None:
        self._ctx = ctx
        self._run_dir = run_dir
        self._sockets: dict[str, S] = {}
        self._codec = p.inbox_codec()
        self.dropped = 0

    def _socket(self, service: str) -> S:
        sock = self._sockets.get(service)
        if sock is None:
            sock = self._sockets[service] = connect_inbox(self._ctx, self._run_dir, service)
        return sock

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()


class Outbox(Protocol):
    """Where a core sends messages to other services' inboxes (a fake in tests)."""

    def send(self, service: str, message: p.InboxMessage) -> bool:
        """Queued (True) or dropped because the receiver is not keeping up (False)."""
        ...


class ZmqOutbox(InboxSockets[zmq.Socket[bytes]]):
    """Non-blocking sends to other services' inboxes; a stage that is down costs a drop."""

    def send(self, service: str, message: p.InboxMessage) -> bool:
        try:
            self._socket(service).send(self._codec.encode(message), zmq.NOBLOCK, copy=False)
        except zmq.Again:
            self.dropped += 1
            return False
        return True


M = TypeVar("M")


class ServiceCore(ABC, Generic[M]):
    """Logic of one service. No sockets: it talks through the :class:`Outbox` it is given."""

    frames_done: int = 0

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        self.spec = spec
        self.outbox = outbox
        #: The model calls of a model process (its heartbeats report them).
        self.calls = CallClock()
        self.session_failures: list[tuple[str, str]] = []

    def report_session_failure(self, session_id: str, reason: str) -> None:
        """This service can no longer serve the session: the supervisor tells its owner
        (signalling sends the client ``stream_stopped`` with ``reason``)."""
        self.session_failures.append((session_id, reason))

    @abstractmethod
    def start_session(self, msg: p.StartSession) -> None: ...

    @abstractmethod
    def end_session(self, session_id: str) -> None: ...

    #: The inbox union this kind of service takes (``M``); the runtime refuses other messages.
    inbox: ClassVar[Any] = p.InboxMessage

    @abstractmethod
    def handle(self, msg: M) -> None: ...

    def tick(self) -> float | None:
        """Periodic work; returns seconds until the core wants to be called again."""
        return None

    def frames_waiting(self) -> int:
        return 0

    def session_count(self) -> int:
        return 0

    def memory_free_bytes(self) -> int | None:
        """Free memory of this service's GPU, for placing sessions (None: no GPU)."""
        return None

    def loras(self) -> list[p.LoraAdapter]:
        """The LoRAs on this service's model, with their scales now."""
        return []

    def stage_ms(self) -> dict[str, float]:
        """A split block loop's recent ms a block spends in each stage."""
        return {}

    def on_session_failed(self, msg: p.SessionFailed) -> None:
        """Another stage of a session this service owns failed (signalling tells the client)."""

    def close(self) -> None:
        pass


#: Builds a service's core (``services.main.core_factory``).
CoreFactory = Callable[[ServiceSpec, Outbox], ServiceCore[Any]]


class SessionError(Exception):
    """One session cannot be served; reported as ``SessionFailed``, the service goes on."""

    def __init__(self, session_id: str, reason: str) -> None:
        super().__init__(reason)
        self.session_id = session_id
        self.reason = reason


class ServiceProc:
    """Sockets + loop around a core."""

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.control, self.inbox = service_sockets(self.ctx, spec)
        self.outbox = ZmqOutbox(self.ctx, spec.run_dir)
        self.side = ControlSide(spec.name, spec.secret)
        self.inbox_codec = p.inbox_codec()
        self._stopping = False
        self._last_parent_check = 0.0
        # During a long model call the liveness thread answers on the control socket: it holds
        # this lock while it does, and the loop takes it when the call ends, before it uses
        # the socket again. Messages other than heartbeats wait for the loop.
        self._control_lock = threading.Lock()
        self._deferred: list[p.SupervisorToService] = []
        self._memory_free: int | None = None
        self._closing = threading.Event()

    def send_control(self, message: p.ServiceToSupervisor) -> None:
        self.control.send(self.side.encode(message))

    # ------------------------------------------------------------ a link's hooks

    def make_core(self, core_factory: CoreFactory | None) -> ServiceCore[Any]:
        """The core this process runs (a link's proc makes its own, and its sockets)."""
        assert core_factory is not None
        return core_factory(self.spec, self.outbox)

    def sockets(self) -> tuple[zmq.Socket[bytes], ...]:
        """A link's own sockets (its network connection, the inboxes it carries) for the loop
        to poll beside control and the inbox; asked again each turn."""
        return ()

    def readable(self, sock: zmq.Socket[bytes]) -> None:
        """One of :meth:`sockets` has messages."""

    def on_control(self, msg: p.SupervisorToService) -> None:
        """A control message the runtime does not handle itself (a link's ``ToNode``); a
        service that does not take it refuses it."""
        self.side.reject(f"{type(msg).__name__}: {self.spec.kind} does not take it")

    def close_sockets(self) -> None:
        """Close :meth:`sockets` (before the context ends)."""

    def _ack(
        self,
        core: ServiceCore[Any],
        seq: int,
        memory_free: int | None,
        covering: float | None = None,
    ) -> bytes:
        """``covering``: the start of the call the liveness thread answers for. A heartbeat
        it answers as that call ends still reports the call (the loop has not yet counted the
        call's frames, so "none done, no call" would read as a stall)."""
        calls = core.calls
        running_s = calls.running_s()
        if covering is not None:
            running_s = max(running_s, calls.clock() - covering)
        return self.side.ack(
            seq,
            Progress(
                frames_done=core.frames_done,
                frames_waiting=core.frames_waiting(),
                sessions=core.session_count(),
                memory_free_bytes=memory_free,
                call_running_s=round(running_s, 3),
                longest_call_s=round(calls.longest_s(), 3),
                calls_done=calls.done,
                loras=core.loras(),
                stage_ms=core.stage_ms(),
            ),
        )

    # ------------------------------------------------------------ liveness during calls

    def _start_liveness(self, core: ServiceCore[Any]) -> threading.Thread:
        core.calls.after_call = self._after_call
        thread = threading.Thread(
            target=self._answer_during_calls, args=(core,), name=f"{self.spec.name}.liveness"
        )
        thread.daemon = True
        thread.start()
        return thread

    def _after_call(self) -> None:
        # Wait for the liveness thread to let go of the control socket.
        with self._control_lock:
            pass

    def _answer_during_calls(self, core: ServiceCore[Any]) -> None:
        """Answer heartbeats while a model call holds the loop (past ``LIVENESS_AFTER_S``)."""
        calls = core.calls
        while not self._closing.is_set():
            started = calls.wait_for_call(timeout_s=1.0)
            # Short calls never go further: the loop answers between them.
            if started is None or calls.wait_for_end(started, LIVENESS_AFTER_S):
                continue
            with self._control_lock:
                while calls.started == started and not self._closing.is_set():
                    if self.control.poll(int(LIVENESS_POLL_S * 1000)):
                        self._liveness_drain(core, started)

    def _liveness_drain(self, core: ServiceCore[Any], started: float) -> None:
        while True:
            try:
                raw = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if (msg := self.side.decode(raw)) is None:
                continue
            match msg:
                case p.Heartbeat(seq=seq):
                    self.control.send(self._ack(core, seq, self._memory_free, started))
                case p.Stop():
                    self._stopping = True
                    self._deferred.append(msg)
                case _:
                    self._deferred.append(msg)

    def run(self, core_factory: CoreFactory | None) -> int:
        """Hello → build the core → Ready → loop until Stop. Returns the exit code."""
        spec = self.spec
        self.control.send(self.side.hello())
        core: ServiceCore[Any] | None = None
        try:
            core = self.make_core(core_factory)
            self.inbox_codec = p.inbox_codec(core.inbox)
            self._start_liveness(core)
            self.control.send(self.side.ready())
            logger.info("ready (pid %d)", os.getpid())
            self._loop(core)
            return 0
        except Exception as exc:
            logger.exception("service failed")
            with contextlib.suppress(zmq.ZMQError):
                reason = f"{type(exc).__name__}: {exc}"
                self.send_control(p.ServiceFailed(service=spec.name, reason=reason))
            return 1
        finally:
            self._closing.set()
            if core is not None:
                with contextlib.suppress(Exception):
                    core.close()
            with contextlib.suppress(Exception):
                self.close_sockets()
            self.outbox.close()
            self.control.close(linger=100)
            self.inbox.close(linger=0)
            self.ctx.term()

    def _loop(self, core: ServiceCore[Any]) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.inbox, zmq.POLLIN)
        own: tuple[zmq.Socket[bytes], ...] = ()
        next_tick = 0.0
        while not self._stopping:
            if (wanted := self.sockets()) != own:
                for sock in set(own) - set(wanted):
                    poller.unregister(sock)
                for sock in set(wanted) - set(own):
                    poller.register(sock, zmq.POLLIN)
                own = wanted
            now = time.monotonic()
            timeout_s = PARENT_CHECK_INTERVAL_S
            if next_tick:
                timeout_s = max(0.0, min(timeout_s, next_tick - now))
            events = dict(poller.poll(int(timeout_s * 1000)))
            if self.control in events or self._deferred:
                self._drain_control(core)
            if self.inbox in events and not self._stopping:
                self._drain_inbox(core)
                next_tick = 0.0  # new messages may be new work (a frame to run the model on)
            for sock in own:
                if sock in events and not self._stopping:
                    self.readable(sock)
            now = time.monotonic()
            if not next_tick or now >= next_tick:
                wait_s = core.tick()
                next_tick = now + wait_s if wait_s is not None else 0.0
            while core.session_failures:
                session_id, reason = core.session_failures.pop(0)
                self.send_control(
                    p.SessionFailed(session_id=session_id, service=self.spec.name, reason=reason)
                )
            if now - self._last_parent_check >= PARENT_CHECK_INTERVAL_S:
                self._last_parent_check = now
                if os.getppid() != self.spec.supervisor_pid:
                    logger.warning("supervisor is gone; exiting")
                    return

    def _drain_control(self, core: ServiceCore[Any]) -> None:
        while self._deferred:  # what arrived while a model call held the loop
            self._on_control(core, self._deferred.pop(0))
        while True:
            try:
                raw = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if (msg := self.side.decode(raw)) is None:
                continue
            self._on_control(core, msg)

    def _on_control(self, core: ServiceCore[Any], msg: p.SupervisorToService) -> None:
        match msg:
            case p.Heartbeat(seq=seq):
                self._memory_free = core.memory_free_bytes()
                self.control.send(self._ack(core, seq, self._memory_free))
            case p.Stop(reason=reason):
                logger.info("stopping (%s)", reason or "requested")
                self._stopping = True
            case p.StartSession():
                try:
                    core.start_session(msg)
                except Exception as exc:
                    logger.exception("session %s failed to start", msg.session_id)
                    self.send_control(
                        p.SessionFailed(
                            session_id=msg.session_id,
                            service=self.spec.name,
                            reason=f"{type(exc).__name__}: {exc}",
                        )
                    )
                else:
                    self.send_control(
                        p.SessionStarted(session_id=msg.session_id, service=self.spec.name)
                    )
            case p.EndSession(session_id=session_id):
                core.end_session(session_id)
            case p.SessionFailed():
                core.on_session_failed(msg)
            case _:
                self.on_control(msg)

    def _drain_inbox(self, core: ServiceCore[Any]) -> None:
        # Bounded so control gets a look-in between bursts.
        for _ in range(256):
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = self.inbox_codec.decode(raw)
            except p.MessageRejected as exc:
                self.side.reject(f"inbox message: {exc}")
                continue
            try:
                core.handle(msg)
            except SessionError as exc:
                self.send_control(
                    p.SessionFailed(
                        session_id=exc.session_id, service=self.spec.name, reason=exc.reason
                    )
                )
            except (KeyError, ValueError) as exc:
                # A well-formed message that does not fit (unknown session, wrong ring).
                self.side.reject(f"{type(msg).__name__}: {exc}")


def run_service(
    spec: ServiceSpec,
    core_factory: CoreFactory | None,
    proc_class: type[ServiceProc] = ServiceProc,
) -> int:
    """Entry function of a service process (``proc_class``: a link's own process)."""
    configure_logging(spec.name, spec.log_level, spec.run_dir)
    die_with_parent(spec.supervisor_pid)
    # SIGINT goes to the whole foreground process group on Ctrl-C: the supervisor stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    proc = proc_class(spec)

    def on_sigterm(signum: int, frame: object) -> None:
        proc._stopping = True

    signal.signal(signal.SIGTERM, on_sigterm)
    return proc.run(core_factory)
