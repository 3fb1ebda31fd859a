"""A causal Wan pipeline whose block loop runs as stages: VAE encode → transformer → VAE decode.

With ``split`` set at load, the inference process keeps the transformer (steps, clean pass, KV
cache, recache and Krea's rebuild) and the VAE's two ends run in stage processes of their own
(:mod:`.stages`), each on the device its placement names, with one session's causal VAE cache
apiece. A block is planned when it is posted, so the three overlap:

* video mode posts a block's input frames to the encoder as soon as they are there, up to
  :data:`VIDEO_DEPTH` blocks ahead of the transformer: block k+1 encodes while block k
  denoises;
* the transformer (the pipeline's worker thread, one block at a time) takes the block's latents
  from the encoder, denoises, posts the result to the decoder and goes on to the next block
  without waiting: block k decodes while block k+1 denoises;
* the decoder's frames come back on the stage's receiver thread and queue for the session in
  block order; text mode starts the next block while fewer than :data:`TEXT_AHEAD_BLOCKS`
  blocks' frames are queued or decoding.

Everything a block depends on is decided in the order the one-process path decides it (the cut,
the prompt step, the noise), so a session's frames are the one-process pipeline's; Krea's next
block waits for the previous block's decode, whose answer carries the re-encoded context
latent, so Krea overlaps only encode with the transformer. A stage that dies fails the sessions
whose VAE state it held (their next call raises :class:`~.stages.StageLost`); new sessions get a
new stage process.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import torch

from services.inference.pipeline import Request, Result
from services.inference.wan.ends import BlockInput, BlockOutput, context_keep, latent_hw
from services.inference.wan.pipeline import MAX_WAITING_INPUTS, WanPipeline, WanState
from services.inference.wan.specs import SplitPlacement, WanConfig
from services.inference.wan.stages import (
    Answer,
    Decode,
    Encode,
    StageConfig,
    StageLost,
    VaeStage,
)
from services.runtime import SPEC_ENV

logger = logging.getLogger(__name__)

#: Video blocks posted ahead of the transformer: the next block encodes while one denoises.
VIDEO_DEPTH = 2
#: Text mode: blocks' worth of frames queued or decoding before the next block is started.
TEXT_AHEAD_BLOCKS = 2
#: Recent per-block figures kept per stage (ms).
FIGURES = 64


@dataclass(eq=False)
class BlockPlan:
    """What was decided when a block was posted."""

    job: int  # the block's number among the session's posted blocks (its jobs' id)
    cut: bool  # the transformer's stream starts afresh with it
    stage_cut: bool  # so do the stages' VAE ends (a planned cut, or a mode change before)
    start: int  # its first latent frame
    epoch: int  # the session's life it belongs to (a mode change starts another)


@dataclass(eq=False)
class SplitState(WanState):
    stages: tuple[VaeStage, VaeStage] | None = None  # (encode, decode) this session lives on
    planned: int = 0  # the latent frame where the next posted block starts
    stage_cut: bool = False
    jobs: int = 0
    epoch: int = 0
    posted: deque[Future[None]] = field(default_factory=deque)  # the transformer's work
    decoding: Future[Answer] | None = None  # the newest block's decode (Krea's next context)
    frames_posted: int = 0  # frames the decoder owes (counted by the worker)
    frames_back: int = 0  # frames it gave (counted by the receiver)
    failure: BaseException | None = None  # a stage's, raised on the session's next call


def _run_id() -> str:
    """The supervisor's run id (its cleanup then covers the queues), else this process's."""
    raw = os.environ.get(SPEC_ENV)
    if raw:
        return str(msgspec.json.decode(raw)["run_id"])
    return f"p{os.getpid()}"


class SplitWanPipeline(WanPipeline):
    state_type = SplitState

    def _load_ends(self, load: WanConfig, models_dir: Path) -> None:
        self.placement = load.split if isinstance(load.split, SplitPlacement) else SplitPlacement()
        self._models_dir = models_dir
        self._size = (load.width, load.height)
        self._starts = 0
        self._stages_lock = threading.Lock()
        self.figures: dict[str, deque[float]] = {
            name: deque(maxlen=FIGURES) for name in ("encode", "transformer", "decode")
        }
        #: Their medians, taken once a block (read with every frame and on heartbeats).
        self._stage_ms: dict[str, float] = {}
        self.stages: list[VaeStage] = []
        try:
            for role in ("encode", "decode"):
                self.stages.append(self._start(role))
            for stage in self.stages:
                stage.wait_ready()
        except BaseException:
            self.close()
            raise
        encode, decode = self.stages
        logger.info(
            "%s split: VAE encode on %s (pid %d), transformer here on %s, decode on %s (pid %d)",
            self.spec.id,
            encode.device,
            encode.pid,
            self.device_description,
            decode.device,
            decode.pid,
        )

    def _start(self, role: str) -> VaeStage:
        """A stage process, its queues sized for blocks at the loaded size."""
        width, height = self._size
        g = self.geometry
        lat_h, lat_w = latent_hw(height, width)
        frames = max(g.video_frames(True), g.video_frames(False)) * height * width * 3
        context = self.loop.channels * lat_h * lat_w * 4  # one latent frame, float32
        latents = max(g.latents(True), g.latents(False)) * context
        sizes = (frames, latents) if role == "encode" else (latents, frames + context)
        config = StageConfig(
            "encode" if role == "encode" else "decode",
            self.spec.id,
            self.vae_type,
            str(self._models_dir),
            self.placement.encode if role == "encode" else self.placement.decode,
            self.placement.threads,
        )
        self._starts += 1
        name = f"{self.spec.id}~{role}~{os.getpid()}~{self._starts}"
        return VaeStage(config, _run_id(), name, *sizes)

    def _live_stages(self) -> tuple[VaeStage, VaeStage]:
        """The stages a new session goes to: a lost one is replaced (the sessions on it fail)."""
        with self._stages_lock:
            for i, stage in enumerate(self.stages):
                if stage.lost is not None:
                    stage.close()
                    self.stages[i] = new = self._start(stage.config.role).wait_ready()
                    logger.info("%s stage restarted on %s", stage.config.role, new.device)
            encode, decode = self.stages
            return encode, decode

    def _ends(self, width: int, height: int) -> tuple[BlockInput | None, BlockOutput | None]:
        return None, None  # in the stage processes

    def new_session(self, session_id: str, width: int, height: int, config: WanConfig) -> WanState:
        s = super().new_session(session_id, width, height, config)
        assert isinstance(s, SplitState)
        s.stages = self._live_stages()
        return s

    def prepare(self, state: WanState, rgb: Any) -> torch.Tensor:
        return torch.from_numpy(rgb).clone()  # for the encoder's queue, on the CPU

    # ------------------------------------------------------------ a session's life

    def hard_cut(self, s: WanState) -> None:
        super().hard_cut(s)
        assert isinstance(s, SplitState)
        s.stage_cut = True
        s.planned = 0

    def _init(self, s: WanState, mode: str) -> None:
        assert isinstance(s, SplitState)
        with s.lock:
            s.epoch += 1  # frames of the earlier mode still decoding are dropped
            super()._init(s, mode)

    def settle(self, s: WanState) -> None:
        """Wait for the transformer's posted blocks; a failure (the block's or a stage's) is
        raised here."""
        assert isinstance(s, SplitState)
        wait(s.posted)
        self._raise_failures(s)

    def _raise_failures(self, s: SplitState) -> None:
        while s.posted and s.posted[0].done():
            s.posted.popleft().result()
        if s.failure is not None:
            raise s.failure

    def end_session(self, state: WanState) -> None:
        s = state
        assert isinstance(s, SplitState)
        try:
            self.settle(s)
        except Exception:  # the session is over: its failed block no longer matters
            logger.debug("block of ended session %s failed", s.session_id)
        with s.lock:
            s.epoch += 1
            s.out.clear()
        for stage in s.stages or ():
            stage.end(s.session_id)
        self.hard_cut(s)
        s.inputs.clear()
        s.cross = None

    def close(self) -> None:
        super().close()
        for stage in self.stages:
            stage.close()

    # ------------------------------------------------------------ the call

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        results = []
        for r in requests:
            s = r.state
            assert isinstance(s, SplitState)
            mode = "text" if r.frames is None else "video"
            if s.mode != mode:
                self.settle(s)
                self._init(s, mode)
            self._raise_failures(s)
            if mode == "video":
                s.inputs.append(r.frames)
                s.input_tags.append(r.tag)
                if len(s.posted) < VIDEO_DEPTH and len(s.inputs) >= self._frames_needed(s):
                    self._post_video(s)
                elif len(s.inputs) > MAX_WAITING_INPUTS:
                    del s.inputs[0], s.input_tags[0]  # blocks are being made: keep the newest
            elif self._wants_text_block(s):
                self._post(s, None, None)
            if s.out:
                frame, tag, block = s.out.popleft()
                results.append(Result(s.session_id, frame, tag, self._info(s, block)))
            else:
                results.append(Result(s.session_id, None, None, {"warming_up": True}))
        return results

    def ready(self, state: WanState) -> list[Result]:
        """The session's frames back from the decoder; text mode posts its next block."""
        s = state
        assert isinstance(s, SplitState)
        out = []
        while s.out:
            frame, tag, block = s.out.popleft()
            out.append(Result(s.session_id, frame, tag, self._info(s, block)))
        if s.mode == "text" and s.failure is None and self._wants_text_block(s):
            self._post(s, None, None)
        return out

    def _info(self, s: SplitState, block: int) -> dict[str, Any]:
        info: dict[str, Any] = {"block": block, "stage_ms": self.stage_ms()}
        if s.mode == "video":
            info["noise_scale"] = s.noise_level
        return info

    def stage_ms(self) -> dict[str, float]:
        """Median ms a block spent in each stage, over its last blocks (a stage with none
        yet, text mode's encoder, is left out)."""
        return self._stage_ms

    def _wants_text_block(self, s: SplitState) -> bool:
        owed = s.frames_posted - s.frames_back
        ahead = TEXT_AHEAD_BLOCKS * self.geometry.video_frames(False)
        return not s.posted and len(s.out) + owed < ahead

    # ------------------------------------------------------------ planning

    def _cut_planned(self, s: SplitState) -> bool:
        lora_cut = s.lora_version != self.loras.version and s.config.manage_cache
        return s.pending_cut or lora_cut or self.loop.overflows_at(s.planned)

    def _frames_needed(self, s: WanState) -> int:
        """Input frames for the next block to post (blocks before it may still be made)."""
        assert isinstance(s, SplitState)
        return self.geometry.video_frames(s.planned == 0 or self._cut_planned(s))

    def _plan(self, s: SplitState) -> BlockPlan:
        """The next block's decisions, as the one-process path makes them before a block
        (``_start_block``): parameters change only between settled blocks, so deciding at
        posting time sees what the block will see."""
        cut = self._cut_planned(s)
        if s.lora_version != self.loras.version:
            s.lora_version = self.loras.version
            s.cross = None
        if cut:
            if self.loop.overflows_at(s.planned):
                logger.info("session %s: RoPE table full, starting afresh", s.session_id)
            s.planned = 0
            s.pending_cut = False
        stage_cut, s.stage_cut = cut or s.stage_cut, False
        s.jobs += 1
        plan = BlockPlan(s.jobs, cut, stage_cut, s.planned, s.epoch)
        s.planned += self.geometry.latents(s.planned == 0)
        return plan

    def _post_video(self, s: SplitState) -> None:
        inputs, tags = self._take_inputs(s)
        plan = self._plan(s)
        assert s.stages is not None
        job = Encode(
            s.session_id,
            plan.job,
            plan.stage_cut,
            self._latent_hw(s),
            s.config.noise_scale,
            s.config.noise_controller,
            self.block_frames,
            [],
        )
        encoded = s.stages[0].submit(job, [torch.stack(inputs).numpy()])
        self._post(s, encoded, tags, plan)

    def _post(
        self,
        s: SplitState,
        encoded: Future[Answer] | None,
        tags: list[Any] | None,
        plan: BlockPlan | None = None,
    ) -> None:
        plan = plan or self._plan(s)
        s.posted.append(self._worker.submit(self._transform, s, plan, encoded, tags))

    # ------------------------------------------------------------ the transformer (worker)

    def _transform(
        self,
        s: SplitState,
        plan: BlockPlan,
        encoded: Future[Answer] | None,
        tags: list[Any] | None,
    ) -> None:
        """On the worker thread: the block's latents in (noise, or the encoder's), the
        denoised ones posted to the decoder."""
        z, level = None, None
        if encoded is not None:
            answer = encoded.result()  # the encoder's; StageLost if it died
            self.figures["encode"].append(answer.ms)
            z = torch.from_numpy(answer.arrays[0]).to(self.device.device)
            level = answer.noise_level
        with self._model_lock, torch.inference_mode(), self._on_worker_stream():
            started = time.monotonic()
            if plan.cut:
                self.loop.reset(s.stream)
                s.cached_with = None
            s.noise_level = level
            latents = self._generate(s, z, level)
            g = self.geometry
            after = s.stream.next_frame
            reencode = bool(g.context_frames) and after - g.block_frames >= g.context_frames
            assert s.stages is not None
            job = Decode(
                s.session_id,
                plan.job,
                plan.stage_cut,
                s.height,
                s.width,
                context_keep(g.context_frames),
                reencode,
                [],
            )
            decoded = s.stages[1].submit(job, [latents.float().cpu().numpy()])
            frames = g.video_frames(plan.start == 0)
            s.frames_posted += frames
            s.decoding = decoded
            elapsed = time.monotonic() - started
        self.figures["transformer"].append(elapsed * 1000.0)
        self.work_done(elapsed)
        decoded.add_done_callback(partial(self._deliver, s, plan, tags, s.blocks, frames))

    def _reencode(self, s: WanState) -> torch.Tensor:
        """Krea's first context latent: it came back with the previous block's frames."""
        assert isinstance(s, SplitState) and s.decoding is not None
        return torch.from_numpy(s.decoding.result().arrays[1]).to(self.device.device)

    # ------------------------------------------------------------ the decoder's answers

    def _deliver(
        self,
        s: SplitState,
        plan: BlockPlan,
        tags: list[Any] | None,
        block: int,
        frames: int,
        decoded: Future[Answer],
    ) -> None:
        """On the decode stage's receiver thread: the block's frames join the session's queue."""
        with s.lock:
            if plan.epoch != s.epoch:
                return  # the session ended or changed mode meanwhile
            if (exc := decoded.exception()) is not None:
                s.failure = exc
                return
            answer = decoded.result()
            self.figures["decode"].append(answer.ms)
            self._stage_ms = {  # ``sorted`` copies each deque under the GIL
                name: round(statistics.median(sorted(ms)), 1)
                for name, ms in self.figures.items()
                if ms
            }
            out = torch.from_numpy(answer.arrays[0]).unbind(0)
            s.out.extend(zip(out, tags or [None] * len(out), [block] * len(out), strict=True))
            s.frames_back += frames


__all__ = ["SplitState", "SplitWanPipeline", "StageLost"]
