"""The supervisor's per-process figures count a process's children: a split pipeline's VAE
stages are children of its inference process, and their CPU and memory are its cost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from supervisor.procstats import MIN_INTERVAL_S, ProcessSampler

pytestmark = pytest.mark.timeout(60)

#: A parent that only waits for its child, which holds 80 MB and keeps a core busy.
PARENT = (
    "import subprocess, sys\n"
    "child = 'b = bytearray(80_000_000)\\nwhile True: b[0] = 1'\n"
    "subprocess.Popen([sys.executable, '-c', child]).wait()\n"
)


def test_a_process_counts_its_childrens_cpu_and_memory() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], start_new_session=True)
    try:
        sampler = ProcessSampler()
        deadline = time.monotonic() + 30
        while True:
            sample = sampler.sample(parent.pid)
            # The parent alone: ~10 MB, idle. Its child: 80 MB, one core.
            if sample.rss_bytes > 80_000_000 and sample.cpu_percent > 50:
                break
            assert time.monotonic() < deadline, sample
            time.sleep(MIN_INTERVAL_S)  # the sampler's CPU window
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
