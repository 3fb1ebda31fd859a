"""``supervisor worker --generator pipeline:<id>``: dreamwire's own inference as a Dreams worker.

testcard (no models) through a real worker process and hub; dream on tiny random-weight models
written by ``scripts/make_tiny_models.py`` and loaded through the real loader.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import numpy as np
import pytest
from dreams_helpers import decode_number, dreams_config, serve_dreams

from dreams.generators import Rendered, WorkerOptions, register_generator
from dreams.wire import DreamState
from dreams.worker import WorkerCore, make_generator, run_worker
from signalling.dreams import ExternalWorker, LauncherConfig, LocalWorkerLauncher

pytestmark = pytest.mark.timeout(120)

DREAM_SIZE = 64
DREAM_KEYFRAMES = 4


async def frames_of(ws: aiohttp.ClientWebSocketResponse, count: int) -> list[bytes]:
    """The WebP of the next ``count`` frames a viewer receives (status messages skipped)."""
    frames: list[bytes] = []
    while len(frames) < count:
        message = await ws.receive(timeout=60)
        assert message.type in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT), message
        if message.type == aiohttp.WSMsgType.BINARY:
            frames.append(message.data[1:])
    return frames


async def test_testcard_pipeline_worker_streams_numbered_frames_and_resumes() -> None:
    launcher = LauncherConfig(generator="pipeline:testcard", worker_args=["--prompt", "a red fox"])
    async with serve_dreams(dreams_config(grace_period_s=0.5, launcher=launcher)) as (client, hub):
        assert isinstance(hub.launcher, LocalWorkerLauncher)
        async with client.ws_connect("/ws/dreams") as ws:
            first = [decode_number(f) for f in await frames_of(ws, 6)]
            async with client.get("/api/dreams/current") as resp:
                assert resp.status == 200
                drawn = decode_number(await resp.read())
                assert drawn == int(resp.headers["X-Frame-Number"])  # the pipeline drew it
        assert first == list(range(1, 7))

        await hub.wait_state("stopping", timeout_s=10)
        await hub.wait_state("idle", timeout_s=15)
        assert hub.snapshot is not None
        saved = msgspec.msgpack.decode(hub.snapshot, type=DreamState)
        assert (saved.generator, saved.prompt) == ("pipeline:testcard", "a red fox")

        async with client.ws_connect("/ws/dreams") as ws:
            numbers = [decode_number(f) for f in await frames_of(ws, 4)]
        # The cached frame, then a new worker process drawing on from the saved state.
        assert numbers[1:] == list(range(saved.frame_number, saved.frame_number + 3))
        assert hub.launcher.starts == 2


class BrokenGenerator:
    width, height = 64, 64

    def render(self, state: DreamState) -> Rendered:
        raise RuntimeError("the model fell over")

    def close(self) -> None:
        pass


async def test_a_failing_generator_is_reported_and_ends_the_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    register_generator("broken", lambda options: BrokenGenerator())
    async with serve_dreams(dreams_config(), launcher=ExternalWorker()) as (client, hub):
        url = str(client.make_url("/ws/gpu")).replace("http", "ws", 1)
        options = WorkerOptions(connect=url, generator="broken", width=64, height=64)
        async with client.ws_connect("/ws/dreams"):
            code = await asyncio.wait_for(run_worker(options), 20)
            assert code == 1  # not retried: it would fail again
            await hub.wait_state("error", timeout_s=10)
    assert "worker reports an error: generator failed: RuntimeError('the model fell over')" in (
        caplog.text
    )


# --- dream on tiny models ---------------------------------------------------------------------


def dream_core(models: Path, **options: Any) -> WorkerCore:
    worker_options = WorkerOptions(
        connect="ws://unused",
        generator="pipeline:dream",
        width=DREAM_SIZE,
        height=DREAM_SIZE,
        models_dir=str(models),
        load_params={"keyframe_interval": DREAM_KEYFRAMES, "noise_walk_speed": 0.5},
        **options,
    )
    return WorkerCore(worker_options, make_generator(worker_options))


def rgb(webp: bytes) -> np.ndarray:
    import av

    codec = av.CodecContext.create("webp", "r")
    return codec.decode(av.Packet(webp))[0].to_ndarray(format="rgb24")


def diff(a: bytes, b: bytes) -> float:
    return float(np.abs(rgb(a).astype(np.int16) - rgb(b).astype(np.int16)).mean())


@pytest.mark.usefixtures("one_thread")
def test_dream_pipeline_follows_the_state_and_reports_its_keyframes(tiny_models: Path) -> None:
    core = dream_core(tiny_models, prompt="a cat", seed=7)
    frames = [core.next_frame() for _ in range(9)]
    assert [f[1] for f in frames] == list(range(1, 10))
    # Keyframes as the pipeline counts them (the keyframe each frame heads to), its timings.
    assert [f[2] for f in frames] == [1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert all(f[3] > 0 for f in frames)
    assert [f[4] for f in frames].count(True) == 3  # a checkpoint at each new keyframe

    same = dream_core(tiny_models, prompt="a cat", seed=7)
    assert same.next_frame()[0] == frames[0][0]  # the state's prompt and seed reproduce it
    other_prompt = dream_core(tiny_models, prompt="a dog on the moon", seed=7).next_frame()[0]
    other_seed = dream_core(tiny_models, prompt="a cat", seed=8).next_frame()[0]
    assert diff(other_prompt, frames[0][0]) > 0.5 and diff(other_seed, frames[0][0]) > 0.5

    # A relaunched worker restores the snapshot (0x14): the frame count and the noise walk go
    # on from the saved keyframe with the saved prompt and seed (not from frame 1).
    resumed = dream_core(tiny_models)
    resumed.load(core.snapshot())
    assert (resumed.state.prompt, resumed.state.seed) == ("a cat", 7)
    webp, number, keyframe, _, _ = resumed.next_frame()
    assert (number, keyframe) == (10, 4)
    assert diff(webp, frames[0][0]) > 0.5

    # A state restored with another prompt at the same frame (0x14) changes the running
    # session's prompt (``Pipeline.update``): it shows on the next frame.
    live, ref = dream_core(tiny_models), dream_core(tiny_models)
    ref.load(live.snapshot())
    for _ in range(3):
        assert live.next_frame()[0] == ref.next_frame()[0]
    live.load(msgspec.msgpack.encode(msgspec.structs.replace(live.state, prompt="a dog")))
    assert diff(live.next_frame()[0], ref.next_frame()[0]) > 0.5


async def test_dream_pipeline_worker_process_feeds_the_hub(tiny_models: Path) -> None:
    load = json.dumps({"keyframe_interval": DREAM_KEYFRAMES})
    launcher = LauncherConfig(
        generator="pipeline:dream",
        worker_args=["--models-dir", str(tiny_models), "--load-params", load, "--seed", "3"],
    )
    config = dreams_config(width=DREAM_SIZE, height=DREAM_SIZE, launcher=launcher)
    async with serve_dreams(config) as (client, _):
        async with client.ws_connect("/ws/dreams") as ws:
            frames = await frames_of(ws, 6)
            async with client.get("/api/dreams/current") as resp:
                assert resp.status == 200
                headers = resp.headers
                assert rgb(await resp.read()).shape == (DREAM_SIZE, DREAM_SIZE, 3)
        assert max(diff(a, b) for a, b in itertools.pairwise(frames)) > 0  # it moves
        number = int(headers["X-Frame-Number"])
        keyframe = int(headers["X-Keyframe-Number"])
        assert keyframe == (number - 1) // DREAM_KEYFRAMES + 1  # the pipeline's own count
        assert float(headers["X-Generation-Time-Ms"]) > 0
