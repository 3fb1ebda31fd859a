"""The causal Wan pipelines through the whole system: ``supervisor start``, the inference
process, rings, encode and WebRTC, with tiny random-weight checkpoints in the original format."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import msgspec
import pytest
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun

from signalling.metrics_schema import MetricsReport

pytestmark = pytest.mark.timeout(240)

Start = Callable[..., SupervisorRun]
SIZE = 32


@pytest.fixture
async def client(start_supervisor: Start, tiny_wan: Path) -> AsyncIterator[DreamwireClient]:
    server = start_supervisor(f'models_dir = "{tiny_wan}"\n[api.ice]\nstun_urls = []\n')
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as c:
        yield c


@pytest.mark.parametrize("pipeline_id", ["longlive", "krea-realtime-video"])
async def test_text_to_video(client: DreamwireClient, pipeline_id: str) -> None:
    await client.load_pipeline(pipeline_id, {"height": SIZE, "width": SIZE})
    await client.connect(None, initial_parameters={"prompts": [{"text": "a red fox"}]})
    # Blocks of 12 video frames (9 for a session's first): two blocks' worth arrives.
    await client.wait_frames(12, timeout_s=120)
    assert (client.received.width, client.received.height) == (SIZE, SIZE)


async def test_streamdiffusionv2_video_in(client: DreamwireClient) -> None:
    await client.load_pipeline("streamdiffusionv2", {"height": SIZE, "width": SIZE})
    client.pattern = PatternTrack(SIZE, SIZE, 15)
    await client.connect(client.pattern)
    await client.wait_frames(6, timeout_s=120)
    assert (client.received.width, client.received.height) == (SIZE, SIZE)


@pytest.mark.parametrize(
    ("pipeline_id", "camera"), [("longlive", False), ("streamdiffusionv2", True)]
)
async def test_a_split_block_loop_streams_through_the_system(
    client: DreamwireClient, pipeline_id: str, camera: bool
) -> None:
    """``split``: the inference process starts its VAE stage processes and streams through them
    (text mode, and video in with the camera)."""
    await client.load_pipeline(pipeline_id, {"height": SIZE, "width": SIZE, "split": True})
    if camera:
        client.pattern = PatternTrack(SIZE, SIZE, 15)
        await client.connect(client.pattern)
    else:
        await client.connect(None, initial_parameters={"prompts": [{"text": "a red fox"}]})
    await client.wait_frames(12, timeout_s=120)
    assert (client.received.width, client.received.height) == (SIZE, SIZE)

    # Each stage's ms a block, in the metrics (JSON and Prometheus) of the pipeline's process.
    async def stages() -> dict[str, float]:
        assert client.http is not None
        async with client.http.get(f"{client.base_url}/api/v1/metrics") as resp:
            report = msgspec.json.decode(await resp.read(), type=MetricsReport)
        (process,) = [p for p in report.processes if p.name == f"inference/{pipeline_id}"]
        return process.stage_ms

    wanted = {"encode", "transformer", "decode"} if camera else {"transformer", "decode"}
    deadline = time.monotonic() + 30
    while set(figures := await stages()) != wanted:
        assert time.monotonic() < deadline, figures
        await asyncio.sleep(0.2)  # the supervisor's status refreshes on heartbeats
    assert all(ms > 0 for ms in figures.values())
    assert client.http is not None
    async with client.http.get(f"{client.base_url}/metrics") as resp:
        text = await resp.text()
    gauge = f'dreamwire_block_stage_seconds{{process="inference/{pipeline_id}",stage="decode"}}'
    assert gauge in text
    # A prompt switch, a pause and a resume: the stream goes on through the stages.
    await client.send_parameters({"prompts": [{"text": "a dog on the moon"}]})
    await client.send_parameters({"paused": True})
    await client.send_parameters({"paused": False})
    await client.wait_frames(12, timeout_s=120)
    assert not [m for m in client.messages if m.get("type") in ("error", "stream_stopped")]
