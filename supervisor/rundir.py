"""Run directories and shared-memory ownership.

A run is one ``supervisor start``. It owns:

* ``<base>/<run_id>/`` (mode 0700): the ZeroMQ ``ipc://`` sockets and ``supervisor.json``;
* ``/dev/shm/dreamwire.<run_id>.*``: its ring segments, plus ``dreamwire.<run_id>.lock``, on
  which the supervisor holds an ``flock`` for its whole life.

The lock is what tells a live run from the leftovers of a crashed one: at start-up every run
whose lock can be taken is dead, and its segments and run directory are removed. The kernel
drops the lock the instant the supervisor dies, even by SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from services.runtime import pid_alive
from shm.ring import SEGMENT_PREFIX, SHM_DIR, run_ids_in_shm, segments_of_run

logger = logging.getLogger(__name__)

RUN_INFO = "supervisor.json"
#: A Unix socket path must fit in sun_path (108 bytes on Linux).
MAX_SOCKET_PATH = 107


def lock_path(run_id: str) -> Path:
    return SHM_DIR / f"{SEGMENT_PREFIX}.{run_id}.lock"


def _try_lock(path: Path) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when a live run holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def run_is_alive(run_id: str) -> bool:
    path = lock_path(run_id)
    if not path.exists():
        return False
    fd = _try_lock(path)
    if fd is None:
        return True
    os.close(fd)
    return False


def _supervisor_alive(run_dir: Path) -> bool:
    """Whether the run's recorded supervisor still runs; True when that cannot be told (no
    record yet: a run being created writes it just after its directory)."""
    try:
        pid = int(json.loads((run_dir / RUN_INFO).read_text())["pid"])
    except FileNotFoundError:
        return run_dir.is_dir() and any(run_dir.iterdir())
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return pid_alive(pid)


def reclaim_stale(base: Path) -> list[str]:
    """Remove segments and run directories of runs that are no longer alive."""
    reclaimed = []
    ids = set(run_ids_in_shm())
    if base.is_dir():
        ids.update(p.name for p in base.iterdir() if p.is_dir())
    for run_id in sorted(ids):
        path = lock_path(run_id)
        if not path.exists():
            # Its lock is not in this /dev/shm: a run of another mount namespace sharing this
            # run base, or one whose /dev/shm was wiped. Only a dead supervisor pid proves it gone.
            if _supervisor_alive(base / run_id):
                logger.info("leaving run %s: its supervisor lives, its lock is elsewhere", run_id)
                continue
            shutil.rmtree(base / run_id, ignore_errors=True)
            reclaimed.append(run_id)
            continue
        fd = _try_lock(path)
        if fd is None:
            continue
        try:
            for seg in segments_of_run(run_id):
                seg.unlink(missing_ok=True)
            shutil.rmtree(base / run_id, ignore_errors=True)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        reclaimed.append(run_id)
    if reclaimed:
        logger.warning("reclaimed leftovers of crashed run(s): %s", ", ".join(reclaimed))
    return reclaimed


@dataclass
class Run:
    run_id: str
    path: Path
    lock_fd: int

    def write_info(self, info: dict[str, object]) -> None:
        tmp = self.path / (RUN_INFO + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(self.path / RUN_INFO)

    def close(self) -> None:
        """Remove every trace of the run: segments, sockets, the lock. Idempotent."""
        if self.lock_fd < 0:
            return
        for seg in segments_of_run(self.run_id):
            if seg != lock_path(self.run_id):
                seg.unlink(missing_ok=True)
        shutil.rmtree(self.path, ignore_errors=True)
        lock_path(self.run_id).unlink(missing_ok=True)
        os.close(self.lock_fd)
        self.lock_fd = -1


def create_run(base: Path) -> Run:
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    for _ in range(8):
        run_id = secrets.token_hex(4)
        fd = _try_lock(lock_path(run_id))
        if fd is None:
            continue
        path = base / run_id
        path.mkdir(mode=0o700)
        longest = path / "inference_streamdiffusionv2.inbox"
        if len(str(longest)) > MAX_SOCKET_PATH - 20:
            os.close(fd)
            lock_path(run_id).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            raise RuntimeError(
                f"run directory {path} is too long for Unix socket paths; "
                "set DREAMWIRE_RUN_DIR to a shorter directory"
            )
        return Run(run_id, path, fd)
    raise RuntimeError("could not allocate a run id")


def live_runs(base: Path) -> list[dict[str, object]]:
    """supervisor.json of every live run under ``base`` (newest first)."""
    runs: list[dict[str, object]] = []
    if not base.is_dir():
        return runs
    for path in base.iterdir():
        info_path = path / RUN_INFO
        if not info_path.is_file() or not run_is_alive(path.name):
            continue
        with contextlib.suppress(OSError, ValueError):
            runs.append(json.loads(info_path.read_text()))
    runs.sort(key=lambda r: float(str(r.get("started", 0))), reverse=True)
    return runs


def shm_free_bytes() -> int:
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize
