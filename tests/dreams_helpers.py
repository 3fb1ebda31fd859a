"""Shared pieces of the Dreams tests: a hub on a real loopback server, frame decoding."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import av
import msgspec
import numpy as np
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dreams.worker import encode_webp
from services.testpattern import draw_frame_number, read_frame_number
from signalling.dreams import (
    DreamsConfig,
    DreamsHub,
    Launcher,
    LauncherConfig,
    add_dreams_routes,
    close_dreams,
)

WIDTH, HEIGHT = 256, 128
FPS = 10.0


def dreams_config(**overrides: Any) -> DreamsConfig:
    """Small, fast frames; no token (loopback workers); a worker launched locally."""
    launcher = overrides.pop("launcher", None) or LauncherConfig(
        worker_args=["--keyframe-interval", "5"]
    )
    base: dict[str, Any] = {
        "target_fps": FPS,
        "width": WIDTH,
        "height": HEIGHT,
        "buffer_seconds": 0.2,
        "grace_period_s": 60.0,
        "auth_token": "",
        "retry_initial_s": 0.2,
        "status_interval_s": 0.5,
    }
    base.update(overrides)
    return msgspec.structs.replace(DreamsConfig(launcher=launcher), **base)


@contextlib.asynccontextmanager
async def serve_dreams(
    config: DreamsConfig, launcher: Launcher | None = None
) -> AsyncIterator[tuple[TestClient[web.Request, web.Application], DreamsHub]]:
    app = web.Application()
    hub = add_dreams_routes(app, config, launcher=launcher)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client, hub
    finally:
        await close_dreams(app)  # as signalling does before its runner's cleanup
        await client.close()


def poll_frames(base_url: str, want: int, deadline_s: float) -> list[tuple[int, bytes]]:
    """The page's "Simple Polling Client", unchanged but for saving to a list and stopping."""
    saved: list[tuple[int, bytes]] = []
    last_frame = 0
    deadline = time.monotonic() + deadline_s
    while len(saved) < want and time.monotonic() < deadline:
        status = requests.get(f"{base_url}/api/dreams/status").json()
        if status["status"] != "ready":
            time.sleep(0.2)  # the page waits 5 s; the test is shorter
            continue
        current = status["generation"]["current_frame"]
        if current > last_frame:
            response = requests.get(f"{base_url}/api/dreams/current")
            if response.status_code == 200:
                saved.append((current, response.content))
                last_frame = current
        time.sleep(0.2)  # 5 Hz polling
    return saved


def decode_number(webp: bytes) -> int | None:
    codec = av.CodecContext.create("webp", "r")
    frames = codec.decode(av.Packet(webp))
    return read_frame_number(frames[0].to_ndarray(format="rgb24"))


def numbered_webp(number: int) -> bytes:
    rgb = np.full((HEIGHT, WIDTH, 3), 90, np.uint8)
    draw_frame_number(rgb, number)
    return encode_webp(rgb)


class RecordingLauncher(Launcher):
    """Starts nothing; counts what the hub asked for."""

    provider = "test"

    def __init__(self) -> None:
        super().__init__()
        self.starts = 0
        self.stops = 0
        self.started = asyncio.Event()

    async def start(self, connect_url: str) -> None:
        self.starts += 1
        self.started.set()

    async def stop(self) -> None:
        self.stops += 1

    def running(self) -> bool:
        return self.starts > self.stops
