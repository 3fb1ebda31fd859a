"""streamdiffusion: real-time img2img with stream batch (the StreamDiffusion technique).

With ``denoising_step_list = [t0, …, t(n-1)]`` a session keeps n-1 latents in flight, latent i
noised to t(i+1). Each call encodes the new frame, noises it to t0 and runs **one** UNet call
on ``[new@t0, buffer[0]@t1, …, buffer[n-2]@t(n-1)]``; every row's denoised estimate is
re-noised to the next timestep for the next call, and the last row's estimate leaves as the
output. So a frame leaves after one UNet call per frame, and output k is input k-(n-1)::

    call k:   rows  [ f(k)@t0 | f(k-1)@t1 | … | f(k-n+1)@t(n-1) ]  ── UNet ──▶ x0 of each row
              out   decode(x0 of f(k-n+1))
              next  buffer = [ f(k)@t1, f(k-1)@t2, …, f(k-n+2)@t(n-1) ]

During warm-up (fewer than n-1 frames in flight) the call has fewer rows and no output. All
sessions of one call (same resolution) go through one VAE encode, one UNet call (rows of every
session, each with its own timesteps and prompt embedding) and one VAE decode.

It is the original StreamDiffusion's img2img stream (cumulo-autumn/StreamDiffusion, stream
batch, ``cfg_type="none"``): for the same weights, frames and seed it gives the original's
frames (``tests/test_sd_golden.py``, against the original's outputs). Per session, as there:

* the noise: one ``randn((n, 4, h, w))`` from a CPU generator seeded with ``seed``, fixed for the
  session; row 0 noises each new frame to t0, row j re-noises stage j's estimate;
* the denoised estimate of each row with LCM's boundary condition (``c_out·x0 + c_skip·x_t``);
* ``noise_scale`` scales the re-noising of the buffer only (1 = the original's
  ``do_add_noise=True``, 0 = ``False``); a new frame is always noised to t0;
* the similar-image filter on the whole frame in [-1, 1]: when the cosine similarity to the last
  processed input is above the threshold, the frame is skipped with probability
  ``1 - (1 - sim) / (1 - threshold)`` and the previous output is sent again.

Where it deliberately differs: no frames during warm-up (the original decodes its zero-filled
buffer for the first n-1 calls: garbage); the filter's random draws come from a generator per
session seeded with ``seed`` (the original uses the global ``random``), and it skips at most
``similar_image_filter_max_skip_frame`` frames in a row, counting afresh after every processed
frame (the original never resets its count on a processed frame, so how many it may skip in a row
depends on what came before).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.inference import diffusion as d
from services.inference.loras import LoraSet, merge_mode, read_safetensors, sd_unet_adapters
from services.inference.pipeline import PipelineSpec, Request, Result
from services.inference.specs import StreamDiffusionConfig
from services.protocol import LoraAdapter

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class SDState:
    session_id: str
    width: int
    height: int
    config: StreamDiffusionConfig
    prompt: d.PromptTrack
    noise: torch.Tensor  # [n, C, h, w]: one fixed noise per stage
    buffer: list[torch.Tensor] = field(default_factory=list)  # x_t of stage 1..
    tags: list[Any] = field(default_factory=list)  # tag of each buffered latent
    prev_input: torch.Tensor | None = None  # the last processed frame, flat, in [-1, 1]
    prev_output: torch.Tensor | None = None
    skipped_in_row: int = 0
    rng: random.Random = field(default_factory=random.Random)
    unet_rows: int = 0

    @property
    def steps(self) -> list[int]:
        return list(self.config.denoising_step_list)


class StreamDiffusionPipeline(d.SDTurboPipeline):
    def __init__(self, spec: PipelineSpec, load: StreamDiffusionConfig, models_dir: Path) -> None:
        super().__init__(spec, models_dir)
        self.load_config = load
        self.loras = LoraSet([self.c.unet])
        if load.loras:
            adapters = sd_unet_adapters(self.c.unet)
            self.loras.load(load.loras, merge_mode(load), models_dir, read_safetensors, adapters)

    def lora_status(self) -> list[LoraAdapter]:
        return self.loras.status()

    # ------------------------------------------------------------ sessions

    def _fresh_noise(self, s: SDState) -> None:
        shape = d.latent_shape(self.c, s.width, s.height)
        n = len(s.config.denoising_step_list)
        # As the original's prepare(): one draw from a CPU generator seeded with the seed.
        generator = torch.Generator("cpu").manual_seed(s.config.seed)
        s.noise = torch.randn((n, *shape), generator=generator).to(self.device.device)
        s.buffer, s.tags = [], []
        s.prev_input = s.prev_output = None
        s.skipped_in_row = 0
        s.rng.seed(s.config.seed)

    def new_session(
        self, session_id: str, width: int, height: int, config: StreamDiffusionConfig
    ) -> SDState:
        track = d.PromptTrack(self.prompts, config.prompts, config.prompt_interpolation_method)
        s = SDState(session_id, width, height, config, track, torch.empty(0))
        self._fresh_noise(s)
        if config.transition is not None:
            track.start_transition(config.transition, config.prompt_interpolation_method)
        return s

    def update(self, state: SDState, config: StreamDiffusionConfig, changed: set[str]) -> None:
        if "lora_scales" in changed and config.lora_scales:
            self.loras.set_scales(config.lora_scales)  # the model's: every session's next frame
        old, state.config = state.config, config
        d.follow_prompts(state.prompt, config, changed)
        if d.restarts_noise(old, config):
            self._fresh_noise(state)

    def end_session(self, state: SDState) -> None:
        state.buffer.clear()
        state.tags.clear()
        state.prev_input = state.prev_output = None

    def prepare(self, state: SDState, rgb: Any) -> torch.Tensor:
        # The one host->device copy; on CPU a copy too, so the ring slot can go back at once.
        t = torch.from_numpy(rgb)
        if self.device.device.type == "cuda":
            return t.to(self.device.device, non_blocking=False)
        return t.clone()

    # ------------------------------------------------------------ the call

    def _skip(self, s: SDState, frame: torch.Tensor) -> bool:
        """The similar-image filter (the original's ``SimilarImageFilter``, see the module)."""
        cfg = s.config
        if not cfg.similar_image_filter:
            return False
        x = d.to_unit_range(frame).flatten()
        if s.prev_input is None or s.prev_output is None:
            s.prev_input = x
            return False
        sim = float(torch.nn.functional.cosine_similarity(s.prev_input, x, dim=0, eps=1e-6))
        sample = s.rng.random()
        threshold = cfg.similar_image_filter_threshold
        p_skip = 0.0 if threshold >= 1 else max(0.0, 1.0 - (1.0 - sim) / (1.0 - threshold))
        if p_skip > sample and s.skipped_in_row < cfg.similar_image_filter_max_skip_frame:
            s.skipped_in_row += 1
            return True
        s.skipped_in_row = 0
        s.prev_input = x
        return False

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        results: list[Result] = []
        work: list[Request] = []
        for r in requests:
            s: SDState = r.state
            if self._skip(s, r.frames):
                results.append(Result(r.session_id, s.prev_output, r.tag, {"skipped": True}))
            else:
                work.append(r)
        if not work:
            return results
        c = self.c
        frames = torch.stack([r.frames for r in work]).to(self.device.device)
        x0_new = d.encode_images(c, frames)
        rows: list[torch.Tensor] = []
        ts: list[int] = []
        embs: list[torch.Tensor] = []
        spans: list[tuple[int, int]] = []
        for i, r in enumerate(work):
            s = r.state
            steps = s.steps
            emb = s.prompt.step()
            t0 = torch.tensor([steps[0]], device=self.device.device)
            new = d.add_noise(c, x0_new[i : i + 1], s.noise[0:1], t0)
            s_rows = [new, *s.buffer]
            start = len(rows)
            rows.extend(s_rows)
            ts.extend(steps[: len(s_rows)])
            embs.extend([emb] * len(s_rows))
            spans.append((start, len(s_rows)))
            s.tags.insert(0, r.tag)
            s.unet_rows += len(s_rows)
        x_t = torch.cat(rows)
        t = torch.tensor(ts, device=self.device.device, dtype=torch.long)
        out = d.run_unet(c, x_t, t, torch.stack(embs))
        self.unet_calls += 1
        c_skip, c_out = d.lcm_scalings(t)
        x0 = c_out * d.predict_x0(c, x_t, t, out) + c_skip * x_t.float()
        finished: list[tuple[SDState, torch.Tensor, Any]] = []
        for r, (start, count) in zip(work, spans, strict=True):
            s = r.state
            steps = s.steps
            n = len(steps)
            x0_s = x0[start : start + count]
            keep = min(count, n - 1)
            next_t = torch.tensor(steps[1 : keep + 1], device=self.device.device, dtype=torch.long)
            s.buffer = [
                d.add_noise(
                    c,
                    x0_s[j : j + 1],
                    s.noise[j + 1 : j + 2],
                    next_t[j : j + 1],
                    s.config.noise_scale,
                )
                for j in range(keep)
            ]
            if count == n:
                finished.append((s, x0_s[n - 1 : n], s.tags.pop()))
            else:
                results.append(Result(s.session_id, None, None, {"warming_up": True}))
        if finished:
            images = d.decode_latents(c, torch.cat([lat for _, lat, _ in finished]))
            for (s, _, tag), img in zip(finished, images, strict=True):
                s.prev_output = img
                results.append(Result(s.session_id, img, tag))
        return results

    def free_memory(self) -> None:
        d.free_device_memory()


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> StreamDiffusionPipeline:
    return StreamDiffusionPipeline(spec, load_params, models_dir)
