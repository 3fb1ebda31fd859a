"""One supervised service as the supervisor's logic sees it: a state machine, no process.

Every transition of a child is a method here, given the time: started (a pid), ready, heartbeat
answers, a word of failure, asked to stop, exited, and the restart policy with backoff. The
process itself (``Popen``, its pidfd) belongs to :mod:`supervisor.process`.
"""

from __future__ import annotations

import enum
import hmac
import logging
import signal
from collections import deque

from services import protocol as p
from services import topology
from services.runtime import ServiceSpec
from supervisor.config import Config, RestartPolicy
from supervisor.events import Send

logger = logging.getLogger(__name__)


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Child:
    """One supervised service: the process that comes and goes under its name, and why."""

    def __init__(self, spec: ServiceSpec, policy: RestartPolicy) -> None:
        self.spec = spec
        self.name = spec.name
        self.policy = policy
        #: Processes started by a pipeline load (inference, overlay): a failed load is final
        #: (status ``error``) until the next load request.
        self.is_pipeline = spec.kind in topology.PIPELINE_KINDS
        #: The WebRTC media stages: they answer between frames of a few milliseconds.
        self.is_media = spec.kind in topology.MEDIA_KINDS
        #: A crash of an inference process ends its sessions (their model state is gone);
        #: decode, encode and overlay carry their sessions on after a restart.
        self.fatal_to_sessions = spec.kind == topology.INFERENCE
        #: Speaks the control protocol (Hello, Ready, heartbeats). A Dreams worker does not:
        #: it is up once started, and its owner decides whether to start it again.
        self.controlled = spec.kind != topology.DREAMS_WORKER
        #: The service told when an uncontrolled child ends by itself.
        self.owner: str | None = None
        self.state = State.STOPPED
        #: The running process's pid (None: none runs).
        self.pid: int | None = None
        #: Its connection on control.sock, once its Hello proved it (None before).
        self.route: bytes | None = None
        #: Unloaded: it is stopping for good and leaves the table when it exits.
        self.removing = False
        self.started_at = 0.0
        self.ready_at = 0.0
        self.restarts = 0
        self.restart_times: deque[float] = deque()
        self.restart_due = 0.0
        self.stop_deadline = 0.0
        self.last_error = ""
        self.failure_reason = ""  # what the process said (ServiceFailed) before it died
        self.kill_reason = ""  # why the supervisor killed it (no heartbeat, no progress)
        self.last_ack = 0.0
        #: When the oldest heartbeat the process has not answered yet was sent (None: all
        #: answered). Liveness is judged from it, so a supervisor that was itself held up
        #: (a loaded box) never blames its children for heartbeats it did not send.
        self.unanswered_since: float | None = None
        self.frames_done = 0
        self.progress_at = 0.0
        self.rejected = 0
        self.sessions = 0
        self.memory_free_bytes: int | None = None
        #: A model process's calls, as its last heartbeat said (``services.calls``).
        self.call_running_s = 0.0
        self.longest_call_s = 0.0
        self.calls_done = 0
        #: A model process's LoRAs and their scales, as its last heartbeat said.
        self.loras: list[p.LoraAdapter] = []
        self.stage_ms: dict[str, float] = {}
        #: The device of a per-device inference process (``cuda:1``), else None.
        self.device: str | None = spec.options.get("device")
        #: The pipeline a pipeline process runs (None for other services).
        self.pipeline_id: str | None = spec.options.get("pipeline") if self.is_pipeline else None

    # ------------------------------------------------------------ the process's life

    def started(self, pid: int, now: float) -> None:
        self.pid = pid
        self.route = None  # the new process proves itself anew
        self.failure_reason = ""
        self.kill_reason = ""
        self.state = State.STARTING
        self.started_at = self.last_ack = self.progress_at = now
        self.unanswered_since = None
        # The killed process's calls are not the new one's: judged on its own from here.
        self.call_running_s = self.longest_call_s = 0.0
        self.calls_done = 0
        self.stage_ms = {}
        logger.info("started %s (pid %d)", self.name, pid)
        if not self.controlled:
            self.state = State.READY

    def proven(self, hello: p.Hello, secret: str, route: bytes) -> bool:
        """A Hello from the process this child started, with the run's secret: its
        connection becomes the child's route."""
        if self.pid is None or self.pid != hello.pid:
            return False
        if not hmac.compare_digest(hello.secret.encode(), secret.encode()):
            return False
        self.route = route
        return True

    def ready(self, now: float) -> None:
        self.state = State.READY
        self.ready_at = self.last_ack = self.progress_at = now
        self.unanswered_since = None
        logger.info("%s ready in %.2f s", self.name, now - self.started_at)

    def heartbeat_sent(self, now: float) -> None:
        if self.controlled and self.unanswered_since is None:
            self.unanswered_since = now

    def acked(self, ack: p.HeartbeatAck, now: float) -> None:
        self.last_ack = now
        self.unanswered_since = None
        if ack.frames_done != self.frames_done or ack.frames_waiting == 0:
            self.progress_at = now
        self.frames_done = ack.frames_done
        self.rejected = ack.rejected
        self.sessions = ack.sessions
        self.memory_free_bytes = ack.memory_free_bytes
        self.call_running_s = ack.call_running_s
        self.longest_call_s = ack.longest_call_s
        self.calls_done = ack.calls_done
        self.loras = ack.loras
        self.stage_ms = ack.stage_ms

    def said_failed(self, reason: str) -> None:
        self.failure_reason = reason
        logger.error("%s failed: %s", self.name, reason)

    def stop(self, now: float, timeout_s: float, *, removing: bool = False) -> None:
        """Asked to stop (a Stop message is on its way): killed if still alive at the deadline."""
        self.state = State.STOPPING
        self.removing = self.removing or removing
        self.stop_deadline = now + timeout_s

    def exited(self, code: int, now: float) -> str | None:
        """The process is gone: None if it was asked to, else why it died (restart decided)."""
        self.pid = None
        self.route = None
        if self.state is State.STOPPING:
            self.state = State.STOPPED
            logger.info("%s stopped", self.name)
            return None
        reason = self.failure_reason or self.kill_reason
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        why = f"{self.name} died ({how})" + (f": {reason}" if reason else "")
        logger.error("%s", why)
        self.schedule_restart(why, now)
        return why

    def shut_down(self) -> None:
        """The supervisor is done with it (its process waited for, terminated or killed)."""
        self.state = State.STOPPED
        self.pid = None
        self.route = None

    def retry(self) -> None:
        """Asked to load again after a failed load: the restart budget starts afresh."""
        self.restart_times.clear()

    def schedule_restart(self, reason: str, now: float) -> bool:
        """Record a failure; schedule a restart or mark failed. True when one is scheduled."""
        self.last_error = reason
        if not self.controlled:
            self.state = State.FAILED  # its owner starts another if it wants one
            return False
        if self.is_pipeline and (self.state is State.STARTING or self.failure_reason):
            # A load that fails, or a process that said why it gives up (CUDA out of memory,
            # say), is reported as the pipeline's error; a crash without a word restarts.
            self.state = State.FAILED
            logger.error("%s failed to load: %s", self.name, reason)
            return False
        window = self.policy.window_s
        while self.restart_times and now - self.restart_times[0] > window:
            self.restart_times.popleft()
        if len(self.restart_times) >= self.policy.max_restarts:
            self.state = State.FAILED
            logger.error(
                "%s failed %d times within %.0f s; not restarting it (last: %s)",
                self.name,
                len(self.restart_times) + 1,
                window,
                reason,
            )
            return False
        delay = min(
            self.policy.backoff_max_s,
            self.policy.backoff_initial_s * (2 ** len(self.restart_times)),
        )
        self.restart_times.append(now)
        self.restarts += 1
        self.restart_due = now + delay
        self.state = State.RESTARTING
        logger.warning("%s: %s; restarting in %.2f s", self.name, reason, delay)
        return True

    # ------------------------------------------------------------ judged on the clock

    def next_due(self) -> float | None:
        """When this child next needs looking at by the clock (restart, stop deadline)."""
        if self.state is State.RESTARTING:
            return self.restart_due
        if self.state is State.STOPPING and self.pid is not None and not self.kill_reason:
            return self.stop_deadline
        return None

    def overdue(self, now: float, config: Config) -> str | None:
        """Why it must be killed now (once: then None until it exits), if it must."""
        if self.pid is None or self.kill_reason:
            return None  # not running, or killed already and its exit not yet seen
        if self.state is State.STARTING:
            limit = config.load_timeout_s if self.is_pipeline else config.ready_timeout_s
            if now - self.started_at > limit:
                self.kill_reason = "not ready in time"
        elif self.state is State.READY and self.controlled:
            self.kill_reason = self._unresponsive(now, config) or ""
        elif self.state is State.STOPPING and now > self.stop_deadline:
            self.kill_reason = "did not stop in time"
        if self.kill_reason:
            logger.error("%s: %s; killing it", self.name, self.kill_reason)
        return self.kill_reason or None

    def _unresponsive(self, now: float, config: Config) -> str | None:
        """A live process is not a live loop: stages that stop answering (liveness) or stop
        getting anywhere (progress)."""
        timeout_s, stall_s = config.heartbeat_timeout_s, config.stall_timeout_s
        if self.is_pipeline:
            # A model process answers during its calls too: silence means frozen.
            timeout_s = config.model_heartbeat_timeout_s
            stall_s = max(stall_s, config.model_heartbeat_timeout_s)
        elif self.is_media:
            timeout_s = min(timeout_s, config.media_heartbeat_timeout_s)
        unanswered_s = 0.0 if self.unanswered_since is None else now - self.unanswered_since
        if unanswered_s > timeout_s:
            frozen = ": the process is frozen" if self.is_pipeline else ""
            return f"no heartbeat answered for {unanswered_s:.1f} s{frozen}"
        if self.call_running_s > 0:
            return self._call_overdue(now, config)
        # Stalls are judged on the process's own latest report (frames waiting, none done
        # since progress_at), not on the clock now: a late report is the heartbeat's business.
        stalled_s = self.last_ack - self.progress_at
        if stalled_s > stall_s:
            return f"frames waiting but none done for {stalled_s:.1f} s"
        return None

    def _call_overdue(self, now: float, config: Config) -> str | None:
        """A model call in progress: its age against what this process's calls take."""
        running_s = self.call_running_s + (now - self.last_ack)
        if self.calls_done == 0:
            limit_s = config.model_first_call_timeout_s
            if running_s > limit_s:
                return (
                    f"its first model call has run for {running_s:.0f} s, over "
                    f"model_first_call_timeout_s ({limit_s:.0f} s): stuck"
                )
            return None
        limit_s = max(config.stall_timeout_s, config.model_call_limit_factor * self.longest_call_s)
        if running_s > limit_s:
            return (
                f"a model call has run for {running_s:.1f} s, over {limit_s:.1f} s "
                f"({config.model_call_limit_factor:g}× its longest recent call, "
                f"{self.longest_call_s:.1f} s): stuck"
            )
        return None

    def uptime_s(self, now: float) -> float:
        if self.state not in (State.READY, State.STARTING):
            return 0.0
        return now - self.started_at


class Children(dict[str, Child]):
    """Every supervised child by name, and the routes to them: a message goes only to a child
    whose connection has proved it (its Hello), and only to a ready one by name."""

    def send(self, child: Child, message: p.SupervisorToService) -> list[Send]:
        if child.route is None:
            return []  # not (yet) proven: nothing is routed to it
        return [Send(child.route, message)]

    def send_to(self, name: str, message: p.SupervisorToService) -> list[Send]:
        child = self.get(name)
        if child is None or child.state is not State.READY:
            return []
        return self.send(child, message)

    def by_route(self, route: bytes) -> Child | None:
        return next((c for c in self.values() if c.route == route), None)

    def by_pid(self, pid: int) -> Child | None:
        return next((c for c in self.values() if c.pid == pid), None)

    def of_pipeline(self, pipeline_id: str) -> list[Child]:
        """The processes of a pipeline: one, or one per device."""
        return [c for c in self.values() if c.pipeline_id == pipeline_id and not c.removing]

    def ready_pipelines(self) -> list[str]:
        """The pipelines with a ready process here (one entry per process)."""
        return [
            c.pipeline_id
            for c in self.values()
            if c.pipeline_id is not None and c.state is State.READY and not c.removing
        ]
