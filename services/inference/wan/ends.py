"""The two ends of a session's block loop, around the transformer: input frames to latents,
latents to output frames. Each keeps its own VAE stream (a causal cache), so the same objects
serve the one-process pipeline and the VAE stage processes of a split one
(:mod:`.stages`)."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.inference.wan.blocks import motion_noise_scale
from services.inference.wan.vae import LatentStream, from_uint8_frames, to_uint8_frames

Tensor = torch.Tensor
#: Pixels per latent, each way.
VAE_SCALE = 8


def latent_hw(height: int, width: int) -> tuple[int, int]:
    """The latent grid of a frame: padded to whole 2×2 transformer patches of latents."""
    patch = 2 * VAE_SCALE
    return math.ceil(height / patch) * 2, math.ceil(width / patch) * 2


@dataclass(eq=False)
class BlockInput:
    """Video mode's input: a block's frames, padded to the latent grid, through the session's
    VAE encoder, and the block's noise (``noise_scale``, or Scope's motion controller)."""

    vae: LatentStream
    dtype: torch.dtype
    last_input: Tensor | None = None  # the noise controller's previous frame

    def reset(self) -> None:
        self.vae.reset()
        self.last_input = None

    @torch.inference_mode()
    def encode(
        self,
        frames: Tensor,
        latent_hw: tuple[int, int],
        *,
        noise_scale: float,
        controller: bool,
        block_frames: int,
    ) -> tuple[Tensor, float]:
        """``[T, H, W, 3]`` uint8 -> (latents ``[1, C, T', h, w]``, the block's noise scale)."""
        h, w = latent_hw
        video = from_uint8_frames(frames, self.dtype)
        pad_h, pad_w = h * VAE_SCALE - frames.shape[1], w * VAE_SCALE - frames.shape[2]
        if pad_h or pad_w:
            video = torch.nn.functional.pad(video, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        level = noise_scale
        if controller:
            level = motion_noise_scale(video, self.last_input, block_frames, noise_scale)
            self.last_input = video[:, :, -1:]
        return self.vae.encode(video), level


@dataclass(eq=False)
class BlockOutput:
    """A block's latents through the session's VAE decoder to ``[H, W, 3]`` uint8 frames; with
    ``keep`` > 0 (Krea) the last ``keep`` decoded frames stay for :meth:`reencode`."""

    vae: LatentStream
    height: int
    width: int
    fresh: Callable[[], LatentStream]  # a new stream through the same VAE
    keep: int = 0
    decoded: deque[Tensor] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.decoded = deque(maxlen=self.keep)

    def reset(self) -> None:
        self.vae.reset()
        self.decoded.clear()

    @torch.inference_mode()
    def decode(self, latents: Tensor) -> list[Tensor]:
        video = self.vae.decode(latents)
        if self.keep:
            self.decoded.extend(video[:, :, i : i + 1] for i in range(video.shape[2]))
        frames = to_uint8_frames(video)[:, : self.height, : self.width]
        return list(frames.unbind(0))

    @torch.inference_mode()
    def reencode(self) -> Tensor:
        """Krea's first context latent past the stream's start: the oldest kept output frame,
        encoded on its own (scope:krea_realtime_video/blocks/recompute_kv_cache.py)."""
        return self.fresh().encode(self.decoded[0])


def context_keep(context_frames: int) -> int:
    """Output frames Krea keeps: its re-encoded frame is the oldest of the last
    ``1 + 4·(context − 1)``."""
    return max(0, 1 + 4 * (context_frames - 1)) if context_frames else 0
