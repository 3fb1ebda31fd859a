"""Model pipelines through the whole system: ``supervisor start``, the Python client, WebRTC.

Text to video (testcard), streamdiffusion with tiny random-weight models loaded through the
real ``from_pretrained`` path, and the Moondream overlay (a stand-in with Moondream's four
methods: the real weights cannot be downloaded here) after passthrough.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun

pytestmark = pytest.mark.timeout(180)

ICE = """
[api.ice]
stun_urls = []
"""
Start = Callable[..., SupervisorRun]


@pytest.fixture
async def connect(start_supervisor: Start) -> AsyncIterator[Callable[[str], DreamwireClient]]:
    clients: list[DreamwireClient] = []

    def make(config: str) -> DreamwireClient:
        server = start_supervisor(config + ICE)
        client = DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[])
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def mean_colour(rgb: np.ndarray) -> np.ndarray:
    # Below the frame-number band (the top third) the test card is its background colour.
    return np.asarray(rgb[rgb.shape[0] // 2 :].reshape(-1, 3).mean(axis=0))


async def test_text_to_video_receive_only(connect: Callable[[str], DreamwireClient]) -> None:
    async with connect("") as client:
        await client.load_pipeline("testcard")
        await client.connect(None, initial_parameters={"prompts": [{"text": "a red sky"}]})
        await client.wait_frames(20, timeout_s=30)
        rec = client.received
        assert (rec.width, rec.height) == (128, 96)
        # Generated frames carry increasing frame numbers.
        assert len(rec.numbers) >= 15 and rec.numbers == sorted(rec.numbers)
        assert rec.last_rgb is not None
        before = mean_colour(rec.last_rgb)
        # A prompt change over the data channel shows from the next frames on.
        await client.send_parameters({"prompts": [{"text": "deep green forest", "weight": 1.0}]})
        await client.wait_frames(15)
        after = mean_colour(rec.last_rgb)
        assert float(np.abs(after - before).max()) > 10, (before, after)


async def test_streamdiffusion_with_tiny_models(
    connect: Callable[[str], DreamwireClient], tiny_models: Path
) -> None:
    async with connect(f'models_dir = "{tiny_models}"\n') as client:
        await client.load_pipeline("streamdiffusion", {"height": 64, "width": 64})
        client.pattern = PatternTrack(64, 64, 10)
        await client.connect(client.pattern, initial_parameters={"denoising_step_list": [700]})
        await client.wait_frames(5, timeout_s=60)
        rec = client.received
        assert (rec.width, rec.height) == (64, 64)
        assert rec.last_rgb is not None
        first = rec.last_rgb.astype(np.int16)
        await client.send_parameters(
            {"prompts": [{"text": "a bright orange cat", "weight": 1.0}], "seed": 7}
        )
        await client.wait_frames(5, timeout_s=60)
        assert float(np.abs(rec.last_rgb.astype(np.int16) - first).mean()) > 0.5
        # A bad value for this pipeline is refused with the field named, the stream goes on.
        await client.send_parameters({"denoising_step_list": [100, 900]})
        error = await client.wait_message("error")
        assert error["data"].startswith("denoising_step_list:")
        await client.wait_frames(3, timeout_s=60)


async def test_moondream_overlay_after_passthrough(
    connect: Callable[[str], DreamwireClient],
) -> None:
    config = 'overlay_model = "overlay_stand_in:StandInMoondream"\n'
    async with connect(config) as client:
        await client.load_pipelines([{"pipeline_id": "passthrough"}, {"pipeline_id": "moondream"}])
        client.pattern = PatternTrack(512, 512, 15)
        await client.connect(
            client.pattern, initial_parameters={"feature": "detect", "detect_object": "face"}
        )
        await client.wait_frames(10, timeout_s=30)
        # Results arrive as data on the data channel ...
        output = await client.wait_message("fetch_output", timeout_s=30)
        assert output["data"]["feature"] == "detect"
        assert len(output["data"]["result"]["objects"]) == 2
        # ... and as server-sent events.
        assert client.session_id is not None
        async with aiohttp.ClientSession() as http:
            url = f"{client.base_url}/api/v1/sessions/{client.session_id}/outputs"
            async with http.get(url) as resp:
                assert resp.status == 200
                event = None
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("event: "):
                        event = line[len("event: ") :]
                    elif line.startswith("data: ") and event == "fetch_output":
                        data = json.loads(line[len("data: ") :])
                        assert data["feature"] == "detect"
                        break
            async with http.get(f"{client.base_url}/api/v1/sessions/nope/outputs") as resp:
                assert resp.status == 404
        # The boxes are drawn: the stand-in's first box spans the middle half of the frame,
        # its edges green.
        rgb = client.received.last_rgb
        assert rgb is not None
        edge = rgb[200:300, 126:131].reshape(-1, 3).astype(int).mean(axis=0)
        assert edge[1] > edge[0] + 40 and edge[1] > edge[2] + 40, edge


async def test_out_of_memory_stops_sessions_and_a_smaller_load_works(
    connect: Callable[[str], DreamwireClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A plugin from tests/ (on every process's path): the test card, out of CUDA memory when a
    # call is larger than 128x96.
    monkeypatch.setenv("DREAMWIRE_PIPELINES", "oomcard=oom_pipeline:OOMCARD")
    async with connect("") as client:
        await client.load_pipeline("oomcard", {"height": 192, "width": 256})
        await client.connect(None)
        stopped = await client.wait_message("stream_stopped", timeout_s=30)
        assert "out of memory in oomcard: CUDA out of memory" in stopped["error_message"]
        _, state = await client.request("GET", "/api/v1/pipeline/status")
        assert state["status"] == "error"
        assert "CUDA out of memory" in state["error"]
        # /health tells the operator too.
        status, health = await client.request("GET", "/health")
        assert status == 503 and health["status"] == "unhealthy"
        assert "CUDA out of memory" in health["detail"]["pipeline_errors"]["oomcard"]
        await client.disconnect()
        # Loading it again at a size that fits works.
        await client.load_pipeline("oomcard", {"height": 96, "width": 128})
        await client.connect(None)
        await client.wait_frames(10, timeout_s=30)
        assert (client.received.width, client.received.height) == (128, 96)


async def test_session_settings_sent_with_a_load_apply_without_reloading(
    connect: Callable[[str], DreamwireClient],
) -> None:
    """Scope 0.2 sends a node's settings with every load: they become the settings of the next
    session, and the model is not loaded again for them."""
    config = 'overlay_model = "overlay_stand_in:StandInMoondream"\n'
    async with connect(config) as client:
        both = [{"pipeline_id": "passthrough"}]
        await client.load_pipelines([*both, {"pipeline_id": "moondream", "load_params": {}}])
        overlay_pid = await overlay_process(client)
        await client.load_pipelines(
            [*both, {"pipeline_id": "moondream", "load_params": {"feature": "point"}}]
        )
        assert await overlay_process(client) == overlay_pid  # the same process: no reload
        client.pattern = PatternTrack(256, 256, 15)
        await client.connect(client.pattern)  # no initialParameters: the load's settings
        output = await client.wait_message("fetch_output", timeout_s=30)
        assert output["data"]["feature"] == "point"


async def overlay_process(client: DreamwireClient) -> int:
    _, metrics = await client.request("GET", "/api/v1/metrics")
    (pid,) = [p["pid"] for p in metrics["processes"] if p["name"] == "overlay"]
    return int(pid)
