"""The block loop of the causal Wan pipelines: prompt keys/values and latents in, latents out.

No VAE and no text encoder here, so the loop can be checked against Scope's pipelines on their
own terms (``tests/test_wan_golden.py``). Per block, as Scope's modular blocks do it
(``scope/core/pipelines/wan2_1/blocks``):

1. **Noise**: ``torch.randn([1, F, C, H, W])`` from a CPU generator seeded ``seed + the
   block's first frame``; the re-noising draws come from the same generator, in step order
   (prepare_latents.py, denoise.py). So a seed gives Scope's video.
2. **Input**: text mode starts from the noise; video mode from
   ``noise_scale·noise + (1 − noise_scale)·z`` with the first step replaced by
   ``int(1000·noise_scale) − 100`` (prepare_video_latents.py, denoise.py).
3. **Steps** (:class:`FlowSchedule`): the step list as given; the model receives each timestep
   as is; ``x0 = x − σ(t)·flow`` with σ the shift table's entry nearest ``t`` (in float64, as
   Scope's generator does); between steps ``x = (1 − σ')·x0 + σ'·ε``.
4. **Cache**: streamdiffusionv2 and longlive write the block into the cache with one more pass
   at t = 0 (clean_kv_cache.py); Krea rebuilds its cache before every block from three context
   latents at positions 0-2 and denoises the block at 3-5 (recompute_kv_cache.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from services.inference.wan.model import CacheWindow, CausalWanTransformer, KVCache
from services.inference.wan.specs import WanGeometry

Tensor = torch.Tensor
Cross = list[tuple[Tensor, Tensor]]
#: Scope's flow-matching table has 1000 entries between σ = 1 and σ = 0.
TABLE_STEPS = 1000


class FlowSchedule:
    """Wan's shifted flow-matching table (scope:wan2_1/components/scheduler.py):
    ``σ_i = shift·s/(1 + (shift − 1)·s)`` for ``s = linspace(1, 0, 1001)[:-1]``."""

    def __init__(self, shift: float) -> None:
        s = torch.linspace(1.0, 0.0, TABLE_STEPS + 1)[:-1]
        self.sigmas = shift * s / (1.0 + (shift - 1.0) * s)
        self.timesteps = self.sigmas * TABLE_STEPS

    def sigma(self, timestep: float) -> float:
        """σ of the table entry nearest ``timestep``."""
        return float(self.sigmas[int((self.timesteps - timestep).abs().argmin())])


def video_steps(steps: Sequence[int], noise_scale: float) -> list[int]:
    """Video mode's step list: the first step follows the noise (scope:wan2_1/blocks/denoise.py)."""
    return [int(1000 * noise_scale) - 100, *steps[1:]]


def motion_noise_scale(
    video: Tensor, last_frame: Tensor | None, chunk: int, noise_scale: float
) -> float:
    """Scope's motion-aware noise controller (scope:wan2_1/blocks/noise_scale_controller.py):
    the largest per-frame RMS change over the last ``chunk`` frames of ``video``
    (``[B, C, T, H, W]`` in [-1, 1]; ``last_frame`` is the previous input's last frame), divided
    by 0.2 and clamped to [0, 1], lowers the noise: ``0.9·(0.8 − 0.2·motion) + 0.1·noise_scale``."""
    now = video[:, :, -chunk:]
    if last_frame is None:
        before = video[:, :, -chunk - 1 : -1]
    else:
        before = torch.cat([last_frame, video[:, :, -chunk:-1]], dim=2)
    rms = ((now.float() - before.float()) ** 2).mean(dim=(0, 1, 3, 4)).sqrt()
    motion = float((rms.max() / 0.2).clamp(0.0, 1.0))
    return (0.8 - 0.2 * motion) * 0.9 + noise_scale * 0.1


@dataclass(eq=False)
class BlockStream:
    """One session's place in the stream: the cache, the next frame, the recent latents."""

    cache: KVCache
    next_frame: int = 0  # absolute latent frame index of the next block
    #: The most recent latent frames ``[1, C, 1, h, w]``, as many as the recipe needs.
    recent: deque[Tensor] = field(default_factory=deque)
    first_latent: Tensor | None = None  # Krea: the stream's first latent frame
    timesteps: list[float] = field(default_factory=list)  # what the model got, last block
    sigmas: list[float] = field(default_factory=list)
    blocks: int = 0
    recaches: int = 0
    cuts: int = 0  # hard cuts (the stream started afresh)


class BlockLoop:
    """A pipeline's block recipe (:class:`~services.inference.wan.specs.WanGeometry`) on one
    transformer."""

    def __init__(
        self, transformer: CausalWanTransformer, geometry: WanGeometry, device: torch.device
    ) -> None:
        self.transformer = transformer
        self.geometry = geometry
        self.device = device
        self.schedule = FlowSchedule(geometry.shift)
        self.window = CacheWindow(geometry.cache_frames, geometry.sink_frames)
        self.rope_frames = int(transformer.config.rope_max_seq_len)
        self.channels = int(transformer.config.in_channels)
        self.model_calls = 0  # transformer passes (tests and benchmarks count them)

    def new_stream(self) -> BlockStream:
        return BlockStream(KVCache(self.window), recent=deque(maxlen=self.geometry.recent_frames))

    def reset(self, stream: BlockStream) -> None:
        """A hard cut: the next block is frame 0 of a new stream (Scope's ``init_cache``)."""
        stream.cache.reset()
        stream.next_frame = 0
        stream.cuts += 1
        stream.recent.clear()
        stream.first_latent = None

    def block_frames(self, stream: BlockStream) -> int:
        return self.geometry.latents(stream.next_frame == 0)

    def overflows(self, stream: BlockStream) -> bool:
        return self.overflows_at(stream.next_frame)

    def overflows_at(self, next_frame: int) -> bool:
        """Would a block starting at ``next_frame`` run past the RoPE table (Scope then starts
        afresh)?"""
        return next_frame + self.geometry.latents(next_frame == 0) > self.rope_frames

    # ------------------------------------------------------------ one block

    @torch.inference_mode()
    def block(
        self,
        stream: BlockStream,
        cross: Cross,
        *,
        seed: int,
        steps: Sequence[int],
        latent_hw: tuple[int, int],
        z: Tensor | None = None,
        noise_scale: float | None = None,
        attention_bias: float = 1.0,
        first_context: Callable[[], Tensor] | None = None,
    ) -> Tensor:
        """Denoise the next block: ``z`` (video mode, ``[1, C, F, h, w]``) or noise in, the
        clean latents ``[1, C, F, h, w]`` out. ``first_context`` gives Krea's re-encoded
        first context latent once the stream has moved past its first frames."""
        g = self.geometry
        n = z.shape[2] if z is not None else self.block_frames(stream)
        h, w = latent_hw
        gen = torch.Generator("cpu").manual_seed(seed + stream.next_frame)

        def draw() -> Tensor:
            r = torch.randn([1, n, self.channels, h, w], generator=gen, dtype=torch.float32)
            return r.permute(0, 2, 1, 3, 4).to(self.device)

        x = draw()
        steps = list(steps)
        if z is not None and noise_scale is not None:
            steps = video_steps(steps, noise_scale)
            x = x * noise_scale + z.float() * (1.0 - noise_scale)
        rope = stream.next_frame
        if g.context_frames and stream.next_frame > 0:
            self._rebuild(stream, cross, first_context)
            rope = min(stream.next_frame, g.context_frames)
        stream.timesteps, stream.sigmas = [], []
        x0 = x
        for i, t in enumerate(steps):
            sigma = self.schedule.sigma(t)
            stream.timesteps.append(float(t))
            stream.sigmas.append(sigma)
            flow = self._run(stream, cross, x, t, rope, bias=attention_bias)
            x0 = (x.double() - sigma * flow.double()).float()
            if i + 1 < len(steps):
                nxt = self.schedule.sigma(steps[i + 1])
                x = (1.0 - nxt) * x0 + nxt * draw()
        if g.clean_pass:
            self._run(stream, cross, x0, 0, rope, write=True)
        if stream.next_frame == 0:
            stream.first_latent = x0[:, :, :1].clone()
        stream.recent.extend(x0[:, :, j : j + 1].clone() for j in range(n))
        stream.next_frame += n
        stream.blocks += 1
        return x0

    def _run(
        self,
        stream: BlockStream,
        cross: Cross,
        x: Tensor,
        t: float,
        rope: int,
        *,
        write: bool = False,
        bias: float = 1.0,
    ) -> Tensor:
        timesteps = torch.full((1, x.shape[2]), float(t), device=self.device)
        self.model_calls += 1
        out = self.transformer.forward_causal(
            x,
            timesteps,
            cross,
            cache=stream.cache,
            rope_start=rope,
            write=write,
            attention_bias=bias,
        )
        return out.float()

    # ------------------------------------------------------------ cache rebuilds

    def _rebuild(
        self, stream: BlockStream, cross: Cross, first_context: Callable[[], Tensor] | None
    ) -> None:
        """Krea, before every block but the first: the cache is the context latents' keys and
        values at positions 0-2 with the current prompt, unbiased (scope:krea_realtime_video/
        blocks/recompute_kv_cache.py). The first context latent is the stream's first latent
        until the stream moves past it, then the re-encoding of an older decoded frame."""
        g = self.geometry
        early = stream.next_frame - g.block_frames < g.context_frames
        if early or first_context is None:
            assert stream.first_latent is not None
            first = stream.first_latent
        else:
            first = first_context()
        rest = list(stream.recent)[-(g.context_frames - 1) :]
        context = torch.cat([first.to(rest[0].dtype), *rest], dim=2)
        stream.cache.reset()
        self._run(stream, cross, context, 0, 0, write=True)

    @torch.inference_mode()
    def recache(self, stream: BlockStream, cross: Cross) -> None:
        """longlive on a new prompt: the recent latents' keys/values again, with the new prompt
        (scope:longlive/blocks/recache_frames.py). Up to a full window everything is recomputed;
        past it the sinks keep their keys and the frames after them are recomputed, attending
        to the sinks and each other."""
        n = stream.next_frame
        if n == 0 or not stream.recent:
            return
        g = self.geometry
        recent = list(stream.recent)
        if n <= g.cache_frames:
            stream.cache.reset()
            frames = recent[-n:]
        else:
            stream.cache.keep_first(g.sink_frames)
            frames = recent[-(g.cache_frames - g.sink_frames) :]
        x = torch.cat(frames, dim=2)
        self._run(stream, cross, x, 0, n - len(frames), write=True)
        stream.recaches += 1
