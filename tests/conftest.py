"""Fixtures that run dreamwire the way a user does: ``supervisor start`` in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

# The Python client lives in scripts/ (a tool for users, reused by tests and benchmarks).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from services import protocol as p
from supervisor.client import AdminClient, SupervisorUnreachable

POLL_S = 0.05


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``predicate`` until it returns something truthy (a bounded wait, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


async def async_wait_until(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """:func:`wait_until` for async tests: the (blocking) predicate runs in a thread, so the
    event loop (a WebRTC client, say) keeps running while we wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_S)


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A free TCP port on loopback, never the same twice in a session: a server of an earlier
    test that is still going away must not answer for the next one."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


class SupervisorRun:
    """A ``supervisor start`` subprocess with its own run base, port and config."""

    def __init__(
        self,
        base: Path,
        config: str,
        extra_args: list[str] | None = None,
        *,
        command: str = "start",
        prefix: list[str] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        """``command`` is ``start`` or ``node``; ``prefix`` runs it elsewhere (``ip netns exec
        NS``), where its HTTP API answers on ``host``."""
        self.base = base
        self.host = host
        self.port = free_port()
        self.config_path = base / "dreamwire.toml"
        self.config_path.write_text(f"port = {self.port}\n{config}")
        self.log_path = base / "supervisor.log"
        # tests/ on the path of every process: test stand-ins (a Moondream with the same four
        # methods, say) are loaded by module name in the services.
        tests_dir = str(Path(__file__).resolve().parent)
        python_path = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
        self.env = {
            **os.environ,
            "DREAMWIRE_RUN_DIR": str(base / "run"),
            # The web UI's stored answers stay out of the real home.
            "DREAMWIRE_HOME": str(base / "home"),
            "PYTHONPATH": python_path,
        }
        self.args = [
            *(prefix or []),
            sys.executable,
            "-m",
            "supervisor.cli",
            command,
            "--config",
            str(self.config_path),
            *(extra_args or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_dir: Path | None = None
        self._log: BinaryIO | None = None

    def launch(self) -> None:
        """``supervisor start``, without waiting for anything."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=self._log, stderr=self._log)
        self.run_dir = None

    def answering(self) -> p.StatusReport | None:
        """The status, once the supervisor has a run directory and answers on it."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited early:\n{self.log()}")
        pid = self.proc.pid
        # By the pid it recorded, not by its lock in /dev/shm: a run in a mount namespace of its
        # own has its lock in a /dev/shm this process cannot see.
        runs = [p.parent for p in (self.base / "run").glob("*/supervisor.json")]
        mine = [r for r in runs if json.loads((r / "supervisor.json").read_text())["pid"] == pid]
        if not mine:
            return None
        self.run_dir = mine[0]
        try:
            return self.status()
        except SupervisorUnreachable:
            return None

    def start(self, timeout_s: float = 60) -> SupervisorRun:
        self.launch()

        def up() -> bool:
            report = self.answering()
            return (
                report is not None
                and report.phase == "running"
                and all(s.state == "ready" for s in report.services)
            )

        wait_until(up, timeout_s, "supervisor to be ready")
        if any(s.name == "signalling" for s in self.status().services):
            wait_until(self._http_answers, timeout_s, "the HTTP API to answer")
        return self

    def _http_answers(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=5):
                return True
        except urllib.error.HTTPError:
            return True  # 503 is an answer
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self) -> AdminClient:
        assert self.run_dir is not None
        return AdminClient(self.run_dir)

    def request(self, message: p.AdminRequest) -> p.AdminReply:
        with self.admin() as client:
            return client.request(message)

    def status(self) -> p.StatusReport:
        with self.admin() as client:
            return client.status()

    def service(self, name: str) -> p.ServiceStatus:
        return next(s for s in self.status().services if s.name == name)

    def child_pids(self) -> list[int]:
        assert self.proc is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True, check=False
        ).stdout
        return [int(x) for x in out.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout_s)
        finally:
            self.close_log()
        return code

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short directory: Unix socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="dw", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


LOG_TAIL_CHARS = 12_000


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """A failed test shows the end of each supervisor log it started: the server's side of the
    story (a stage that crashed or was restarted) is what explains most failures."""
    report = yield
    runs: list[SupervisorRun] = getattr(item, "supervisor_runs", [])
    if report.failed:
        for run in runs:
            if run.log_path.exists():
                tail = run.log()[-LOG_TAIL_CHARS:]
                report.sections.append((f"supervisor log ({run.log_path})", tail))
    return report


@pytest.fixture
def start_supervisor(
    short_tmp: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., SupervisorRun]]:
    runs: list[SupervisorRun] = []
    request.node.supervisor_runs = runs

    def start(
        config: str = "",
        extra_args: list[str] | None = None,
        wait: bool = True,
        prefix: list[str] | None = None,
    ) -> SupervisorRun:
        run = SupervisorRun(short_tmp, config, extra_args, prefix=prefix)
        runs.append(run)
        if not wait:
            run.launch()
            return run
        return run.start()

    yield start
    for run in runs:
        if run.proc is not None and run.proc.poll() is None:
            # A clean stop, so that no process of this test outlives it into the next one.
            run.proc.terminate()
            try:
                run.proc.wait(20)
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait(10)
        run.close_log()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """torch on one thread: deterministic and steady on a shared 2-core machine."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD-Turbo + TAESD with tiny random weights, in the real layout (built once a session)."""
    pytest.importorskip("diffusers")
    import make_tiny_models

    models = tmp_path_factory.mktemp("models")
    make_tiny_models.make_all(models)
    return models


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The causal Wan checkpoints with tiny random weights (built once a session)."""
    pytest.importorskip("diffusers")
    import make_tiny_wan

    models = tmp_path_factory.mktemp("wan-models")
    make_tiny_wan.make_all(models)
    return models


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium through Playwright, one launch per test module (``tests/browser.py``
    says where it is and how it starts)."""
    from browser import CHROMIUM_ARGS, ensure_chromium
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    with sync_playwright() as pw:
        launched = pw.chromium.launch(
            executable_path=str(executable), args=CHROMIUM_ARGS, headless=True
        )
        yield launched
        launched.close()


BROWSER_TESTS = ("test_web_page.py", "test_scope_clients.py")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Browser tests need Debian's chromium: install it before any test's timeout starts."""
    if any(item.path.name in BROWSER_TESTS for item in session.items):
        from browser import ensure_chromium

        ensure_chromium()
