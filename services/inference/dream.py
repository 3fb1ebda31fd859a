"""dream: text to video that stays coherent from frame to frame.

Keyframes are generated from the prompt (text to image with ``denoising_step_list``, from pure
noise at the first timestep) with a noise that walks slowly: keyframe j starts from
``slerp(N(seed, ⌊p⌋), N(seed, ⌊p⌋+1), p - ⌊p⌋)`` with ``p = j · noise_walk_speed`` and N a
seeded Gaussian, so neighbouring keyframes are close and the walk never repeats. The frames in
between are the spherical interpolation of the two keyframe latents, decoded by the tiny VAE
(optionally refined by one img2img step at ``refine_timestep`` with the current prompt).

The next keyframe is generated ahead, when the previous one is reached. A prompt change (or each
step of a transition) makes the next frame start a new interval from the latent on screen
towards a keyframe generated with the new embedding, so the change shows on the next frame.

Each keyframe is reported (``keyframe_number`` and the ``generation_time_ms`` of the call that
made it) with the first frame heading to it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.inference import diffusion as d
from services.inference.pipeline import PipelineSpec, Request, Result
from services.inference.specs import DreamConfig

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class DreamPipelineState:
    session_id: str
    width: int
    height: int
    config: DreamConfig
    prompt: d.PromptTrack
    keyframe_number: int = 0  # number of the keyframe we are heading to
    position: int = 0  # frames generated since the interval started
    frames: int = 0
    key_a: torch.Tensor | None = None
    key_b: torch.Tensor | None = None
    emb_b: torch.Tensor | None = None
    shown: torch.Tensor | None = None  # latent of the last frame
    keyframe_ms: float = 0.0  # time of the call that made the latest keyframe


class DreamPipeline(d.SDTurboPipeline):
    def __init__(self, spec: PipelineSpec, load: DreamConfig, models_dir: Path) -> None:
        super().__init__(spec, models_dir)

    def new_session(
        self, session_id: str, width: int, height: int, config: DreamConfig
    ) -> DreamPipelineState:
        track = d.PromptTrack(self.prompts, config.prompts, config.prompt_interpolation_method)
        if config.transition is not None:
            track.start_transition(config.transition, config.prompt_interpolation_method)
        return DreamPipelineState(session_id, width, height, config, track)

    def update(self, state: DreamPipelineState, config: DreamConfig, changed: set[str]) -> None:
        old, state.config = state.config, config
        d.follow_prompts(state.prompt, config, changed)
        if d.restarts_noise(old, config):
            state.key_a = state.key_b = state.emb_b = state.shown = None
            state.keyframe_number = 0
            state.position = 0

    def end_session(self, state: DreamPipelineState) -> None:
        state.key_a = state.key_b = state.emb_b = state.shown = None

    # ------------------------------------------------------------ generation

    def _walk_noise(self, s: DreamPipelineState, keyframe: int) -> torch.Tensor:
        shape = d.latent_shape(self.c, s.width, s.height)
        p = keyframe * s.config.noise_walk_speed
        base = math.floor(p)
        a = d.seeded_noise(s.config.seed, base, shape, self.device)
        if p == base:
            return a.unsqueeze(0)
        b = d.seeded_noise(s.config.seed, base + 1, shape, self.device)
        flat = d.slerp(a.flatten(), b.flatten(), p - base)
        return flat.view(1, *shape)

    def _keyframes(
        self, jobs: list[tuple[DreamPipelineState, int, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """Text to image for several sessions at once, step by step (rows batched per step)."""
        c = self.c
        noise = [self._walk_noise(s, k) for s, k, _ in jobs]
        first = [s.config.denoising_step_list[0] for s, _, _ in jobs]
        x = [
            d.add_noise(c, torch.zeros_like(n), n, torch.tensor([t], device=self.device.device))
            for n, t in zip(noise, first, strict=True)
        ]
        x0: list[torch.Tensor] = [torch.zeros_like(n) for n in noise]
        for step in range(max(len(s.config.denoising_step_list) for s, _, _ in jobs)):
            idx = [
                i for i, (s, _, _) in enumerate(jobs) if step < len(s.config.denoising_step_list)
            ]
            ts = torch.tensor(
                [jobs[i][0].config.denoising_step_list[step] for i in idx],
                device=self.device.device,
                dtype=torch.long,
            )
            x_t = torch.cat([x[i] for i in idx])
            out = d.run_unet(c, x_t, ts, torch.stack([jobs[i][2] for i in idx]))
            self.unet_calls += 1
            pred = d.predict_x0(c, x_t, ts, out)
            for row, i in enumerate(idx):
                s = jobs[i][0]
                x0[i] = pred[row : row + 1]
                steps = s.config.denoising_step_list
                if step + 1 < len(steps):
                    t_next = torch.tensor([steps[step + 1]], device=self.device.device)
                    x[i] = d.add_noise(c, x0[i], noise[i], t_next)
        return x0

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        started = time.perf_counter()
        c = self.c
        sessions: list[DreamPipelineState] = [r.state for r in requests]
        embs = [s.prompt.step() for s in sessions]
        jobs: list[tuple[DreamPipelineState, int, torch.Tensor]] = []
        for s, emb in zip(sessions, embs, strict=True):
            k = s.config.keyframe_interval
            if s.key_b is None:
                # First frame (or after a reset): keyframe 0 shown now, keyframe 1 ahead.
                jobs.append((s, s.keyframe_number, emb))
                jobs.append((s, s.keyframe_number + 1, emb))
            elif s.emb_b is not None and not torch.equal(s.emb_b, emb):
                s.key_a, s.position = s.shown, 0
                jobs.append((s, s.keyframe_number, emb))
            elif s.position >= k:
                s.key_a, s.position = s.key_b, 0
                s.keyframe_number += 1
                jobs.append((s, s.keyframe_number, emb))
        if jobs:
            made = self._keyframes(jobs)
            for (s, _, emb), lat in zip(jobs, made, strict=True):
                if s.key_b is None and s.key_a is None:
                    s.key_a = lat
                elif s.key_b is None:
                    s.key_b, s.emb_b = lat, emb
                    s.keyframe_number += 1
                else:
                    s.key_b, s.emb_b = lat, emb
        latents: list[torch.Tensor] = []
        for s in sessions:
            assert s.key_a is not None and s.key_b is not None
            f = s.position / s.config.keyframe_interval
            lat = (
                s.key_a
                if f == 0
                else d.slerp(s.key_a.flatten(), s.key_b.flatten(), f).view_as(s.key_a)
            )
            latents.append(lat)
        refine = [i for i, s in enumerate(sessions) if s.config.refine_timestep > 0]
        if refine:
            ts = torch.tensor(
                [sessions[i].config.refine_timestep for i in refine], device=self.device.device
            )
            noise = torch.cat(
                [self._walk_noise(sessions[i], sessions[i].keyframe_number) for i in refine]
            )
            x_t = d.add_noise(c, torch.cat([latents[i] for i in refine]), noise, ts)
            out = d.run_unet(c, x_t, ts, torch.stack([embs[i] for i in refine]))
            self.unet_calls += 1
            x0 = d.predict_x0(c, x_t, ts, out)
            for row, i in enumerate(refine):
                latents[i] = x0[row : row + 1]
        images = d.decode_latents(c, torch.cat(latents))
        elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
        for s in {id(job[0]): job[0] for job in jobs}.values():
            s.keyframe_ms = elapsed_ms
        results = []
        for r, s, lat, img in zip(requests, sessions, latents, images, strict=True):
            s.shown = lat
            s.position += 1
            s.frames += 1
            # The same for every frame of an interval: the client hears of each keyframe once.
            info = {"keyframe_number": s.keyframe_number, "generation_time_ms": s.keyframe_ms}
            results.append(Result(r.session_id, img, r.tag, info))
        return results

    def free_memory(self) -> None:
        d.free_device_memory()


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> DreamPipeline:
    return DreamPipeline(spec, load_params, models_dir)
