"""Dreams through ``supervisor start``: the hub in signalling, a local worker running the
``testcard`` inference pipeline, viewers on loopback, the generator stopped after the grace
period and resumed from its saved state by the next viewer."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest
from conftest import SupervisorRun, async_wait_until, pid_alive
from dreams_helpers import decode_number, poll_frames

from dreams.wire import DreamState
from signalling.dreams.frames import Playback

pytestmark = pytest.mark.timeout(60)

WIDTH, HEIGHT = 256, 128
GRACE_S = 1.0
STOP_TIMEOUT_S = 20.0


def config(state_path: Path) -> str:
    return f"""
media = false
[api.ice]
stun_urls = []
[dreams]
target_fps = 10.0
width = {WIDTH}
height = {HEIGHT}
buffer_seconds = 0.2
grace_period_s = {GRACE_S}
auth_token = ""
state_path = "{state_path}"
[dreams.launcher]
kind = "local"
generator = "pipeline:testcard"
worker_args = ["--keyframe-interval", "5"]
"""


def worker_pids(server: SupervisorRun) -> list[int]:
    """Local workers: children of the supervisor (the one process manager) running
    ``dreams.worker``, each listed by ``supervisor status`` under its pid."""
    pids = []
    for pid in server.child_pids():
        try:
            if b"dreams.worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            continue  # exited meanwhile
    listed = [s.pid for s in server.status().services if s.name == "dreams-worker/dreams"]
    assert set(pids) <= set(listed), (pids, listed)
    return pids


async def drawn_numbers(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[int]:
    numbers: list[int] = []
    while len(numbers) < count:
        message = await ws.receive(timeout=20)
        assert message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), message
        if message.type == aiohttp.WSMsgType.BINARY:
            assert message.data[0] == 0x01
            number = decode_number(message.data[1:])
            assert number is not None
            numbers.append(number)
    return numbers


async def health(http: aiohttp.ClientSession, base: str) -> dict[str, object]:
    async with http.get(f"{base}/api/dreams/health") as resp:
        assert resp.status == 200
        body: dict[str, object] = await resp.json()
        return body


async def test_viewers_wake_the_worker_grace_stops_it_next_viewer_resumes(
    start_supervisor: Callable[..., SupervisorRun], tmp_path: Path
) -> None:
    state_path = tmp_path / "dreams.state"
    server = start_supervisor(config(state_path))
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        # Nobody watching: no worker, and health does not wake one.
        assert (await health(http, base))["gpu_connected"] is False
        assert worker_pids(server) == []

        # A WebSocket viewer and the page's polling client, at once.
        polling = asyncio.create_task(asyncio.to_thread(poll_frames, base, 4, 30.0))
        async with http.ws_connect(f"{base}/ws/dreams") as ws:
            first = json.loads((await ws.receive(timeout=10)).data)
            assert first["type"] == "status" and first["status"] in ("starting", "ready")
            watched = await drawn_numbers(ws, 8)
            polled = await polling
        assert watched == list(range(1, 9))  # every frame, in order, drawn by the pipeline
        assert len(polled) == 4
        polled_drawn = [decode_number(webp) or 0 for _, webp in polled]
        assert polled_drawn == sorted(set(polled_drawn))  # increasing
        # Each at least the frame the status named (a newer one may be released in between).
        assert all(n >= current for (current, _), n in zip(polled, polled_drawn, strict=True))
        assert len(worker_pids(server)) == 1

        # Everyone gone: after the grace period the worker saves its state and exits.
        def stopped() -> bool:
            return not worker_pids(server) and state_path.exists()

        await async_wait_until(stopped, STOP_TIMEOUT_S, "the worker to stop after the grace")
        assert (await health(http, base))["gpu_connected"] is False
        saved = msgspec.msgpack.decode(state_path.read_bytes(), type=DreamState)
        assert saved.generator == "pipeline:testcard"
        assert saved.frame_number > watched[-1]

        # The next viewer: the cached last frame at once, then a new worker drawing on from the
        # saved state.
        async with http.ws_connect(f"{base}/ws/dreams") as ws:
            # The hub may still be finishing the stop (the worker has exited; the launcher is
            # winding down): then "stopping" comes first, the cached frame may come before
            # "starting", and "starting" follows (never "idle": someone is waiting).
            early: list[int] = []
            status: dict[str, object] = {}
            while status.get("type") != "status" or status.get("status") == "stopping":
                message = await ws.receive(timeout=10)
                if message.type == aiohttp.WSMsgType.BINARY:
                    early += [n for n in [decode_number(message.data[1:])] if n is not None]
                else:
                    status = json.loads(message.data)
            assert status == {
                "type": "status",
                "status": "starting",
                "message": "Waking the dream machine...",
                "viewer_count": 1,
            }
            resumed = early + await drawn_numbers(ws, 5 - len(early))
            workers = worker_pids(server)
            assert len(workers) == 1
            # A worker that dies under a viewer: the supervisor tells the hub, which starts
            # another; the viewer keeps getting frames (the new worker's drawn from its last
            # checkpoint on, so after what was queued they run on, one by one).
            os.kill(workers[0], signal.SIGKILL)

            def replaced() -> bool:
                return bool(worker_pids(server)) and worker_pids(server) != workers

            await async_wait_until(replaced, STOP_TIMEOUT_S, "a new worker after the crash")
            after = await drawn_numbers(ws, 5)
            assert after[-1] == after[-2] + 1 == after[-3] + 2, after
            workers += worker_pids(server)
        # One unbroken run of frames: the cached last one at once (the snapshot names the frame
        # after it; a frame in flight at the shutdown may make it that one; a viewer who came
        # during the stop may also get the frames still queued for playback), then the new
        # worker's, from the saved frame on: no gap, no repeat, no rewind.
        assert resumed == list(range(resumed[0], resumed[0] + len(resumed))), (resumed, saved)
        assert resumed[0] <= saved.frame_number < resumed[-1], (resumed, saved)
        queued_at_most = Playback(target_fps=10.0, buffer_seconds=0.2).max_depth
        assert saved.frame_number - resumed[0] <= 1 + queued_at_most, (resumed, saved)

    assert await asyncio.to_thread(server.stop) == 0
    assert not any(pid_alive(pid) for pid in workers)
