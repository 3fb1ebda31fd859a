"""The causal Wan pipelines (streamdiffusionv2, longlive, krea-realtime-video) as one class.

A session generates **blocks** of latent frames with the block loop of
:mod:`services.inference.wan.blocks` (Scope's recipe per pipeline: noise, steps, cache); this
module adds what a stream needs around it. Per block:

1. the prompt track steps once (a transition advances one step per block); its cross-attention
   keys/values are computed once per distinct embedding; longlive recomputes its recent frames'
   keys/values when the embedding changed;
2. video mode encodes the gathered input frames through the session's causal VAE stream and
   sets the noise (``noise_scale``, lowered by ``noise_controller`` when the input moves);
3. the block loop denoises the block;
4. the VAE decodes only the new latents, through the session's causal cache (``vae_type``
   picks it: Wan's own, LightX2V's pruned one, or TAEHV's tiny one; :mod:`.vae`).

The contract gives one result per request, so frames queue per session: in text mode a call
pops one frame; in video mode input frames gather until a block's worth is there (``4·n + 1``
for a stream's first block of ``n`` latent frames, ``4·n`` after), and each output keeps the tag
of the input frame it came from. Sessions of one call run one after the other (their caches
differ in length; no cross-session batching yet).

**Blocks ahead (text mode).** The inference service asks for text frames at ``text_fps``; if a
block were only generated once the queue ran dry, the model would sit idle while queued frames
are paced out and a 20 fps model would serve about 12. So as soon as less than a block is
queued, the next block is generated on a worker thread (torch releases the GIL; on CUDA on its
own stream, frames handed over on the CPU) while the service keeps serving the queue and
answering heartbeats; a tick that finds the queue empty while the block is still being made
gets no frame rather than waiting for it. Only a session's first block is made on the call.
One lock serialises model work; a session's parameters, mode or end wait for its block in
flight first (:meth:`settle`), so a new prompt applies from the next block on, and a failure
in the block (out of memory) surfaces on the session's next call. Video blocks are made on the
same worker, and one whose inputs arrived while the last was made follows it at once.

Cache semantics (Scope's, scope:wan2_1/blocks/setup_caches.py): a **hard cut** (frame 0 again,
KV and VAE caches cleared) comes from ``reset_cache``, from a prompt change outside a
transition in video mode under ``manage_cache``, from a change of mode, and before RoPE
positions run past the table.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from services.inference import diffusion as d
from services.inference.loras import LoraSet, merge_mode, read_safetensors, wan_adapters
from services.inference.pipeline import COMPILE_ENV, Pipeline, PipelineSpec, Request, Result
from services.inference.wan.blocks import BlockLoop, BlockStream
from services.inference.wan.convert import load_transformer
from services.inference.wan.ends import BlockInput, BlockOutput, context_keep, latent_hw
from services.inference.wan.model import CausalWanTransformer
from services.inference.wan.specs import (
    AUTOENCODERS,
    CHECKPOINTS,
    GEOMETRY,
    LORAS,
    SDV2_TEXT_STEPS,
    WAN_BASE,
    StreamDiffusionV2Config,
    WanConfig,
)
from services.inference.wan.vae import open_vae
from services.models.downloads import require_models
from services.models.store import repo_dir
from services.protocol import LoraAdapter

logger = logging.getLogger(__name__)

#: Input frames kept while a video block is made off the loop (the newest; a block needs 12).
MAX_WAITING_INPUTS = 64

TEXT_LEN = 512


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
class WanState:
    session_id: str
    width: int
    height: int
    config: WanConfig
    prompt: d.PromptTrack
    stream: BlockStream
    #: The loop's ends (None where they run in the VAE stage processes of a split pipeline).
    input: BlockInput | None
    output: BlockOutput | None
    mode: str | None = None
    cross: tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]] | None = None
    cached_with: torch.Tensor | None = None  # the embedding the KV cache was made with
    out: deque[tuple[torch.Tensor, Any, int]] = field(default_factory=deque)  # frame, tag, block
    ahead: Future[None] | None = None  # the text block being generated ahead
    inputs: list[torch.Tensor] = field(default_factory=list)
    input_tags: list[Any] = field(default_factory=list)
    noise_level: float | None = None
    cross_computed: int = 0
    pending_cut: bool = False
    lora_version: int = 0  # the model's LoRA scales this session's caches were made with
    #: Between the service thread and the worker: the inputs, and whether a settle waits.
    lock: threading.Lock = field(default_factory=threading.Lock)
    settling: bool = False

    @property
    def blocks(self) -> int:
        return self.stream.blocks


class WanPipeline(Pipeline):
    copies_input = True
    oom_errors = d.OOM_ERRORS
    state_type: type[WanState] = WanState

    def __init__(self, spec: PipelineSpec, load: WanConfig, models_dir: Path) -> None:
        super().__init__(spec)
        needed = spec.artifacts
        if load.vae_type == "wan":  # the light autoencoders' files only when one is asked for
            needed = tuple(a for a in needed if a != AUTOENCODERS)
        require_models(replace(spec, artifacts=needed), models_dir)
        from transformers import AutoTokenizer, UMT5EncoderModel

        self.device = d.select_device("bfloat16")
        self.device_description = self.device.description
        self.geometry = GEOMETRY[spec.id]
        self.block_frames = self.geometry.block_frames
        quantization = getattr(load, "quantization", None)
        if quantization is not None and self.device.device.type != "cuda":
            raise ValueError(f"quantization: {quantization} needs a CUDA GPU")
        dev, dtype = self.device.device, self.device.dtype
        repo, filename = CHECKPOINTS[spec.id]
        lora_path, lora_alpha = None, None
        if spec.id in LORAS:
            lora_repo, lora_file, lora_alpha = LORAS[spec.id]
            lora_path = repo_dir(models_dir, lora_repo) / lora_file
        transformer: CausalWanTransformer = load_transformer(
            repo_dir(models_dir, repo) / filename,
            dtype,
            dev,
            lora=lora_path,
            lora_alpha=lora_alpha,
        )
        self.loras = LoraSet([transformer])
        if load.loras:
            mode = merge_mode(load)
            if quantization is not None and any(
                (item.merge_mode or mode) == "runtime_peft" for item in load.loras
            ):
                raise ValueError(
                    "loras: runtime_peft adapters do not run on fp8 layers; merge them "
                    "(merge_mode permanent_merge) or load without quantization"
                )
            self.loras.load(
                load.loras,
                mode,
                models_dir,
                read_safetensors,
                wan_adapters(transformer),
            )
        if quantization is not None:
            from services.inference.wan.fp8 import quantize_linears

            quantize_linears(transformer.blocks, dev)
        if os.environ.get(COMPILE_ENV) == "1":  # after quantizing: the graph has the fp8 layers
            transformer.compile_blocks()
        self.transformer = transformer
        self.loop = BlockLoop(transformer, self.geometry, dev)
        base = repo_dir(models_dir, WAN_BASE.repo_id)
        text_encoder: Any = UMT5EncoderModel.from_pretrained(base / "text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
        text_encoder.to(dev).eval().requires_grad_(False)
        self.vae_type = load.vae_type
        self.prompts = WanPromptEncoder(text_encoder, tokenizer, self.device)
        #: Generate the next text block while the queued frames are served (see the module doc).
        self.prefetch = True
        self._model_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{spec.id}-ahead")
        self._worker_stream = torch.cuda.Stream() if dev.type == "cuda" else None
        self._load_ends(load, models_dir)
        logger.info("%s on %s, VAE %s", spec.id, self.device_description, self.vae_type)

    def _load_ends(self, load: WanConfig, models_dir: Path) -> None:
        #: Makes a session's stream through the VAE ``vae_type`` names (``wan``: Wan's own).
        self.vae_stream = open_vae(load.vae_type, models_dir, self.device.dtype, self.device.device)

    def _ends(self, width: int, height: int) -> tuple[BlockInput | None, BlockOutput | None]:
        """A new session's VAE ends (both in this process)."""
        keep = context_keep(self.geometry.context_frames)
        return (
            BlockInput(self.vae_stream(), self.device.dtype),
            BlockOutput(self.vae_stream(), height, width, self.vae_stream, keep),
        )

    @property
    def model_calls(self) -> int:
        return self.loop.model_calls

    # ------------------------------------------------------------ sessions

    def new_session(self, session_id: str, width: int, height: int, config: WanConfig) -> WanState:
        track = d.PromptTrack(self.prompts, config.prompts, config.prompt_interpolation_method)
        s = self.state_type(
            session_id,
            width,
            height,
            config,
            track,
            self.loop.new_stream(),
            *self._ends(width, height),
        )
        if config.transition is not None:
            track.start_transition(config.transition, config.prompt_interpolation_method)
        return s

    def update(self, state: WanState, config: WanConfig, changed: set[str]) -> None:
        s = state
        self.settle(s)
        if "lora_scales" in changed and config.lora_scales:
            # The model's scales: set between blocks (a block made ahead holds the lock), so
            # every session's next block uses them (see _start_block).
            with self._model_lock:
                self.loras.set_scales(config.lora_scales)
        s.config = config
        transition = "transition" in changed and config.transition is not None
        in_transition = transition or s.prompt.in_transition
        d.follow_prompts(s.prompt, config, changed)
        if "prompts" in changed and config.manage_cache and not in_transition and s.mode == "video":
            s.pending_cut = True
        if config.reset_cache:
            s.pending_cut = True

    def hard_cut(self, s: WanState) -> None:
        """Frame 0 again: KV cache, VAE caches and the noise controller start afresh (Scope's
        ``init_cache``); frames already made stay queued."""
        self.loop.reset(s.stream)
        for end in (s.input, s.output):
            if end is not None:
                end.reset()
        s.cached_with = None
        s.pending_cut = False

    def _init(self, s: WanState, mode: str) -> None:
        """A fresh start (first call, or the mode changed)."""
        s.mode = mode
        self.hard_cut(s)
        s.out.clear()
        s.inputs.clear()
        s.input_tags.clear()
        s.noise_level = None

    def end_session(self, state: WanState) -> None:
        try:
            self.settle(state)
        except Exception:  # the session is over: its failed block no longer matters
            logger.debug("block ahead of ended session %s failed", state.session_id)
        self.hard_cut(state)
        state.out.clear()
        state.inputs.clear()
        state.cross = None

    def prepare(self, state: WanState, rgb: Any) -> torch.Tensor:
        t = torch.from_numpy(rgb)
        if self.device.device.type == "cuda":
            return t.to(self.device.device)
        return t.clone()

    # ------------------------------------------------------------ the call

    def settle(self, s: WanState) -> None:
        """Wait for the session's block in flight (a video chain stops after it); its failure
        is raised here."""
        ahead, s.ahead = s.ahead, None
        if ahead is not None:
            s.settling = True
            try:
                ahead.result()
            finally:
                s.settling = False

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        results = []
        for r in requests:
            s: WanState = r.state
            mode = "text" if r.frames is None else "video"
            if s.mode != mode:
                self.settle(s)
                self._init(s, mode)
            if mode == "text":
                if not s.out and s.ahead is not None:
                    if not s.ahead.done():
                        # The block is still being made: this tick gets no frame, and the
                        # service loop stays free for heartbeats and other sessions.
                        results.append(Result(s.session_id, None, None, {"warming_up": True}))
                        continue
                    self.settle(s)  # done: its failure, if any, is raised here
                if not s.out:
                    with self._model_lock:
                        s.out.extend(self._text_block(s))
                frame, _, block = s.out.popleft()
                results.append(Result(s.session_id, frame, r.tag, {"block": block}))
                if self.prefetch and s.ahead is None and len(s.out) < 4 * self.block_frames:
                    s.ahead = self._worker.submit(self._text_block_ahead, s)
                continue
            with s.lock:
                s.inputs.append(r.frames)
                s.input_tags.append(r.tag)
            if s.ahead is not None and s.ahead.done():
                self.settle(s)  # the block made off the loop: its failure is raised here
            if s.ahead is None and len(s.inputs) >= self._frames_needed(s):
                inputs, tags = self._take_inputs(s)
                if self.prefetch:
                    # Off the service loop (as text blocks ahead): it keeps taking frames and
                    # pacing the output while the block is made.
                    s.ahead = self._worker.submit(self._video_block_ahead, s, inputs, tags)
                else:
                    with self._model_lock:
                        self._video_block(s, inputs, tags)
            elif len(s.inputs) > MAX_WAITING_INPUTS:
                with s.lock:  # a block is being made: keep the newest
                    del s.inputs[0], s.input_tags[0]
            if s.out:
                frame, tag, block = s.out.popleft()
                info = {"block": block, "noise_scale": s.noise_level}
                results.append(Result(s.session_id, frame, tag, info))
            else:
                results.append(Result(s.session_id, None, None, {"warming_up": True}))
        return results

    def lora_status(self) -> list[LoraAdapter]:
        return self.loras.status()

    def ready(self, state: WanState) -> list[Result]:
        """The rest of the session's made frames: its block's, and in text mode a block made
        ahead; the next one is started at once, so the model never waits for the queue."""
        s = state
        if s.mode == "text" and s.ahead is not None and s.ahead.done():
            self.settle(s)  # its frames are queued; its failure, if any, is raised here
        out = []
        while s.out:
            frame, tag, block = s.out.popleft()
            info: dict[str, Any] = {"block": block}
            if s.mode == "video":
                info["noise_scale"] = s.noise_level
            out.append(Result(s.session_id, frame, tag, info))
        if s.mode == "text" and self.prefetch and s.ahead is None and s.blocks:
            s.ahead = self._worker.submit(self._text_block_ahead, s)
        return out

    def _frames_needed(self, s: WanState) -> int:
        """Input frames for the next block."""
        return self.geometry.video_frames(self._cut_due(s) or s.stream.next_frame == 0)

    def _text_block_ahead(self, s: WanState) -> None:
        """On the worker thread: the next block."""
        s.out.extend(self._on_worker(self._text_block, s))

    def _on_worker(
        self, make: Callable[..., list[tuple[torch.Tensor, Any, int]]], *args: Any
    ) -> list[tuple[torch.Tensor, Any, int]]:
        """A block made on the worker thread: its frames on the CPU once complete, its time
        counted as model work."""
        with self._model_lock, torch.inference_mode(), self._on_worker_stream():
            started = time.monotonic()
            frames = make(*args)
            if self._worker_stream is not None:
                frames = [(f.cpu(), tag, block) for f, tag, block in frames]
            self.work_done(time.monotonic() - started)
        return frames

    def _take_inputs(self, s: WanState) -> tuple[list[torch.Tensor], list[Any]]:
        """The block's input: the newest frames it needs (older ones arrived while the last
        block was made; dropping them keeps latency down, as the ring would)."""
        needed = self._frames_needed(s)
        with s.lock:
            inputs, tags = s.inputs[-needed:], s.input_tags[-needed:]
            s.inputs.clear()
            s.input_tags.clear()
        return inputs, tags

    def _video_block_ahead(self, s: WanState, inputs: list[torch.Tensor], tags: list[Any]) -> None:
        """On the worker thread: video blocks, their frames on the CPU once complete. When the
        next block's inputs arrived while one was made (the model slower than the camera), it
        starts at once rather than at the next frame's arrival, up to a frame interval later
        every block; a settle stops the chain after the block in hand."""
        while True:
            s.out.extend(self._on_worker(self._video_frames, s, inputs, tags))
            if s.settling or len(s.inputs) < self._frames_needed(s):
                return
            inputs, tags = self._take_inputs(s)

    def _on_worker_stream(self) -> Any:
        if self._worker_stream is None:
            return nullcontext()
        return torch.cuda.stream(self._worker_stream)

    def close(self) -> None:
        self._worker.shutdown(wait=True, cancel_futures=True)

    def _latent_hw(self, s: WanState) -> tuple[int, int]:
        return latent_hw(s.height, s.width)

    def _steps(self, s: WanState) -> list[int]:
        steps = list(s.config.denoising_step_list)
        if (
            s.mode == "text"
            and isinstance(s.config, StreamDiffusionV2Config)
            and steps == StreamDiffusionV2Config().denoising_step_list
        ):
            return list(SDV2_TEXT_STEPS)
        return steps

    def _cut_due(self, s: WanState) -> bool:
        return s.pending_cut or self.loop.overflows(s.stream)

    def _start_block(self, s: WanState) -> None:
        """A due hard cut, before the block's input is encoded (the VAE starts afresh too)."""
        if s.lora_version != self.loras.version:
            # A LoRA's scale changed: the cached cross-attention used the old one; with
            # manage_cache the KV cache starts afresh too (Scope's init_cache).
            s.lora_version = self.loras.version
            s.cross = None
            if s.config.manage_cache:
                s.pending_cut = True
        if self.loop.overflows(s.stream):
            logger.info("session %s: RoPE table full, starting afresh", s.session_id)
        if self._cut_due(s):
            self.hard_cut(s)

    def _text_block(self, s: WanState) -> list[tuple[torch.Tensor, Any, int]]:
        self._start_block(s)
        latents = self._generate(s, None, None)
        return [(frame, None, s.blocks) for frame in self._decode(s, latents)]

    def _video_block(self, s: WanState, inputs: list[torch.Tensor], tags: list[Any]) -> None:
        s.out.extend(self._video_frames(s, inputs, tags))

    def _video_frames(
        self, s: WanState, inputs: list[torch.Tensor], tags: list[Any]
    ) -> list[tuple[torch.Tensor, Any, int]]:
        self._start_block(s)
        assert s.input is not None
        z, s.noise_level = s.input.encode(
            torch.stack(inputs),
            self._latent_hw(s),
            noise_scale=s.config.noise_scale,
            controller=s.config.noise_controller,
            block_frames=self.block_frames,
        )
        latents = self._generate(s, z, s.noise_level)
        return [
            (frame, tag, s.blocks)
            for frame, tag in zip(self._decode(s, latents), tags, strict=True)
        ]

    def _decode(self, s: WanState, latents: torch.Tensor) -> list[torch.Tensor]:
        assert s.output is not None
        return s.output.decode(latents)

    def _reencode(self, s: WanState) -> torch.Tensor:
        assert s.output is not None
        return s.output.reencode().to(self.device.device)

    # ------------------------------------------------------------ the model

    def _cross(self, s: WanState, emb: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if s.cross is None or s.cross[0] is not emb:
            context = emb.unsqueeze(0).to(self.device.device)
            s.cross = (emb, self.transformer.cross_kv(context))
            s.cross_computed += 1
        return s.cross[1]

    @torch.inference_mode()
    def _generate(self, s: WanState, z: torch.Tensor | None, scale: float | None) -> torch.Tensor:
        emb = s.prompt.step()
        cross = self._cross(s, emb)
        if (
            self.geometry.recache_on_prompt
            and s.cached_with is not None
            and s.cached_with is not emb
        ):
            self.loop.recache(s.stream, cross)
        s.cached_with = emb
        first_context = partial(self._reencode, s) if self.geometry.context_frames else None
        return self.loop.block(
            s.stream,
            cross,
            seed=s.config.seed,
            steps=self._steps(s),
            latent_hw=self._latent_hw(s),
            z=z,
            noise_scale=scale,
            attention_bias=float(getattr(s.config, "kv_cache_attention_bias", 1.0)),
            first_context=first_context,
        )

    def free_memory(self) -> None:
        d.free_device_memory()


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> WanPipeline:
    if load_params.split:
        from services.inference.wan.split import SplitWanPipeline

        return SplitWanPipeline(spec, load_params, models_dir)
    return WanPipeline(spec, load_params, models_dir)
