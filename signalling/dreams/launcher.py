"""Launchers: how the hub gets a generator when someone watches and lets it go after.

The hub drives a :class:`Launcher` from its lifecycle task, one call at a time:

* ``start(connect_url)`` when generation is wanted and no generator runs: bring one up. Return
  once it is *requested*; the generator then connects to ``/ws/gpu`` (or, in local mode, calls
  ``hub.publish_frame``) on its own, and the first frame makes the hub ``ready``.
* ``stop()`` after the shutdown handshake (0x12 save state, 0x13 shutdown) or when the
  generator failed to start: make sure it is gone. Idempotent.
* ``running()``: whether a generator this launcher started is still up (a local process alive,
  a cloud job not finished). Only consulted when ``manages_worker`` is true.
* an unexpected end (the process died, the job failed) is reported through the callback given
  to ``bind``; the hub shows ``error`` and launches again with backoff while viewers remain.

``manages_worker = False`` means the generator's life is not ours (a worker started by hand on
a GPU host): the hub then pauses it (0x10) instead of shutting it down, and resumes it (0x11).

A cloud launcher, e.g. RunPod serverless (``RUNPOD_API_KEY``, ``RUNPOD_ENDPOINT_ID``)::

    class RunPodLauncher(Launcher):
        provider = "runpod"
        manages_worker = True

        async def start(self, connect_url: str) -> None:
            # POST https://api.runpod.ai/v2/{endpoint_id}/run with
            # {"input": {"connect": connect_url}} (the public wss:// URL of /ws/gpu; the worker
            # image runs `supervisor worker --connect "$connect"` with DREAM_GEN_AUTH_TOKEN set)
            # and keep the job id; poll GET /status/{id} in a task and call self.on_exit(reason)
            # when the job ends while not stopping.
            ...

        async def stop(self) -> None:
            # POST /cancel/{id} unless the job already ended (the worker exits on 0x13).
            ...

        def running(self) -> bool:
            return self.job_id is not None  # and the last polled status is IN_QUEUE/IN_PROGRESS

and ``add_dreams_routes(app, config, launcher=RunPodLauncher(...))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Protocol

from dreams.wire import AUTH_TOKEN_ENV
from services import protocol as p
from services import topology
from signalling.dreams.config import LauncherConfig

__all__ = ["ExternalWorker", "Launcher", "LocalWorkerLauncher", "SupervisedWorker", "WorkerCommand"]

logger = logging.getLogger(__name__)

WORKER_MODULE = "dreams.worker"
EXIT_WAIT_S = 2.0


class AdminRequester(Protocol):
    async def request(self, message: p.AdminRequest) -> p.AdminReply: ...


class Launcher(ABC):
    provider: str = "none"
    configured: bool = True
    manages_worker: bool = True

    def __init__(self) -> None:
        self.on_exit: Callable[[str], None] = lambda reason: None

    def bind(self, on_exit: Callable[[str], None]) -> None:
        """The hub's callback for a generator that ended without being stopped."""
        self.on_exit = on_exit

    @abstractmethod
    async def start(self, connect_url: str) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def running(self) -> bool: ...

    async def close(self) -> None:
        """The server is stopping."""
        await self.stop()


class ExternalWorker(Launcher):
    """A worker whose life is not ours: nothing to start or stop; the hub pauses/resumes it."""

    provider = "external"
    manages_worker = False

    async def start(self, connect_url: str) -> None:
        return None

    async def stop(self) -> None:
        return None

    def running(self) -> bool:
        return False


class WorkerCommand:
    """The arguments of a local worker (``python -m dreams.worker …``) from the config."""

    def __init__(self, config: LauncherConfig, *, fps: float, width: int, height: int) -> None:
        self.config = config
        self.fps = fps
        self.width = width
        self.height = height

    def args(self, connect_url: str) -> list[str]:
        return [
            "--connect",
            self.config.connect_url or connect_url,
            "--generator",
            self.config.generator,
            "--fps",
            str(self.fps),
            "--width",
            str(self.width),
            "--height",
            str(self.height),
            *self.config.worker_args,
        ]


class SupervisedWorker(Launcher):
    """A local worker run by the supervisor (``StartWorker``/``StopWorker``), the one process
    manager of ``supervisor start``; its unasked-for end arrives as ``WorkerExited``."""

    provider = "local"
    NAME = "dreams"

    def __init__(self, command: WorkerCommand, token: str, admin: AdminRequester) -> None:
        super().__init__()
        self.command = command
        self.token = token
        self.admin = admin
        self.starts = 0
        self._running = False

    async def start(self, connect_url: str) -> None:
        request = p.StartWorker(
            self.NAME, self.command.args(connect_url), self.token, owner=topology.SIGNALLING
        )
        reply = await self.admin.request(request)
        if isinstance(reply, p.Rejected):
            raise RuntimeError(f"the supervisor refused the worker: {reply.reason}")
        self.starts += 1
        self._running = True
        logger.info("asked the supervisor for a local worker: %s", " ".join(request.args))

    def exited(self, msg: p.WorkerExited) -> None:
        """Control message from the supervisor: the worker ended by itself."""
        if msg.name != topology.dreams_worker_service(self.NAME) or not self._running:
            return
        self._running = False
        logger.warning("local worker ended: %s", msg.reason)
        self.on_exit(msg.reason)

    def running(self) -> bool:
        return self._running

    async def stop(self) -> None:
        if not self._running:
            return
        self._running = False
        await self.admin.request(p.StopWorker(self.NAME))


class LocalWorkerLauncher(Launcher):
    """Runs ``python -m dreams.worker --connect URL`` as a child process of the hub: for a hub
    served without a supervisor (``python -m signalling.dreams``, tests of the hub)."""

    provider = "local"

    def __init__(self, command: WorkerCommand, *, token: str, python: str = sys.executable) -> None:
        super().__init__()
        self.config = command.config
        self.worker = command
        self.token = token
        self.python = python
        self.starts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self, connect_url: str) -> list[str]:
        args = self.worker.args(connect_url)
        return [self.python, "-m", WORKER_MODULE, *args, "--die-with-parent", str(os.getpid())]

    async def start(self, connect_url: str) -> None:
        await self.stop()
        env = {k: v for k, v in os.environ.items() if k != AUTH_TOKEN_ENV}
        if self.token:  # in the environment, not on the command line (ps shows argv)
            env[AUTH_TOKEN_ENV] = self.token
        cmd = self.command(connect_url)
        proc = await asyncio.create_subprocess_exec(*cmd, env=env, stdin=asyncio.subprocess.DEVNULL)
        self._proc = proc
        self.starts += 1
        logger.info("started local worker pid %d: %s", proc.pid, " ".join(cmd[1:]))
        self._watch = asyncio.create_task(self._wait(proc), name=f"dreams.worker-{proc.pid}.wait")

    async def _wait(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self._proc:
            self._proc = None
            logger.warning("local worker pid %d exited with code %s", proc.pid, code)
            self.on_exit(f"worker process exited with code {code}")

    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if proc is None or proc.returncode is not None:
            if proc is not None:
                await proc.wait()
            return
        # The hub has asked it to shut down (0x13) and seen it hang up: let it exit by itself
        # for a moment, then make sure.
        timeout = self.config.kill_timeout_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), min(timeout, EXIT_WAIT_S))
            return
        logger.info("terminating local worker pid %d", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            logger.warning("local worker pid %d ignored SIGTERM: killing", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
