"""Streaming encode/decode with diffusers' ``AutoencoderKLWan`` and a per-session causal cache.

The Wan VAE is causal in time: each of its 3D convolutions looks back two frames, which
``AutoencoderKLWan`` keeps in a feature cache while it walks a clip frame by frame (decode) or
in chunks of four (encode), and clears at the end of every call. A stream cannot afford to
re-decode the past, so :class:`VaeStream` owns one session's feature caches and feeds each new
block through the same encoder/decoder modules: a block decodes only its new frames, and the
result equals decoding the whole video at once.

Frame counts follow the VAE: the first latent frame is one video frame, every later one four.

A pipeline picks its VAE with ``vae_type`` (:func:`open_vae`): ``wan`` and ``lightvae`` (the
same network with a quarter of the channels), this module's stream; ``tae`` and ``lighttae``, the
tiny autoencoder's (:mod:`.tae`), with the same interface (:class:`LatentStream`) and frame
counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import torch

from services.inference import diffusion as d
from services.inference.wan.specs import AUTOENCODERS, LIGHTVAE_FILE, TAE_FILES, WAN_BASE
from services.models.store import repo_dir

Tensor = torch.Tensor


class LatentStream(Protocol):
    """One session's way through a VAE: normalised Wan latents in and out, causal across
    calls, ``reset`` to start afresh (a hard cut)."""

    def reset(self) -> None: ...

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


#: LightX2V's LightVAE (``lightvaew2_1.pth``): the Wan VAE with 75 % of its channels pruned,
#: every width a quarter of Wan's (base 96 -> 24); same code, layers and latent statistics.
LIGHTVAE_BASE_DIM = 24


def open_vae(
    vae_type: str, models_dir: Path, dtype: torch.dtype, device: torch.device
) -> Callable[[], LatentStream]:
    """Load the VAE ``vae_type`` names; returns what makes a session's stream through it."""
    if vae_type == "wan":
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(
            repo_dir(models_dir, WAN_BASE.repo_id) / "vae",
            torch_dtype=dtype,
            **d._low_cpu_mem_kwargs(),
        )
        vae.to(device).eval().requires_grad_(False)
        return partial(VaeStream, vae)
    if vae_type == "lightvae":
        path = repo_dir(models_dir, AUTOENCODERS.repo_id) / LIGHTVAE_FILE
        return partial(VaeStream, load_lightvae(path, dtype, device))
    if vae_type in TAE_FILES:
        from services.inference.wan.tae import TaeStream, TinyAutoencoder

        filename, raw_latents = TAE_FILES[vae_type]
        path = repo_dir(models_dir, AUTOENCODERS.repo_id) / filename
        return partial(TaeStream, TinyAutoencoder.load(path, dtype, device), raw_latents)
    raise ValueError(f"vae_type: unknown VAE {vae_type!r}")


def load_lightvae(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """LightVAE from its released file (the original Wan VAE's key names, as Scope loads it),
    renamed by diffusers' own converter into an ``AutoencoderKLWan`` of a quarter the widths;
    every key must fit."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from services.inference.wan.convert import load_state_strict, read_checkpoint

    vae: Any = AutoencoderKLWan(base_dim=LIGHTVAE_BASE_DIM)
    state = {k: v.to(dtype) for k, v in read_checkpoint(path).items()}
    try:  # assigned in ``dtype`` (no buffers to cast)
        load_state_strict(vae, convert_wan_vae_to_diffusers(state))
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a LightVAE (Wan 2.1) checkpoint: {exc}") from None
    return vae.to(device).eval().requires_grad_(False)


@dataclass(eq=False)
class VaeStream:
    """One session's causal caches (encoder and decoder) and where each stream stands."""

    vae: Any
    enc_cache: list[Any] = field(default_factory=list)
    dec_cache: list[Any] = field(default_factory=list)
    encoded_frames: int = 0
    decoded_latents: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        counts = self.vae._cached_conv_counts
        self.enc_cache = [None] * counts["encoder"]
        self.dec_cache = [None] * counts["decoder"]
        self.encoded_frames = self.decoded_latents = 0

    def _normalize(self, z: Tensor) -> Tensor:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return (z - mean) / std

    def _denormalize(self, z: Tensor) -> Tensor:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
        return z * std + mean

    @torch.inference_mode()
    def encode(self, video: Tensor) -> Tensor:
        """``[B, 3, T, H, W]`` in [-1, 1] -> normalized latent means ``[B, C, T', h, w]``.

        The stream's first call must start with the single first frame (``T = 1 + 4k``);
        later calls take multiples of four frames."""
        chunks = []
        start = 0
        if self.encoded_frames == 0:
            chunks.append(video[:, :, :1])
            start = 1
        chunks += [video[:, :, i : i + 4] for i in range(start, video.shape[2], 4)]
        outs = []
        for chunk in chunks:
            outs.append(self.vae.encoder(chunk, feat_cache=self.enc_cache, feat_idx=[0]))
            self.encoded_frames += chunk.shape[2]
        moments = self.vae.quant_conv(torch.cat(outs, dim=2))
        mean = moments[:, : self.vae.config.z_dim]
        return self._normalize(mean.float())

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> Tensor:
        """Normalized latents ``[B, C, F, h, w]`` -> video ``[B, 3, T, H, W]`` in [-1, 1]."""
        vae = self.vae
        x = vae.post_quant_conv(self._denormalize(latents.float()).to(vae.dtype))
        outs = []
        for i in range(x.shape[2]):
            first = self.decoded_latents == 0
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1], feat_cache=self.dec_cache, feat_idx=[0], first_chunk=first
                )
            )
            self.decoded_latents += 1
        return torch.cat(outs, dim=2).clamp(-1.0, 1.0)


def to_uint8_frames(video: Tensor) -> Tensor:
    """``[1, 3, T, H, W]`` in [-1, 1] -> ``[T, H, W, 3]`` uint8 on the same device."""
    img = video[0].float().add(1.0).mul(127.5).clamp(0, 255).round().to(torch.uint8)
    return img.permute(1, 2, 3, 0).contiguous()


def from_uint8_frames(frames: Tensor, dtype: torch.dtype) -> Tensor:
    """``[T, H, W, 3]`` uint8 -> ``[1, 3, T, H, W]`` in [-1, 1]."""
    return frames.permute(3, 0, 1, 2).unsqueeze(0).to(dtype).div(127.5).sub(1.0)
