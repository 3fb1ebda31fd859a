"""The causal Wan pipelines (streamdiffusionv2, longlive, krea-realtime-video) as one class.

A session generates **blocks** of ``block_frames`` latent frames. Per block:

1. the prompt track steps once (a transition advances one step per block); its cross-attention
   keys/values are computed once per distinct embedding;
2. krea-realtime-video rebuilds its KV cache from the stored clean context latents (with the
   current prompt) every block; longlive does so once after a prompt change under
   ``manage_cache``; the others reset the cache then;
3. the block is denoised with ``denoising_step_list`` (flow matching, shifted sigmas; each step
   predicts the clean latents, which are re-noised to the next step's sigma with seeded noise),
   starting from pure noise (text) or from the encoded input frames noised to ``noise_scale``
   times the first sigma (video; ``noise_controller`` lowers it when the input moves);
4. one more pass at timestep 0 over the clean latents writes the block's keys/values into the
   KV cache (and the latents into the context store), as Self-Forcing-style generators do;
5. the VAE decodes only the new latents, through the session's causal cache.

The contract gives one result per request, so frames queue per session: in text mode a call
pops one frame; in video mode input frames gather until a block's worth is there (``4·n − 3``
for a session's first block, ``4·n`` after), and each output keeps the tag of the input frame it
came from. Sessions of one call run one after the other (their caches differ in length; no
cross-session batching yet).

**Blocks ahead (text mode).** The inference service asks for text frames at ``text_fps``; if a
block were only generated once the queue ran dry, the model would sit idle while queued frames
are paced out and a 20 fps model would serve about 12. So as soon as less than a block is
queued, the next block is generated on a worker thread (torch releases the GIL; on CUDA on its
own stream, frames handed over on the CPU) while the service keeps serving the queue and
answering heartbeats. One lock serialises model work; a session's parameters, mode or end wait
for its block in flight first (:meth:`settle`), so a new prompt applies from the next block on,
and a failure in the block (out of memory) surfaces on the session's next call.

Cache semantics: ``reset_cache`` resets once; ``manage_cache`` resets (or, for longlive,
re-caches) when the prompts change outside a transition; the cache resets before RoPE
positions run past the table; a session whose mode changes (video ↔ text) starts afresh.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from services.inference import diffusion as d
from services.inference.pipeline import COMPILE_ENV, Pipeline, PipelineSpec, Request, Result
from services.inference.wan.convert import load_transformer
from services.inference.wan.model import AttentionPolicy, CausalWanTransformer, KVCache
from services.inference.wan.specs import (
    CHECKPOINTS,
    GEOMETRY,
    LORAS,
    SDV2_TEXT_STEPS,
    WAN_BASE,
    StreamDiffusionV2Config,
    WanConfig,
)
from services.inference.wan.vae import VaeStream, from_uint8_frames, to_uint8_frames
from services.models.downloads import require_models
from services.models.store import repo_dir

logger = logging.getLogger(__name__)

#: Flow-matching shift of Wan2.1 text-to-video (sigma' = s·σ / (1 + (s − 1)·σ)).
FLOW_SHIFT = 5.0
TEXT_LEN = 512
#: noise_controller: factor = max(MIN_FACTOR, 1 − GAIN · motion), smoothed with SMOOTHING.
MOTION_GAIN = 4.0
MIN_NOISE_FACTOR = 0.3
NOISE_SMOOTHING = 0.5
VAE_SCALE = 8


def shifted_sigma(timestep: float, shift: float = FLOW_SHIFT) -> float:
    s = timestep / 1000.0
    return shift * s / (1.0 + (shift - 1.0) * s)


class WanPromptEncoder(d.PromptEncoder):
    """UMT5 hidden states, padded with zeros to ``TEXT_LEN`` tokens (as Wan is trained)."""

    def __init__(self, text_encoder: Any, tokenizer: Any, device: d.Device) -> None:
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0

    @torch.inference_mode()
    def encode_text(self, text: str) -> torch.Tensor:
        if (hit := self._cache.get(text)) is not None:
            self._cache.move_to_end(text)
            return hit
        tok = self.tokenizer(
            [text], padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt"
        )
        ids = tok.input_ids.to(self.device.device)
        mask = tok.attention_mask.to(self.device.device)
        hidden = self.text_encoder(ids, attention_mask=mask).last_hidden_state[0].float()
        emb = hidden * mask[0].unsqueeze(-1)
        self.encoded += 1
        self._cache[text] = emb
        if len(self._cache) > d.PROMPT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return emb


@dataclass(eq=False)
class WanSession:
    session_id: str
    width: int
    height: int
    config: WanConfig
    prompt: d.PromptTrack
    cache: KVCache
    vae: VaeStream
    mode: str | None = None
    context: dict[int, torch.Tensor] = field(default_factory=dict)  # frame -> clean latent
    cross: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    out: deque[tuple[torch.Tensor, Any, int]] = field(default_factory=deque)  # frame, tag, block
    ahead: Future[None] | None = None  # the text block being generated ahead
    inputs: list[torch.Tensor] = field(default_factory=list)
    input_tags: list[Any] = field(default_factory=list)
    last_input: torch.Tensor | None = None
    noise_level: float | None = None
    blocks: int = 0  # blocks generated since the session (re)started
    recaches: int = 0
    cross_computed: int = 0
    pending_recache: bool = False


class WanPipeline(Pipeline):
    copies_input = True
    oom_errors = d.OOM_ERRORS

    def __init__(self, spec: PipelineSpec, load: WanConfig, models_dir: Path) -> None:
        super().__init__(spec)
        require_models(spec, models_dir)
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device = d.select_device("bfloat16")
        self.device_description = self.device.description
        geometry = GEOMETRY[spec.id]
        self.block_frames = int(geometry["block_frames"])
        self.local_attn_frames = int(geometry["local_attn_frames"])
        self.sink_frames = int(geometry["sink_frames"])
        self.recache_every_block = spec.id == "krea-realtime-video"
        self.recache_on_prompt = spec.id == "longlive"
        quantization = getattr(load, "quantization", None)
        if quantization is not None and self.device.device.type != "cuda":
            raise ValueError(f"quantization: {quantization} needs a CUDA GPU")
        dev, dtype = self.device.device, self.device.dtype
        repo, filename = CHECKPOINTS[spec.id]
        lora_path, lora_alpha = None, None
        if spec.id in LORAS:
            lora_repo, lora_file, lora_alpha = LORAS[spec.id]
            lora_path = repo_dir(models_dir, lora_repo) / lora_file
        self.transformer: CausalWanTransformer = load_transformer(
            repo_dir(models_dir, repo) / filename,
            dtype,
            dev,
            lora=lora_path,
            lora_alpha=lora_alpha,
        )
        if quantization is not None:
            from services.inference.wan.fp8 import quantize_linears

            quantize_linears(self.transformer.blocks, dtype)
        if os.environ.get(COMPILE_ENV) == "1":  # after quantizing: the graph has the fp8 layers
            self.transformer.compile_blocks()
        base = repo_dir(models_dir, WAN_BASE.repo_id)
        text_encoder = UMT5EncoderModel.from_pretrained(base / "text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
        self.vae = AutoencoderKLWan.from_pretrained(
            base / "vae", torch_dtype=dtype, **d._low_cpu_mem_kwargs()
        )
        modules: tuple[Any, ...] = (text_encoder, self.vae)
        for module in modules:
            module.to(dev).eval().requires_grad_(False)
        self.prompts = WanPromptEncoder(text_encoder, tokenizer, self.device)
        self.latent_channels = int(self.transformer.config.in_channels)
        self.rope_frames = int(self.transformer.config.rope_max_seq_len)
        self.model_calls = 0  # transformer passes (tests and benchmarks count them)
        #: Generate the next text block while the queued frames are served (see the module doc).
        self.prefetch = True
        self._model_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{spec.id}-ahead")
        self._worker_stream = torch.cuda.Stream() if dev.type == "cuda" else None
        logger.info("%s on %s", spec.id, self.device_description)

    # ------------------------------------------------------------ sessions

    def _policy(self, s: WanSession) -> AttentionPolicy:
        bias = float(getattr(s.config, "kv_cache_attention_bias", 1.0))
        return AttentionPolicy(self.block_frames, self.local_attn_frames, self.sink_frames, bias)

    def new_session(
        self, session_id: str, width: int, height: int, config: WanConfig
    ) -> WanSession:
        track = d.PromptTrack(self.prompts, config.prompts, config.prompt_interpolation_method)
        s = WanSession(
            session_id,
            width,
            height,
            config,
            track,
            KVCache(AttentionPolicy(self.block_frames), self.rope_frames),
            VaeStream(self.vae),
        )
        s.cache.policy = self._policy(s)
        if config.transition is not None:
            track.start_transition(config.transition, config.prompt_interpolation_method)
        return s

    def update(self, state: WanSession, config: WanConfig, changed: set[str]) -> None:
        s = state
        self.settle(s)
        s.config = config
        s.cache.policy = self._policy(s)
        transition = "transition" in changed and config.transition is not None
        in_transition = transition or s.prompt.in_transition
        if changed & {"prompts", "prompt_interpolation_method"}:
            s.prompt.set_prompts(config.prompts, config.prompt_interpolation_method)
            if config.manage_cache and not in_transition and "prompts" in changed:
                if self.recache_on_prompt:
                    s.pending_recache = True
                else:
                    self.reset_cache(s)
        if transition:
            assert config.transition is not None
            s.prompt.start_transition(config.transition, config.prompt_interpolation_method)
        if config.reset_cache:
            self.reset_cache(s)

    def reset_cache(self, s: WanSession) -> None:
        """Forget the KV cache and the context latents (the VAE stream carries on)."""
        s.cache.reset()
        s.context.clear()
        s.pending_recache = False

    def _init(self, s: WanSession, mode: str) -> None:
        """A fresh start (first call, or the mode changed)."""
        if s.mode is not None:
            self.reset_cache(s)
        s.mode = mode
        s.vae.reset()
        s.out.clear()
        s.inputs.clear()
        s.input_tags.clear()
        s.last_input = None
        s.noise_level = None
        s.blocks = 0

    def end_session(self, state: WanSession) -> None:
        try:
            self.settle(state)
        except Exception:  # the session is over: its failed block no longer matters
            logger.debug("block ahead of ended session %s failed", state.session_id)
        self.reset_cache(state)
        state.out.clear()
        state.inputs.clear()
        state.cross = None

    def prepare(self, state: WanSession, rgb: Any) -> torch.Tensor:
        t = torch.from_numpy(rgb)
        if self.device.device.type == "cuda":
            return t.to(self.device.device)
        return t.clone()

    # ------------------------------------------------------------ the call

    def settle(self, s: WanSession) -> None:
        """Wait for the session's block in flight; its failure is raised here."""
        ahead, s.ahead = s.ahead, None
        if ahead is not None:
            ahead.result()

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        results = []
        for r in requests:
            s: WanSession = r.state
            mode = "text" if r.frames is None else "video"
            if s.mode != mode:
                self.settle(s)
                self._init(s, mode)
            if mode == "text":
                if not s.out:
                    self.settle(s)
                if not s.out:
                    with self._model_lock:
                        s.out.extend(self._text_block(s))
                frame, _, block = s.out.popleft()
                results.append(Result(s, frame, r.tag, {"block": block}))
                if self.prefetch and s.ahead is None and len(s.out) < 4 * self.block_frames:
                    s.ahead = self._worker.submit(self._text_block_ahead, s)
                continue
            s.inputs.append(r.frames)
            s.input_tags.append(r.tag)
            need = 4 * self.block_frames - (3 if s.vae.encoded_frames == 0 else 0)
            if len(s.inputs) >= need:
                with self._model_lock:
                    self._video_block(s)
            if s.out:
                frame, tag, block = s.out.popleft()
                info = {"block": block, "noise_scale": s.noise_level}
                results.append(Result(s, frame, tag, info))
            else:
                results.append(Result(s, None, None, {"warming_up": True}))
        return results

    def _text_block_ahead(self, s: WanSession) -> None:
        """On the worker thread: the next block, its frames on the CPU once complete."""
        with self._model_lock, torch.inference_mode(), self._on_worker_stream():
            frames = self._text_block(s)
            if self._worker_stream is not None:
                frames = [(f.cpu(), tag, block) for f, tag, block in frames]
        s.out.extend(frames)

    def _on_worker_stream(self) -> Any:
        if self._worker_stream is None:
            return nullcontext()
        return torch.cuda.stream(self._worker_stream)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _latent_hw(self, s: WanSession) -> tuple[int, int]:
        patch = 2 * VAE_SCALE
        return math.ceil(s.height / patch) * 2, math.ceil(s.width / patch) * 2

    def _steps(self, s: WanSession) -> list[int]:
        steps = list(s.config.denoising_step_list)
        if (
            s.mode == "text"
            and isinstance(s.config, StreamDiffusionV2Config)
            and steps == StreamDiffusionV2Config().denoising_step_list
        ):
            return list(SDV2_TEXT_STEPS)
        return steps

    def _text_block(self, s: WanSession) -> list[tuple[torch.Tensor, Any, int]]:
        h, w = self._latent_hw(s)
        shape = (1, self.latent_channels, self.block_frames, h, w)
        latents = self._generate(s, None, shape, 1.0)
        return [(frame, None, s.blocks) for frame in self._decode(s, latents)]

    def _video_block(self, s: WanSession) -> None:
        frames = torch.stack(s.inputs)
        tags = list(s.input_tags)
        s.inputs.clear()
        s.input_tags.clear()
        scale = self._noise_scale(s, frames)
        h, w = self._latent_hw(s)
        video = from_uint8_frames(frames, self.vae.dtype)
        pad_h, pad_w = h * VAE_SCALE - s.height, w * VAE_SCALE - s.width
        if pad_h or pad_w:
            video = torch.nn.functional.pad(video, (0, pad_w, 0, pad_h, 0, 0), mode="replicate")
        z = s.vae.encode(video)
        latents = self._generate(s, z, tuple(z.shape), scale)
        for frame, tag in zip(self._decode(s, latents), tags, strict=True):
            s.out.append((frame, tag, s.blocks))

    def _noise_scale(self, s: WanSession, frames: torch.Tensor) -> float:
        base = float(getattr(s.config, "noise_scale", 1.0))
        if not getattr(s.config, "noise_controller", False):
            s.noise_level = base
            return base
        seq = frames.float()
        if s.last_input is not None:
            seq = torch.cat([s.last_input.float().unsqueeze(0), seq])
        s.last_input = frames[-1]
        motion = float((seq[1:] - seq[:-1]).abs().mean() / 255.0) if len(seq) > 1 else 0.0
        target = base * max(MIN_NOISE_FACTOR, 1.0 - MOTION_GAIN * motion)
        if s.noise_level is None:
            s.noise_level = target
        else:
            s.noise_level += NOISE_SMOOTHING * (target - s.noise_level)
        return s.noise_level

    def _decode(self, s: WanSession, latents: torch.Tensor) -> list[torch.Tensor]:
        video = s.vae.decode(latents)
        frames = to_uint8_frames(video)[:, : s.height, : s.width]
        return list(frames.unbind(0))

    # ------------------------------------------------------------ the model

    def _cross(self, s: WanSession, emb: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if s.cross is None or s.cross[0] is not emb:
            context = emb.unsqueeze(0).to(self.device.device)
            s.cross = (emb, self.transformer.cross_kv(context))
            s.cross_computed += 1
        return s.cross[1]

    def _run(
        self,
        s: WanSession,
        x: torch.Tensor,
        sigma: float,
        cross: list[tuple[torch.Tensor, torch.Tensor]],
        write: bool = False,
    ) -> torch.Tensor:
        t = torch.full((1, x.shape[2]), sigma * 1000.0, device=self.device.device)
        self.model_calls += 1
        out = self.transformer.forward_causal(
            x, t, cross, s.cache.policy, cache=s.cache, write=write
        )
        return out.float()

    def _recache(self, s: WanSession, cross: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Rebuild the KV cache from the context latents with the current prompt."""
        next_frame = s.cache.next_frame
        s.cache.layers.clear()
        s.cache.frames.clear()
        groups: dict[int, list[int]] = {}
        for f in sorted(s.context):
            groups.setdefault(f // self.block_frames, []).append(f)
        for frames in groups.values():
            s.cache.next_frame = frames[0]
            x = torch.cat([s.context[f] for f in frames], dim=2)
            self._run(s, x, 0.0, cross, write=True)
        s.cache.next_frame = next_frame
        s.recaches += 1

    @torch.inference_mode()
    def _generate(
        self, s: WanSession, z: torch.Tensor | None, shape: tuple[int, ...], scale: float
    ) -> torch.Tensor:
        if s.cache.overflows(self.block_frames):
            logger.info("session %s: RoPE table full, cache reset", s.session_id)
            self.reset_cache(s)
        cross = self._cross(s, s.prompt.step())
        if s.context and (self.recache_every_block or s.pending_recache):
            self._recache(s, cross)
        s.pending_recache = False
        seed = s.config.seed
        steps = self._steps(s)
        sigmas = [scale * shifted_sigma(t) for t in steps]
        index = 1000 * (s.cache.next_frame + 1)
        noise = d.seeded_noise(seed, index, shape, self.device).float()
        x = noise if z is None else (1.0 - sigmas[0]) * z.float() + sigmas[0] * noise
        x0 = x
        for i, sigma in enumerate(sigmas):
            flow = self._run(s, x, sigma, cross)
            x0 = x - sigma * flow
            if i + 1 < len(sigmas):
                nxt = sigmas[i + 1]
                renoise = d.seeded_noise(seed, index + i + 1, shape, self.device).float()
                x = (1.0 - nxt) * x0 + nxt * renoise
        start = s.cache.next_frame
        self._run(s, x0, 0.0, cross, write=True)
        for j in range(x0.shape[2]):
            s.context[start + j] = x0[:, :, j : j + 1].clone()
        keep = s.cache.policy.keep_for(s.cache.next_frame, torch.tensor(sorted(s.context)))
        for f, kept in zip(sorted(s.context), keep.tolist(), strict=True):
            if not kept:
                del s.context[f]
        s.blocks += 1
        return x0

    def free_memory(self) -> None:
        d.free_device_memory()


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> WanPipeline:
    return WanPipeline(spec, load_params, models_dir)
