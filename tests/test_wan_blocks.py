"""The pieces of the causal Wan block loop the golden vectors do not reach on their own: the
shift table, video mode's first step, Scope's motion-aware noise controller and the streaming
VAE (checked against diffusers' ``AutoencoderKLWan`` on the whole clip)."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from services.inference.wan.blocks import (  # noqa: E402
    FlowSchedule,
    motion_noise_scale,
    video_steps,
)
from services.inference.wan.vae import VaeStream  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize(
    ("shift", "timestep", "sigma"),
    # The golden README's figures (Scope's table, nearest entry).
    [
        (5.0, 750, 0.75000006),
        (5.0, 500, 0.5005996),
        (5.0, 250, 0.2515974),
        (8.0, 750, 0.7502577),
        (8.0, 600, 0.6001900),
        (8.0, 250, 0.2500000),
        (5.0, 1000, 1.0),
    ],
)
def test_sigma_is_the_nearest_shift_table_entry(shift: float, timestep: int, sigma: float) -> None:
    assert FlowSchedule(shift).sigma(timestep) == pytest.approx(sigma, abs=2e-7)


def test_video_mode_first_step_follows_the_noise() -> None:
    assert video_steps([750, 250], 0.7) == [600, 250]
    assert video_steps([1000, 750, 500, 250], 1.0) == [900, 750, 500, 250]


def frames(*values: float) -> Any:
    """A ``[1, 3, T, 4, 4]`` clip whose frame ``i`` is the constant ``values[i]``."""
    return torch.tensor(values).view(1, 1, -1, 1, 1).expand(1, 3, -1, 4, 4)


def test_noise_controller_is_scopes() -> None:
    # Still input: no motion, 0.9·0.8 + 0.1·0.7.
    assert motion_noise_scale(frames(0.2, 0.2), None, 1, 0.7) == pytest.approx(0.79)
    # Frames 0.1 apart: RMS 0.1, / 0.2 = 0.5 -> 0.9·(0.8 − 0.1) + 0.07.
    assert motion_noise_scale(frames(0.0, 0.1), None, 1, 0.7) == pytest.approx(0.70)
    # Large motion saturates at 1: 0.9·0.6 + 0.1·0.5.
    assert motion_noise_scale(frames(-1.0, 1.0), None, 1, 0.5) == pytest.approx(0.59)
    # The previous input's last frame is the reference of the first compared frame.
    last = frames(0.5)
    assert motion_noise_scale(frames(0.5, 0.5), last, 1, 0.7) == pytest.approx(0.79)
    assert motion_noise_scale(frames(0.1, 0.1), frames(0.5), 2, 0.7) == pytest.approx(
        0.9 * (0.8 - 0.2 * 1.0) + 0.07
    )
    # The largest per-frame change of the chunk counts (chunk 3: frames 1-3 vs 0-2).
    assert motion_noise_scale(frames(0, 0, 0.1, 0.1), None, 3, 0.7) == pytest.approx(0.70)


@pytest.fixture(scope="module")
def vae() -> Any:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    model: Any = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    return model.eval()


@torch.inference_mode()
def test_streaming_decode_equals_decoding_the_whole_clip(vae: Any) -> None:
    torch.manual_seed(1)
    latents = torch.randn(1, 16, 7, 4, 4)
    stream = VaeStream(vae)
    parts = [stream.decode(latents[:, :, :3]), stream.decode(latents[:, :, 3:])]
    streamed = torch.cat(parts, dim=2)
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    whole = vae.decode(latents * std + mean).sample.clamp(-1, 1)
    assert streamed.shape == whole.shape == (1, 3, 1 + 4 * 6, 32, 32)
    assert float((streamed - whole).abs().max()) < 1e-4


@torch.inference_mode()
def test_streaming_encode_equals_encoding_the_whole_clip(vae: Any) -> None:
    torch.manual_seed(2)
    video = torch.rand(1, 3, 13, 32, 32) * 2 - 1
    stream = VaeStream(vae)
    streamed = torch.cat([stream.encode(video[:, :, :5]), stream.encode(video[:, :, 5:])], 2)
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    whole = (vae.encode(video).latent_dist.mean - mean) / std
    assert streamed.shape == whole.shape == (1, 16, 4, 4, 4)
    assert float((streamed - whole).abs().max()) < 1e-4
