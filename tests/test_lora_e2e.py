"""A LoRA through the whole system (``supervisor start``, the Python client, WebRTC), as Scope's
UI uses it: listed, loaded with ``load_params.loras``, reported in the pipeline status, its
scale moved with ``lora_scales`` on the data channel while the stream goes on.

streamdiffusion with the tiny random-weight SD-Turbo and a kohya-style LoRA made for it (the
real ``from_pretrained`` path, the real LoRA loading)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun

pytestmark = pytest.mark.timeout(240)
pytest.importorskip("peft")

ICE = "\n[api.ice]\nstun_urls = []\n"
STYLE = "style.safetensors"
SIZE = {"height": 64, "width": 64}


@pytest.fixture
def models(tiny_models: Path, tmp_path: Path) -> Path:
    """The tiny models (linked) and a LoRA for them, in a models directory of this test's."""
    import make_tiny_models

    models = tmp_path / "models"
    models.mkdir()
    for entry in tiny_models.iterdir():
        if entry.name != "loras":
            (models / entry.name).symlink_to(entry)
    make_tiny_models.make_sd_lora(models, STYLE)
    return models


@pytest.fixture
async def client(
    start_supervisor: Callable[..., SupervisorRun], models: Path
) -> AsyncIterator[DreamwireClient]:
    server = start_supervisor(f'models_dir = "{models}"\n' + ICE)
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as client:
        yield client


async def frames(client: DreamwireClient, count: int) -> np.ndarray:
    """The mean of the next ``count`` frames (float), each taken as it arrives."""
    rec, total = client.received, []
    for _ in range(count):
        await client.wait_frames(1, timeout_s=60)
        assert rec.last_rgb is not None
        total.append(rec.last_rgb.astype(np.float64))
    return np.mean(total, axis=0)


async def adapters_when(client: DreamwireClient, scale: float) -> list[dict[str, Any]]:
    """The status's adapters once they report ``scale`` (heartbeats carry them)."""
    for _ in range(200):
        _, status = await client.request("GET", "/api/v1/pipeline/status")
        adapters = status["loaded_lora_adapters"] or []
        if adapters and adapters[0]["scale"] == scale:
            return list(adapters)
        await asyncio.sleep(0.05)  # polling the status, as Scope's UI does
    raise AssertionError(f"no adapter at scale {scale}: {status}")


async def test_a_lora_loads_and_its_scale_moves_while_streaming(
    client: DreamwireClient, models: Path
) -> None:
    _, listed = await client.request("GET", "/api/v1/loras")
    assert [(f["name"], f["path"]) for f in listed["lora_files"]] == [
        ("style", str(models / "loras" / STYLE))
    ]
    # A file outside the LoRA folder is refused before anything is loaded.
    outside = {"path": str(models.parent / "x.safetensors"), "scale": 1.0}
    code, body = await client.request(
        "POST",
        "/api/v1/pipeline/load",
        {"pipeline_id": "streamdiffusion", "load_params": {**SIZE, "loras": [outside]}},
    )
    assert code == 400 and "load_params.loras[0].path" in body["detail"], body
    _, status = await client.request("GET", "/api/v1/pipeline/status")
    assert status["status"] == "not_loaded", status

    lora = {"path": STYLE, "scale": 1.0, "merge_mode": "runtime_peft"}
    await client.load_pipeline("streamdiffusion", {**SIZE, "loras": [lora]})
    assert await adapters_when(client, 1.0) == [{**lora, "adapter_name": "style"}]
    client.pattern = PatternTrack(64, 64, 10)
    await client.connect(client.pattern, initial_parameters={"denoising_step_list": [700]})
    await client.wait_frames(3, timeout_s=90)
    with_lora = await frames(client, 10)

    await client.send_parameters({"lora_scales": [{"path": STYLE, "scale": 0.0}]})
    await adapters_when(client, 0.0)
    await client.wait_frames(3, timeout_s=60)  # frames already on their way
    at_zero = await frames(client, 10)

    # A path that is not loaded: an error naming it, the stream goes on.
    await client.send_parameters({"lora_scales": [{"path": "nope.safetensors", "scale": 1.0}]})
    error = await client.wait_message("error", timeout_s=30)
    assert "nope.safetensors is not loaded" in error["data"], error
    await client.wait_frames(3, timeout_s=60)
    await client.disconnect()
    # Scope's UI carries a node's last scales into the next offer: they apply from the start.
    initial = {"denoising_step_list": [700], "lora_scales": [{"path": STYLE, "scale": 0.5}]}
    await client.connect(PatternTrack(64, 64, 10), initial_parameters=initial)
    await adapters_when(client, 0.5)
    await client.disconnect()

    # Scale 0 is the model without the LoRA: loaded without it, the same frames.
    await client.load_pipeline("streamdiffusion", dict(SIZE))
    _, status = await client.request("GET", "/api/v1/pipeline/status")
    assert status["loaded_lora_adapters"] is None, status
    client.pattern = PatternTrack(64, 64, 10)
    await client.connect(client.pattern, initial_parameters={"denoising_step_list": [700]})
    await client.wait_frames(3, timeout_s=90)
    without = await frames(client, 10)
    again = await frames(client, 10)  # how far two runs of the same frames differ (coding)
    noise = float(np.abs(without - again).mean())
    moved = float(np.abs(with_lora - at_zero).mean())
    residual = float(np.abs(at_zero - without).mean())
    assert residual <= 2 * noise + 1 and moved >= 3 * residual, (moved, residual, noise)
