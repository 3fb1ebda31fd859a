"""streamdiffusion against the original StreamDiffusion's own outputs (``../shared/golden/sd``).

The goldens are the original img2img stream (cumulo-autumn/StreamDiffusion b623251, SD-Turbo
layout + TAESD, stream batch, ``cfg_type="none"``) run on dreamwire's tiny random models; their
README says how. Here the tiny models come from this project's ``scripts/make_tiny_models.py``
(checked tensor for tensor against the ones the goldens were made with), are loaded by
dreamwire's loader, and each case runs through the pipeline as the inference process drives it,
with dreamwire's **own** noise for the case's seed: nothing is injected. Output k is the result
of input k − (n − 1) in both; the original's first n − 1 outputs (its zero-filled buffer
decoded) have no counterpart, dreamwire sends no frame there.

Latents are read where they enter and leave the VAE (forward hooks on TAESD's encoder and
decoder: the model's own modules, not dreamwire's code).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shared_dir import shared_dir

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from services.inference import registry  # noqa: E402
from services.inference.pipeline import Request  # noqa: E402

GOLDEN = shared_dir() / "golden" / "sd"
IMAGE_TOLERANCE = 2  # grey levels (2/255)
LATENT_TOLERANCE = 1e-4
CASES = sorted(p.stem for p in GOLDEN.glob("expected_*.safetensors"))

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not CASES, reason=f"no golden outputs at {GOLDEN}"),
]


def tensors(path: Path) -> dict[str, Any]:
    return dict(load_file(str(path)))


def test_the_tiny_models_are_the_goldens(tiny_models: Path) -> None:
    """The fixture script writes the weights the goldens were made with, in the real layout."""
    reference = GOLDEN / "models"
    files = sorted(p.relative_to(reference) for p in reference.rglob("*") if p.is_file())
    assert files
    for rel in files:
        ours, theirs = tiny_models / rel, reference / rel
        if rel.suffix != ".safetensors":
            assert ours.read_bytes() == theirs.read_bytes(), rel
            continue
        mine, golden = tensors(ours), tensors(theirs)
        if rel.parent.name == "text_encoder":
            # The real sd-turbo names its CLIP weights text_model.…; the golden copy was saved by
            # transformers 5 without the prefix (its README: the original was given them with it).
            assert all(key.startswith("text_model.") for key in mine), rel
            mine = {key.removeprefix("text_model."): value for key, value in mine.items()}
        assert mine.keys() == golden.keys(), rel
        for key in golden:
            assert torch.equal(mine[key], golden[key]), (rel, key)


@pytest.fixture(scope="module")
def sd(tiny_models: Path) -> Any:
    spec = registry.get("streamdiffusion")
    return spec.load(registry.full_config(spec, {"height": 64, "width": 64}), tiny_models)


class VaeTap:
    """What goes into TAESD's decoder and comes out of its encoder, per call."""

    def __init__(self, vae: Any) -> None:
        self.encoded: list[Any] = []
        self.decoded: list[Any] = []
        self._handles = [
            vae.encoder.register_forward_hook(
                lambda _m, _i, out: self.encoded.append(out.detach().float().clone())
            ),
            vae.decoder.register_forward_pre_hook(
                lambda _m, args: self.decoded.append(args[0].detach().float().clone())
            ),
        ]
        self.scale = float(vae.config.scaling_factor)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.mark.parametrize("case", CASES)
def test_frames_match_the_original_streamdiffusion(sd: Any, case: str) -> None:
    golden = tensors(GOLDEN / f"{case}.safetensors")
    with safe_open(str(GOLDEN / f"{case}.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["case"])
    original, params = meta["original"], dict(meta["dreamwire"]["config"])
    assert params["denoising_step_list"] == [999 - 20 * i for i in original["t_index_list"]]
    assert params["seed"] == original["seed"]
    checked = registry.validate_parameters("streamdiffusion", params, load=True)
    config = registry.full_config(registry.get("streamdiffusion"), checked)
    n = len(config.denoising_step_list)
    state = sd.new_session(case, params["width"], params["height"], config)
    frames = golden["inputs_uint8"].numpy()
    tap = VaeTap(sd.c.vae)
    outputs: dict[int, tuple[Any, np.ndarray]] = {}
    try:
        for k, rgb in enumerate(frames):
            update = meta["dreamwire"].get("update")
            if update is not None and k == update["before_frame"]:
                new = registry.full_config(
                    registry.get("streamdiffusion"), {**checked, "prompts": update["prompts"]}
                )
                sd.update(state, new, set(update["changed"]))
            (result,) = sd([Request(case, state, sd.prepare(state, np.ascontiguousarray(rgb)), k)])
            if result.frame is not None:
                outputs[k] = (result.tag, result.frame.cpu().numpy())
    finally:
        tap.close()
        sd.end_session(state)

    assert sorted(outputs) == list(range(n - 1, len(frames)))  # nothing during warm-up
    encoded = torch.cat(tap.encoded) * tap.scale
    assert float((encoded - golden["input_latent"]).abs().max()) <= LATENT_TOLERANCE
    assert len(tap.decoded) == len(outputs)
    for (k, (tag, image)), latent in zip(sorted(outputs.items()), tap.decoded, strict=True):
        assert tag == k - (n - 1)
        latent_error = float((latent[0] * tap.scale - golden["output_latent"][k]).abs().max())
        assert latent_error <= LATENT_TOLERANCE, (k, latent_error)
        reference = golden["output_uint8"][k].numpy().astype(np.int16)
        image_error = int(np.abs(image.astype(np.int16) - reference).max())
        assert image_error <= IMAGE_TOLERANCE, (k, image_error)


def test_a_seed_gives_the_originals_noise(sd: Any) -> None:
    """StreamDiffusion draws its noise once, ``randn((n, 4, h, w))`` from a generator seeded with
    the seed: the golden files hold that draw."""
    for case in CASES:
        golden = tensors(GOLDEN / f"{case}.safetensors")
        steps = [int(t) for t in golden["timesteps"]]
        config = registry.full_config(
            registry.get("streamdiffusion"),
            {"height": 64, "width": 64, "seed": 2, "denoising_step_list": steps},
        )
        state = sd.new_session("noise", 64, 64, config)
        try:
            assert torch.equal(state.noise.cpu(), golden["init_noise"])
        finally:
            sd.end_session(state)


def test_defaults_are_the_originals_img2img_example() -> None:
    spec = registry.get("streamdiffusion")
    config = registry.full_config(spec, {})
    assert config.denoising_step_list == [359, 99]  # its t_index_list [32, 45]
    assert config.noise_scale == 1.0  # do_add_noise=True
    schema = registry.schemas()["streamdiffusion"]["config_schema"]["properties"]
    assert "999 - 20*index" in schema["denoising_step_list"]["description"]
