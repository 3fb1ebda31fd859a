"""Moondream 2's own model code, loaded by dreamwire's loader, as a user's models directory has it.

The code is the real one (``../shared/artifacts/moondream2-torch``: the modules the Hugging Face
release ships), laid out by ``scripts/make_tiny_moondream.py`` the way ``download_models`` lays
it out, with tiny random weights and a tiny tokenizer. No stand-in: every call below goes
through Moondream's code on the installed transformers.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shared_dir import shared_dir

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import requests  # noqa: E402
from client import DreamwireClient, PatternTrack  # noqa: E402
from conftest import SupervisorRun, wait_until  # noqa: E402

from services.overlay import moondream as md  # noqa: E402
from services.overlay.config import MoondreamFeature as F  # noqa: E402
from services.overlay.model import FeatureRequest, load_moondream, run_feature  # noqa: E402

CODE = shared_dir() / "artifacts" / "moondream2-torch"
SIZES = [(64, 48), (640, 480), (1280, 720)]  # one crop, a few crops, the most crops

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(not CODE.is_dir(), reason=f"no Moondream model code at {CODE}"),
]


@pytest.fixture(scope="module")
def tiny_moondream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import make_tiny_moondream

    models = tmp_path_factory.mktemp("moondream-models")
    make_tiny_moondream.make_moondream(models, CODE)
    return models


@pytest.fixture(scope="module")
def model(tiny_moondream: Path, one_thread: None) -> Any:
    return load_moondream(tiny_moondream)


def frame(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def request(feature: F, max_tokens: int = 12, max_objects: int = 5) -> FeatureRequest:
    return FeatureRequest(
        feature, "normal", "What is this?", "person", 0.5, max_objects, max_tokens
    )


def test_loads_with_its_buffers_computed(model: Any) -> None:
    inner = model.model
    # Built by the constructor (not loaded): wrong when a loader builds the model on "meta".
    mask = inner.attn_mask
    prefix = 1 + (inner.config.vision.crop_size // inner.config.vision.enc_patch_size) ** 2
    assert bool(mask[..., :prefix, :prefix].all()), "the image prefix attends to itself"
    assert bool(torch.tril(torch.ones_like(mask[0, 0])).eq(mask[0, 0]).flatten()[prefix**2 :].any())
    assert not bool(mask[0, 0, prefix, prefix + 1]), "text is causal"
    assert bool(torch.isfinite(inner.text.freqs_cis).all())
    for name, value in model.state_dict().items():
        assert bool(torch.isfinite(value.float()).all()), name
    first = next(model.parameters())
    assert first.dtype == torch.bfloat16  # what Moondream's code runs, on the CPU too
    assert first.device.type == "cpu"


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_each_feature_returns_moondreams_shapes(model: Any, size: tuple[int, int]) -> None:
    rgb = frame(*size)
    caption = run_feature(model, request(F.CAPTION), rgb)
    assert set(caption) == {"caption", "length"} and isinstance(caption["caption"], str)
    answer = run_feature(model, request(F.QUERY), rgb)
    assert answer["question"] == "What is this?" and isinstance(answer["answer"], str)
    detected = run_feature(model, request(F.DETECT, max_objects=3), rgb)
    assert 1 <= len(detected["objects"]) <= 3  # random weights rarely stop early
    for box in detected["objects"]:
        assert box["x_min"] < box["x_max"] and box["y_min"] < box["y_max"]
        assert all(np.isfinite(v) for v in box.values())
    pointed = run_feature(model, request(F.POINT, max_objects=4), rgb)
    assert 1 <= len(pointed["points"]) <= 4
    for point in pointed["points"]:
        assert 0.0 <= point["x"] <= 1.0 and 0.0 <= point["y"] <= 1.0


def test_the_token_budget_bounds_caption_and_query(model: Any) -> None:
    inner = model.model
    decode = inner._decode_one_tok
    steps = 0

    def counted(*args: Any) -> Any:
        nonlocal steps
        steps += 1
        return decode(*args)

    inner._decode_one_tok = counted  # the one per-token step of Moondream's decoder
    try:
        for feature in (F.CAPTION, F.QUERY):
            steps = 0
            run_feature(model, request(feature, max_tokens=4), frame(64, 48))
            assert 1 <= steps <= 4, (feature, steps)
    finally:
        del inner._decode_one_tok
    assert inner._decode_one_tok == decode


def test_results_follow_the_frame_and_are_deterministic_for_detect(model: Any) -> None:
    a, b = frame(640, 480, seed=1), frame(640, 480, seed=2)
    first = run_feature(model, request(F.DETECT), a)
    assert run_feature(model, request(F.DETECT), a) == first  # argmax decoding
    run_feature(model, request(F.DETECT), b)  # another image in between changes nothing after
    assert run_feature(model, request(F.DETECT), a) == first


def test_code_of_another_interface_is_a_clear_error(tiny_moondream: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_moondream, models)
    repo = models / md.MOONDREAM_REPO
    entry = repo / "hf_moondream.py"
    entry.write_text(entry.read_text().replace("class HfMoondream(", "class HfMoondreamV3("))
    with pytest.raises(md.ModelCodeMismatch, match=r"moondream2@9a7d40.*hf_moondream\.py has no"):
        load_moondream(models)
    entry.unlink()
    with pytest.raises(md.ModelCodeMismatch, match=r"has no hf_moondream\.py"):
        load_moondream(models)


def test_weights_that_do_not_fit_are_named(tiny_moondream: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    models = tmp_path / "models"
    shutil.copytree(tiny_moondream, models)
    weights = models / md.MOONDREAM_REPO / md.WEIGHTS_FILE
    state = load_file(str(weights))
    state.pop("model.text.lm_head.bias")
    save_file(state, str(weights))
    with pytest.raises(md.ModelCodeMismatch, match=r"model\.safetensors does not fit.*lm_head"):
        load_moondream(models)


# ---------------------------------------------------------------- through the whole system

ICE = "[api.ice]\nstun_urls = []\n"
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


async def test_the_overlay_runs_the_real_model_on_live_video(
    connect: Callable[[str], DreamwireClient], tiny_moondream: Path
) -> None:
    size = 512
    async with connect(f'models_dir = "{tiny_moondream}"\n') as client:
        await client.load_pipelines([{"pipeline_id": "passthrough"}, {"pipeline_id": "moondream"}])
        client.pattern = PatternTrack(size, size, 15)
        await client.connect(
            client.pattern,
            initial_parameters={
                "feature": "detect",
                "detect_object": "face",
                "max_objects": 2,
                # One inference every 2 s: the frames after a result are drawn with that result.
                "inference_interval": 30,
            },
        )
        output = await client.wait_message("fetch_output", timeout_s=60)
        assert output["data"]["feature"] == "detect"
        objects = output["data"]["result"]["objects"]
        assert 1 <= len(objects) <= 2
        # The boxes are drawn: where a box lies, the frame is no longer the sent pattern.
        await client.wait_frames(5, timeout_s=30)
        rgb = client.received.last_rgb
        assert rgb is not None
        sent = client.pattern.background.astype(np.int16)
        changed = np.abs(rgb.astype(np.int16) - sent).max(axis=-1)
        band = size // 4  # the frame number is drawn at the top
        inside = np.zeros_like(changed, dtype=bool)
        for box in objects:
            x0, x1 = (int(np.clip(box[k] * size, 0, size - 1)) for k in ("x_min", "x_max"))
            y0, y1 = (int(np.clip(box[k] * size, 0, size - 1)) for k in ("y_min", "y_max"))
            inside[max(y0, band) : y1 + 1, x0 : x1 + 1] = True
        assert inside.any(), objects
        assert float(changed[inside].mean()) > 40, "a green box over the pattern"
        # Far from every box and label (boxes grow 2 px, labels sit above them) the video is as
        # sent, up to the codec.
        far = np.ones_like(inside)
        for box in objects:
            x0, x1 = int(box["x_min"] * size) - 40, int(box["x_max"] * size) + 40
            y0, y1 = int(box["y_min"] * size) - 40, int(box["y_max"] * size) + 20
            far[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = False
        far[:band] = False
        assert float(np.median(changed[far])) < 12
        # The caption feature, switched live, reaches the real model and comes back as text.
        await client.send_parameters({"feature": "caption", "max_tokens": 6})
        while True:
            output = await client.wait_message("fetch_output", timeout_s=60)
            if output["data"]["feature"] == "caption":
                break
        assert isinstance(output["data"]["result"]["caption"], str)


def test_a_model_that_cannot_load_is_an_error_not_a_crash_loop(
    start_supervisor: Start, tiny_moondream: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_moondream, models)
    entry = models / md.MOONDREAM_REPO / "hf_moondream.py"
    entry.write_text(entry.read_text().replace("class HfMoondream(", "class Renamed("))
    server = start_supervisor(f'models_dir = "{models}"\n' + ICE)
    base = f"http://127.0.0.1:{server.port}"
    load = requests.post(
        f"{base}/api/v1/pipeline/load", json={"pipeline_id": "moondream"}, timeout=10
    )
    assert load.status_code == 200

    def failed() -> dict[str, Any] | None:
        state = requests.get(f"{base}/api/v1/pipeline/status", timeout=10).json()
        assert state["status"] in ("loading", "error"), state
        return state if state["status"] == "error" else None

    state = wait_until(failed, 60, "the load to fail")
    assert "hf_moondream.py has no HfMoondream" in state["error"]
    assert "moondream2@9a7d4024050840e001defacec2b00727e89149e6" in state["error"]
    overlay = server.service("overlay")
    assert (overlay.state, overlay.restarts) == ("failed", 0)
