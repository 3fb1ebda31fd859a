"""A client of a running supervisor's admin socket (used by the CLI, tests and tools)."""

from __future__ import annotations

from pathlib import Path

import zmq

from services import protocol as p
from services.runtime import admin_endpoint
from supervisor.config import default_run_base
from supervisor.rundir import live_runs

ADMIN_TIMEOUT_S = 5.0


class SupervisorUnreachable(RuntimeError):
    pass


class AdminClient:
    def __init__(self, run_dir: str | Path, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        self.run_dir = Path(run_dir)
        self.timeout_s = timeout_s
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.codec = p.admin_client_codec()

    def request(self, message: p.AdminRequest) -> p.AdminReply:
        # A fresh REQ per request: a lost reply never wedges the next one.
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(admin_endpoint(self.run_dir))
            sock.send(self.codec.encode(message))
            if not sock.poll(int(self.timeout_s * 1000)):
                raise SupervisorUnreachable(
                    f"no answer from the supervisor at {self.run_dir} in {self.timeout_s:.0f} s"
                )
            return self.codec.decode(sock.recv())
        finally:
            sock.close(linger=0)

    def status(self) -> p.StatusReport:
        reply = self.request(p.GetStatus())
        assert isinstance(reply, p.StatusReport)
        return reply

    def close(self) -> None:
        self.ctx.term()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def find_run_dirs(base: Path | None = None) -> list[Path]:
    """Run directories of live supervisors, newest first."""
    return [Path(str(r["run_dir"])) for r in live_runs(base or default_run_base())]
