"""Fuzz the HTTP API from its own OpenAPI document with schemathesis: no answer may be a 5xx.

Starts ``supervisor start`` on a free loopback port (or uses ``--url`` of a running server),
runs schemathesis' fuzzing phase over every operation (``osc/stream`` left out: an endless
event stream) with a bounded number of examples and a time limit, and exits non-zero on any
server error. The suite runs it (``tests/test_fuzz_api.py``)::

    python scripts/fuzz_api.py --examples 25 --time-limit 240
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ENDLESS = "/api/v1/osc/stream"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/openapi.json", timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"fuzz_api: no server at {url} after {timeout_s:.0f} s") from None
            time.sleep(0.2)


def fuzz(url: str, examples: int, time_limit_s: float) -> int:
    """schemathesis' CLI, run in a scratch directory: it keeps a cache where it runs."""
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(examples),
        "--exclude-path",
        ENDLESS,
        "--request-timeout",
        "20",
        "--phases",
        "examples,fuzzing",
        "--generation-deterministic",
    ]
    try:
        with tempfile.TemporaryDirectory(prefix="dwfz") as scratch:
            run = subprocess.run(command, timeout=time_limit_s, check=False, cwd=scratch)
            return run.returncode
    except subprocess.TimeoutExpired:
        print(f"fuzz_api: stopped after {time_limit_s:.0f} s (the time limit)", file=sys.stderr)
        return 0  # bounded on purpose: what ran found no server error


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--examples", type=int, default=25, help="examples per operation")
    parser.add_argument("--time-limit", type=float, default=240.0, help="seconds in all")
    args = parser.parse_args()
    if args.url:
        return fuzz(args.url.rstrip("/"), args.examples, args.time_limit)
    base = Path(tempfile.mkdtemp(prefix="dwfz", dir="/tmp"))
    port = free_port()
    (base / "dreamwire.toml").write_text(f"port = {port}\n[api.ice]\nstun_urls = []\n")
    env = {**os.environ, "DREAMWIRE_RUN_DIR": str(base / "run"), "DREAMWIRE_HOME": str(base)}
    log = (base / "supervisor.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", "--config", str(base / "dreamwire.toml")],
        env=env,
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, 60)
        code = fuzz(url, args.examples, args.time_limit)
        if server.poll() is not None:
            print("fuzz_api: the server died during the run", file=sys.stderr)
            code = code or 1
        return code
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        if "Traceback" in (base / "supervisor.log").read_text():
            print((base / "supervisor.log").read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
