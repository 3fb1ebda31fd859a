"""Several devices in one box: one inference process per pipeline per device, sessions placed
on the device with the most room, a crash on one device stopping only its own sessions.

Run here with two CPU stand-ins (``devices = ["cpu:0", "cpu:1"]``): the same processes, names
and placement as ``cuda:0``/``cuda:1`` (which also get ``CUDA_VISIBLE_DEVICES``), without GPUs.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SupervisorRun, wait_until

from services import protocol as p
from signalling.models import ModelsLink

pytestmark = pytest.mark.timeout(120)

DEVICES = ("inference/testcard@cpu:0", "inference/testcard@cpu:1")


def test_two_devices_share_the_sessions_and_one_crash_stays_on_its_device(
    start_supervisor: Callable[..., SupervisorRun],
) -> None:
    run = start_supervisor(
        'signalling = false\npipelines = ["testcard"]\ndevices = ["cpu:0", "cpu:1"]\n'
    )
    services = {s.name: s for s in run.status().services}
    assert all(services[name].state == "ready" for name in DEVICES)
    assert [services[name].device for name in DEVICES] == ["cpu:0", "cpu:1"]
    assert run.status().pipelines[0].status == "loaded"

    placed = []
    for session_id in ("s1", "s2"):
        request = p.OpenSession(
            session_id, 128, 96, pipeline_ids=["testcard"], mode="text", params={"mode": "text"}
        )
        reply = run.request(request)
        assert isinstance(reply, p.SessionOpened), reply
        placed.append(reply.stages[0])
    assert sorted(placed) == list(DEVICES)  # equal room: one session each

    def both_generating() -> bool:
        return all(run.service(name).frames_done > 5 for name in DEVICES)

    wait_until(both_generating, 60, "frames from both devices")
    victim, survivor = DEVICES[1], DEVICES[0]
    os.kill(run.service(victim).pid or 0, signal.SIGKILL)
    before = run.service(survivor).frames_done

    def victim_back_survivor_on() -> bool:
        back = run.service(victim)
        return back.restarts == 1 and back.state == "ready"

    wait_until(victim_back_survivor_on, 60, f"{victim} restarted")
    wait_until(lambda: run.service(survivor).frames_done > before + 5, 30, "the other device on")
    assert run.service(survivor).restarts == 0
    assert run.stop() == 0


def test_hardware_info_lists_every_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """nvidia-smi's CSV as two H200s print it, through a stand-in on PATH."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\necho "0, NVIDIA H200, 143771, 120000"\necho "1, NVIDIA H200, 143771, 2048"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    info = ModelsLink(tmp_path).hardware_info()
    assert info.vram_gb == 140.4
    assert [(g.index, g.name, g.memory_free_gb) for g in info.gpus] == [
        (0, "NVIDIA H200", 117.2),
        (1, "NVIDIA H200", 2.0),
    ]
