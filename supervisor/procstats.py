"""CPU, memory and GPU memory of the supervisor's children, for ``supervisor status`` and the
metrics (``/api/v1/metrics``, ``/metrics``).

CPU is the share of one core used between two samples (100 = one core busy), measured by psutil
from the process's own CPU times; samples closer together than ``MIN_INTERVAL_S`` reuse the last
value, so several status readers do not shorten each other's windows. GPU memory per process
comes from ``nvidia-smi --query-compute-apps`` where it is installed (at most every
``GPU_INTERVAL_S``; a missing or failing ``nvidia-smi`` just leaves it unknown).

A process's figures include its descendants': a split pipeline's VAE stage processes (and
multiprocessing's helper) are children of its inference process, and their cost is its cost.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import subprocess
import time
from dataclasses import dataclass

import psutil

logger = logging.getLogger(__name__)

MIN_INTERVAL_S = 0.5
GPU_INTERVAL_S = 5.0
NVIDIA_SMI_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ProcessSample:
    cpu_percent: float = 0.0
    rss_bytes: int = 0
    gpu_memory_bytes: int | None = None


class ProcessSampler:
    def __init__(self) -> None:
        self._procs: dict[int, psutil.Process] = {}
        #: Each sampled process's descendants, kept so their CPU windows carry over.
        self._children: dict[int, dict[int, psutil.Process]] = {}
        self._last: dict[int, ProcessSample] = {}
        self._sampled_at: dict[int, float] = {}
        self._nvidia_smi = shutil.which("nvidia-smi")
        self._gpu: dict[int, int] = {}
        self._gpu_at = 0.0

    def sample(self, pid: int | None) -> ProcessSample:
        if pid is None:
            return ProcessSample()
        now = time.monotonic()
        last = self._last.get(pid)
        if last is not None and now - self._sampled_at[pid] < MIN_INTERVAL_S:
            return last
        proc = self._procs.get(pid)
        try:
            if proc is None:
                proc = self._procs[pid] = psutil.Process(pid)
                proc.cpu_percent(None)  # the first call only starts the window
            cpu = proc.cpu_percent(None)
            rss = int(proc.memory_info().rss)
            family = self._descendants(pid, proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self.forget(pid)
            return ProcessSample()
        gpus = self._gpu_memory(now)
        gpu = [gpus[p] for p in (pid, *family) if p in gpus]
        for child in family.values():
            with contextlib.suppress(psutil.Error):  # gone meanwhile: it costs nothing now
                cpu += child.cpu_percent(None)  # 0.0 the first time (its window starts)
                rss += int(child.memory_info().rss)
        sample = ProcessSample(cpu, rss, sum(gpu) if gpu else None)
        self._last[pid] = sample
        self._sampled_at[pid] = now
        return sample

    def _descendants(self, pid: int, proc: psutil.Process) -> dict[int, psutil.Process]:
        known = self._children.get(pid, {})
        now = {c.pid: known.get(c.pid, c) for c in proc.children(recursive=True)}
        self._children[pid] = now
        return now

    def forget(self, pid: int) -> None:
        self._procs.pop(pid, None)
        self._children.pop(pid, None)
        self._last.pop(pid, None)
        self._sampled_at.pop(pid, None)

    def prune(self, live_pids: set[int]) -> None:
        for pid in list(self._procs):
            if pid not in live_pids:
                self.forget(pid)

    def _gpu_memory(self, now: float) -> dict[int, int]:
        if self._nvidia_smi is None or now - self._gpu_at < GPU_INTERVAL_S:
            return self._gpu
        self._gpu_at = now
        try:
            out = subprocess.run(
                [
                    self._nvidia_smi,
                    "--query-compute-apps=pid,used_memory",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            logger.debug("nvidia-smi failed: %s", exc)
            return self._gpu
        gpu: dict[int, int] = {}
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                pid_text, mib = (x.strip() for x in line.split(","))
                gpu[int(pid_text)] = gpu.get(int(pid_text), 0) + int(float(mib) * 2**20)
        self._gpu = gpu
        return gpu
