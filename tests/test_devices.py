"""Several devices in one box: one inference process per pipeline per device, sessions placed
on the device with the most room, a crash on one device stopping only its own sessions.

Run here with two CPU stand-ins (``devices = ["cpu:0", "cpu:1"]``): the same processes, names
and placement as ``cuda:0``/``cuda:1`` (which also get ``CUDA_VISIBLE_DEVICES``), without GPUs.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from client import DreamwireClient
from conftest import SupervisorRun, async_wait_until, wait_until

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
            session_id, 128, 96, pipeline_ids=["testcard"], modes=["text"], params={"mode": "text"}
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


async def test_a_client_streams_from_a_device_and_its_settings_reach_that_device(
    start_supervisor: Callable[..., SupervisorRun],
) -> None:
    """Through signalling: the session's parameters go to the device process it was placed on
    (``inference/testcard@cpu:N``), not to a per-pipeline name no process has."""
    run = start_supervisor(
        'pipelines = ["testcard"]\ndevices = ["cpu:0", "cpu:1"]\n[api.ice]\nstun_urls = []\n'
    )
    async with DreamwireClient(f"http://127.0.0.1:{run.port}", ice_servers=[]) as client:
        await client.connect(None)  # testcard generates: a text-mode session
        await client.wait_frames(5, timeout_s=30)

        def generating() -> list[str]:
            return [s.name for s in run.status().services if s.name in DEVICES and s.frames_done]

        assert len(await async_wait_until(generating, 20, "frames counted by one device")) == 1
        corner = client.received.last_rgb
        assert corner is not None
        before = corner[-4:, -4:].mean(axis=(0, 1))
        await client.send_parameters({"prompts": [{"text": "a completely different prompt"}]})

        async def recoloured() -> bool:
            rgb = client.received.last_rgb
            assert rgb is not None
            return bool(abs(rgb[-4:, -4:].mean(axis=(0, 1)) - before).max() > 8)

        deadline = asyncio.get_running_loop().time() + 20
        while not await recoloured():
            assert asyncio.get_running_loop().time() < deadline, "the prompt change never showed"
            await client.wait_frames(1, timeout_s=10)
    assert run.stop() == 0
