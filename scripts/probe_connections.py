"""Connections that hold sockets, against ``supervisor start``: how long the server keeps them,
whether it still answers meanwhile, and what its log does.

    python scripts/probe_connections.py                       # this checkout
    python scripts/probe_connections.py --checkout /tmp/old   # another one, side by side

For each checkout, in one run: the server starts with a soft descriptor limit of 1024 (the usual
``ulimit -n``), then from 127.0.0.2 (one client address) ``--idle`` connections that send
nothing, ``--slow`` that send a request head a byte every 0.5 s, and ``--flood`` more opened at
once. It reports how many the server accepted, how long it held them (capped at ``--hold-s``),
``/health``'s answer and latency (asked from 127.0.0.1) while they are open, and how much the
run's log grew.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTACKER_ADDRESS = "127.0.0.2"
#: A connection closed this soon was refused as it opened (the accept queue may hold it a while).
REFUSED_WITHIN_S = 3.0


@dataclass
class Held:
    kind: str
    seconds: float
    refused_at_once: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def health(url: str) -> tuple[str, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url + "/health", timeout=10) as resp:
            status = str(resp.status)
    except urllib.error.HTTPError as exc:
        status = str(exc.code)
    except OSError as exc:
        status = type(exc).__name__
    return status, time.monotonic() - started


async def hold(port: int, kind: str, hold_s: float) -> Held:
    started = time.monotonic()
    try:
        # From another loopback address than /health's: one attacker, one user.
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(ATTACKER_ADDRESS, 0)
        )
    except OSError:
        return Held(kind, 0.0, True)
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 500
    try:
        deadline = started + hold_s
        i = 0
        while time.monotonic() < deadline:
            if kind == "slow" and i < len(head):
                writer.write(head[i : i + 1])
                i += 1
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1024), 0.5) == b"":
                    break
    except (ConnectionResetError, BrokenPipeError):
        pass
    finally:
        writer.close()
    seconds = time.monotonic() - started
    return Held(kind, seconds, seconds < REFUSED_WITHIN_S)


async def attack(url: str, port: int, args: argparse.Namespace) -> dict[str, object]:
    tasks = [asyncio.create_task(hold(port, "idle", args.hold_s)) for _ in range(args.idle)]
    tasks += [asyncio.create_task(hold(port, "slow", args.hold_s)) for _ in range(args.slow)]
    await asyncio.sleep(1.0)
    tasks += [asyncio.create_task(hold(port, "flood", args.hold_s)) for _ in range(args.flood)]
    await asyncio.sleep(2.0)
    answers = [await asyncio.to_thread(health, url) for _ in range(5)]
    held = await asyncio.gather(*tasks)
    out: dict[str, object] = {}
    for kind in ("idle", "slow", "flood"):
        mine = [h for h in held if h.kind == kind]
        kept = [h.seconds for h in mine if not h.refused_at_once]
        out[kind] = (
            f"{len(kept)}/{len(mine)} kept past {REFUSED_WITHIN_S:g} s, held median "
            f"{statistics.median(kept) if kept else 0:.1f} s, max {max(kept, default=0):.1f} s"
        )
    statuses = ", ".join(sorted({a[0] for a in answers}))
    out["health"] = f"{statuses} in at most {max(a[1] for a in answers):.2f} s"
    return out


def run_checkout(checkout: Path, args: argparse.Namespace) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="dwprobe", dir="/tmp"))
    port = free_port()
    (base / "c.toml").write_text(f"port = {port}\n[api.ice]\nstun_urls = []\n")
    env = {
        **os.environ,
        "DREAMWIRE_RUN_DIR": str(base / "run"),
        "DREAMWIRE_HOME": str(base),
        "PYTHONPATH": str(checkout),
    }

    def soft_limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))

    log = (base / "out.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", "--config", str(base / "c.toml")],
        env=env,
        cwd=checkout,
        stdout=log,
        stderr=log,
        preexec_fn=soft_limit,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while health(url)[0] not in ("200", "503"):
            if time.monotonic() > deadline:
                raise SystemExit(f"no server from {checkout}")
            time.sleep(0.2)
        logs = list((base / "run").glob("*/server.log"))
        before = logs[0].stat().st_size if logs else 0
        result = asyncio.run(attack(url, port, args))
        result["log growth"] = f"{((logs[0].stat().st_size if logs else 0) - before) / 1e3:.1f} kB"
        result["server"] = "alive" if server.poll() is None else f"exited {server.returncode}"
        return result
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(base, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, action="append", help="default: this one")
    parser.add_argument("--idle", type=int, default=50)
    parser.add_argument("--slow", type=int, default=300)
    parser.add_argument("--flood", type=int, default=800)
    parser.add_argument("--hold-s", type=float, default=30.0)
    parser.add_argument("--nofile", type=int, default=1024)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this client's own sockets
    checkouts = args.checkout or [ROOT]
    rows = {str(c): run_checkout(c.resolve(), args) for c in checkouts}
    keys = ["idle", "slow", "flood", "health", "log growth", "server"]
    print("| checkout | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, result in rows.items():
        print(f"| {name} | " + " | ".join(str(result[k]) for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
