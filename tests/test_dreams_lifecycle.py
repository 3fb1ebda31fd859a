"""The generator runs only while watched: start, grace period, saved state, crash recovery."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from dreams_helpers import decode_number, dreams_config, serve_dreams

from dreams.wire import DreamState
from signalling.dreams import LocalWorkerLauncher

pytestmark = pytest.mark.timeout(60)

KEYFRAME_INTERVAL = 5  # dreams_config's workers checkpoint every 5 frames


async def drawn_numbers(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[int]:
    """The numbers drawn in the next ``count`` frames a viewer receives (status ignored)."""
    numbers: list[int] = []
    while len(numbers) < count:
        message = await ws.receive(timeout=20)
        assert message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), message
        if message.type == aiohttp.WSMsgType.BINARY:
            number = decode_number(message.data[1:])
            assert number is not None
            numbers.append(number)
    return numbers


async def current_number(client: TestClient[web.Request, web.Application]) -> int:
    async with client.get("/api/dreams/current") as resp:
        assert resp.status == 200
        return int(resp.headers["X-Frame-Number"])


async def test_starts_for_a_viewer_stops_after_grace_and_resumes_its_state() -> None:
    async with serve_dreams(dreams_config(grace_period_s=0.5)) as (client, hub):
        launcher = hub.launcher
        assert isinstance(launcher, LocalWorkerLauncher)
        assert hub.state == "idle" and launcher.starts == 0

        async with client.ws_connect("/ws/dreams") as ws:
            first = await drawn_numbers(ws, 8)
        assert first == list(range(1, 9))
        assert launcher.starts == 1

        # Last viewer gone: grace period, then 0x12 save, 0x13 shutdown, process gone.
        await hub.wait_state("stopping", timeout_s=10)
        await hub.wait_state("idle", timeout_s=15)
        assert not launcher.running()
        assert hub.snapshot is not None
        saved = msgspec.msgpack.decode(hub.snapshot, type=DreamState)
        assert saved.frame_number > first[-1]
        latest = hub.cache.latest()
        assert latest is not None and latest.number == hub.last_number  # queue flushed
        last_before = latest.number

        # The next viewer gets the cached frame at once, then a worker resumed from the state.
        async with client.ws_connect("/ws/dreams") as ws:
            status = json.loads((await ws.receive(timeout=5)).data)
            assert status["type"] == "status" and status["status"] == "starting"
            numbers = await drawn_numbers(ws, 6)
        assert numbers[0] == last_before  # the cached frame
        assert numbers[1:] == list(range(saved.frame_number, saved.frame_number + 5))
        assert launcher.starts == 2
        resumed = msgspec.msgpack.decode(hub.snapshot, type=DreamState)
        assert (resumed.seed, resumed.prompt) == (saved.seed, saved.prompt)


async def test_killed_worker_leaves_cached_frames_then_recovers() -> None:
    async with serve_dreams(dreams_config()) as (client, hub):
        launcher = hub.launcher
        assert isinstance(launcher, LocalWorkerLauncher)
        async with client.ws_connect("/ws/dreams") as ws:
            before = await drawn_numbers(ws, 8)
            pid = launcher.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)

            state = await hub.wait_state("error", "starting", timeout_s=10)
            assert state in ("error", "starting")
            # Still serving the cached frames, and saying what happened.
            cached = await current_number(client)
            assert cached >= before[-1]
            async with client.get("/api/dreams/status") as resp:
                status = await resp.json()
            assert status["status"] in ("error", "starting")
            assert status["gpu"]["error_message"]
            assert status["cache"]["frames_cached"] > 0
            async with client.get("/api/dreams/health") as resp:
                assert resp.status in (200, 503)

            # Relaunched (with backoff): frames flow again, resumed from the last checkpoint.
            await hub.wait_state("ready", timeout_s=30)
            assert launcher.starts == 2 and launcher.pid != pid
            after = await drawn_numbers(ws, 10)
        # Frames still queued at the kill come first, then the new worker's, which may go back
        # to the checkpoint (a keyframe) it resumed from: never to frame 1.
        rewinds = [i for i in range(1, len(after)) if after[i] <= after[i - 1]]
        resumed = after[rewinds[-1] :] if rewinds else after
        assert len(resumed) >= 5, after
        assert resumed == list(range(resumed[0], resumed[0] + len(resumed))), after
        assert resumed[0] > before[-1] - 2 * KEYFRAME_INTERVAL, after
        assert await current_number(client) > cached  # the hub's numbers only grow


async def test_a_viewer_arriving_during_the_stop_sees_it_start_again_not_sleep() -> None:
    async with serve_dreams(dreams_config(grace_period_s=0.2)) as (client, hub):
        launcher = hub.launcher
        assert isinstance(launcher, LocalWorkerLauncher)
        async with client.ws_connect("/ws/dreams") as ws:
            await drawn_numbers(ws, 3)
        pid = launcher.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # holds the stop: the worker cannot send its state yet
        try:
            await hub.wait_state("stopping", timeout_s=10)
            async with client.ws_connect("/ws/dreams") as ws:
                statuses: list[str] = []
                while statuses[-1:] != ["ready"]:
                    message = await ws.receive(timeout=20)
                    if message.type != aiohttp.WSMsgType.TEXT:
                        continue
                    data = json.loads(message.data)
                    if data["type"] != "status" or statuses[-1:] == [data["status"]]:
                        continue
                    statuses.append(data["status"])
                    if data["status"] == "stopping":
                        os.kill(pid, signal.SIGCONT)  # the newcomer is in: let the stop finish
        finally:
            with contextlib.suppress(ProcessLookupError):  # gone already when all went well
                os.kill(pid, signal.SIGCONT)
        assert statuses == ["stopping", "starting", "ready"]
        assert launcher.starts == 2
