"""Child processes of the supervisor: spawn, state, restart policy with backoff."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import subprocess
import sys
import time
from collections import deque

import msgspec

from services import topology
from services.runtime import SPEC_ENV, ServiceSpec
from supervisor.config import RestartPolicy

logger = logging.getLogger(__name__)


class State(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


def module_for(kind: str) -> str:
    """signalling has its own asyncio entry; every other kind runs on services.main."""
    return "signalling.main" if kind == topology.SIGNALLING else "services.main"


class Child:
    """One supervised service: a process that comes and goes, and its bookkeeping."""

    def __init__(self, spec: ServiceSpec, policy: RestartPolicy) -> None:
        self.spec = spec
        #: Processes started by a pipeline load (inference, overlay): a failed load is final
        #: (status ``error``) until the next load request.
        self.is_pipeline = spec.kind in topology.PIPELINE_KINDS
        #: The WebRTC media stages: they answer between frames of a few milliseconds.
        self.is_media = spec.kind in topology.MEDIA_KINDS
        #: Its connection on control.sock, once its Hello proved it (None before).
        self.route: bytes | None = None
        #: A crash of an inference process ends its sessions (their model state is gone);
        #: decode, encode and overlay carry their sessions on after a restart.
        self.fatal_to_sessions = spec.kind == "inference"
        self.removing = False
        self.name = spec.name
        self.policy = policy
        self.state = State.STOPPED
        self.proc: subprocess.Popen[bytes] | None = None
        self.pidfd: int | None = None
        self.started_at = 0.0
        self.ready_at = 0.0
        self.restarts = 0
        self.restart_times: deque[float] = deque()
        self.restart_due = 0.0
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def spawn(self) -> None:
        env = dict(os.environ)
        env[SPEC_ENV] = msgspec.json.encode(self.spec).decode()
        self.route = None  # the new process proves itself anew
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module_for(self.spec.kind)],
            env=env,
            close_fds=True,
        )
        try:
            self.pidfd = os.pidfd_open(self.proc.pid)
        except (AttributeError, OSError):
            self.pidfd = None  # polled instead (non-Linux / old kernel)
        now = time.monotonic()
        self.failure_reason = ""
        self.kill_reason = ""
        self.state = State.STARTING
        self.started_at = now
        self.last_ack = now
        self.unanswered_since = None
        self.progress_at = now
        logger.info("started %s (pid %d)", self.name, self.proc.pid)

    def exited(self) -> int | None:
        """The exit status once the process is gone (reaps it), else None."""
        if self.proc is None:
            return None
        return self.proc.poll()

    def reap(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def schedule_restart(self, reason: str) -> bool:
        """Record a failure; schedule a restart or mark failed. True when one is scheduled."""
        now = time.monotonic()
        self.last_error = reason
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

    def uptime_s(self) -> float:
        if self.state not in (State.READY, State.STARTING):
            return 0.0
        return time.monotonic() - self.started_at
