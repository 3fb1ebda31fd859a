"""The inference service (``inference/<pipeline_id>``): one loaded pipeline, many sessions.

``spec.options``: ``pipeline`` (id; default: the part of the service name after ``/``),
``load_params`` (the load-time config), ``models_dir``, and optionally ``notify`` (the service
that hears per-frame results and errors as ``StageOutput``, default ``signalling``) and
``text_fps`` (the most frames a second a text-mode session gets, default 30).

* The pipeline loads in the constructor; a failure (models not downloaded, out of memory) is an
  exception, which the runtime reports as ``ServiceFailed(reason)``.
* ``StartSession.params`` holds the session's initial parameters and ``mode`` (``video``:
  frames from the input ring; ``text``: no input, frames generated from :meth:`tick` at the
  pipeline's pace, at most ``text_fps``).
* ``UpdateParameters``: the newest value of each key wins, applied on the session's next frame.
  A value that does not validate changes nothing and is reported as an ``error`` StageOutput.
* Batching: when a frame arrives, every video session at the same resolution with a frame
  waiting joins one pipeline call; text sessions due at the same time share one call too.
* Input slots are released as soon as the pipeline has its own copy of the frame (on the
  device); a torn input is dropped before it reaches the model. Outputs (uint8, converted on
  the device) are copied once, straight into the output ring slot.
* Model calls run from :meth:`tick`, never while the inbox is drained: a ``FrameReady`` only
  marks its session, so a burst of notifications costs one call, control messages (heartbeats,
  stop) are answered between calls, and every session with a frame waiting joins the call.
* A call that runs out of device memory (``torch.cuda.OutOfMemoryError``) ends the process
  with ``ServiceFailed("out of memory in …")``: the pipeline's status becomes ``error`` with that
  text, every session gets ``stream_stopped`` with it, all device memory is given back, and a
  load at a smaller size works afterwards. Any other failing call fails only the sessions in it
  (``report_session_failure``: their clients get ``stream_stopped`` with the reason); the
  other sessions carry on.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from services import protocol as p
from services.inference.pacing import Pacer
from services.inference.pipeline import Request, Result
from services.inference.session import (
    PipelineSession,
    is_out_of_memory,
    load_pipeline,
)
from services.models.store import resolve_models_dir
from services.options import InferenceOptions
from services.runtime import Outbox, ServiceSpec
from services.stage import FrameStage, StageSession
from shm.ring import N_STAMPS, FrameMeta, ReadFrame, Stage, WriteSlot, stamp

logger = logging.getLogger(__name__)

#: A paced text session asks its pipeline for what it made this often while it has less than
#: ``PACED_HIGH_WATER_BLOCKS`` blocks waiting.
PULL_INTERVAL_S = 0.01
PACED_HIGH_WATER_BLOCKS = 3


def copy_frame(dst: np.ndarray, src: Any) -> None:
    """Copy an (H, W, 3) uint8 frame (numpy, or a CPU/CUDA tensor) into a ring slot view."""
    if isinstance(src, np.ndarray):
        np.copyto(dst, src, casting="no")
        return
    import torch

    torch.from_numpy(dst).copy_(src)


@dataclass(frozen=True, slots=True)
class Filled:
    """A frame pipeline's output in its ring slot, published if its input stayed intact."""

    slot: WriteSlot
    meta: FrameMeta
    info: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Made:
    """A frame a block pipeline made, waiting for its turn (:class:`Pacer`)."""

    frame: Any
    tag: FrameMeta | None  # video: the input's; text: None (stamped when it leaves)
    info: dict[str, Any] | None
    model_start: int
    model_end: int


@dataclass(eq=False)
class InferenceState:
    """What the inference stage keeps per session."""

    mode: p.Mode
    #: None once the session failed (its pipeline state is gone).
    session: PipelineSession | None
    started_ns: int
    next_due: float = 0.0
    generated: int = 0
    #: The last result sent to the client: a result is sent only when it changes.
    last_info: dict[str, Any] | None = None
    #: A block pipeline's made frames, let go at its production rate (None: per-frame).
    pacer: Pacer[Made] | None = None


class InferenceCore(FrameStage[InferenceState]):
    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        options = msgspec.convert(spec.options, InferenceOptions)
        pipeline_id = options.pipeline or spec.name.partition("/")[2] or "passthrough"
        self.loaded = load_pipeline(
            pipeline_id, options.load_params, resolve_models_dir(options.models_dir)
        )
        self.pipeline = self.loaded.pipeline
        self.pipeline_spec = self.loaded.spec
        self.notify = options.notify
        self.text_fps = options.text_fps
        #: Block pipelines (a causal video model: several frames a call) are paced.
        self.paced = self.pipeline_spec.frames_per_call > 1
        self.copies_input = self.pipeline.copies_input
        self.pipeline.work_done = self.calls.record
        self.failures = 0
        self._pending: set[str] = set()

    # ------------------------------------------------------------ sessions

    def new_state(
        self, session: StageSession[InferenceState], previous: InferenceState | None
    ) -> InferenceState:
        """A fresh pipeline state (StartSession again, after a restart elsewhere, starts
        afresh: the previous one was ended with its session)."""
        spec = self.pipeline_spec
        # Frames in: video. No input ring: this stage generates (text). The ``mode`` parameter
        # is the session's (every stage of a chain gets the same parameters).
        mode: p.Mode = "video" if session.input is not None else "text"
        if mode not in spec.modes:
            raise ValueError(f"mode: {spec.id} supports {', '.join(spec.modes)}, not {mode}")
        with self.calls.running(record=False):  # a split pipeline may start a stage process
            pipeline_session = PipelineSession(
                self.loaded, session.session_id, session.width, session.height, session.params
            )
        now = time.monotonic()
        return InferenceState(
            mode=mode,
            session=pipeline_session,
            started_ns=time.monotonic_ns(),
            next_due=now,
            pacer=Pacer(max_fps=self.text_fps, started=now) if self.paced else None,
        )

    def end_state(self, session: StageSession[InferenceState]) -> None:
        if session.state.session is not None:
            with self.calls.running(record=False):  # may wait for its block in flight
                session.state.session.end()

    def on_parameters(self, session: StageSession[InferenceState], changed: dict[str, Any]) -> None:
        """Merge new values (newest wins); the pipeline applies them on the next frame."""
        pipeline_session = session.state.session
        if pipeline_session is None:
            return
        try:
            # A block model waits for the session's block in flight first: a model call, as
            # far as liveness goes (heartbeats are answered meanwhile).
            with self.calls.running(record=False):
                pipeline_session.update(changed)
        except ValueError as exc:
            logger.warning("session %s: parameters refused: %s", session.session_id, exc)
            self._tell(session, "error", str(exc))

    def _tell(self, session: StageSession[InferenceState], kind: p.OutputKind, data: Any) -> None:
        self.outbox.send(
            self.notify,
            p.StageOutput(
                session_id=session.session_id, service=self.spec.name, kind=kind, data=data
            ),
        )

    # ------------------------------------------------------------ video sessions

    def drain(self, session: StageSession[InferenceState]) -> None:
        """A frame arrived: note it; :meth:`tick` runs the model once the inbox is drained, so
        heartbeats are answered between model calls and waiting sessions share a call."""
        self._pending.add(session.session_id)

    def frames_waiting(self) -> int:
        return len(self._pending) + super().frames_waiting()

    def _run_video(self) -> None:
        """Every video session with a frame waiting, one pipeline call per resolution."""
        pending, self._pending = self._pending, set()
        groups: dict[tuple[int, int], list[StageSession[InferenceState]]] = {}
        for sid in pending:
            s = self.sessions.get(sid)
            if s is None or s.input is None:
                continue
            info = s.state
            if info.mode == "video" and info.session is not None and s.input.has_new():
                groups.setdefault((s.width, s.height), []).append(s)
        for group in groups.values():
            self.drain_batch(group)

    def take(self, session: StageSession[InferenceState], frame: ReadFrame) -> Request | None:
        """The session's request for this frame (None: paused, the frame is dropped)."""
        pipeline_session = session.state.session
        assert pipeline_session is not None
        stamp(frame.stamps, Stage.INFERENCE_START)
        if pipeline_session.paused:
            return None
        prepared = self.pipeline.prepare(pipeline_session.state, frame.array)
        tag = FrameMeta(frame.frame_number, frame.pts, frame.stamps)
        return pipeline_session.request(prepared, tag)

    def step_batch(
        self, batch: list[tuple[StageSession[InferenceState], Request]]
    ) -> list[tuple[StageSession[InferenceState], Filled | list[Made]]]:
        return self._call([request for _, request in batch])

    # ------------------------------------------------------------ text sessions

    def tick(self) -> float | None:
        if self._pending:
            self._run_video()
        waits = [w for w in (self._run_text(), self._emit_paced()) if w is not None]
        return 0.0 if self._pending else (min(waits) if waits else None)

    def _run_text(self) -> float | None:
        now = time.monotonic()
        due: dict[tuple[int, int], list[StageSession[InferenceState]]] = {}
        waits: list[float] = []
        for s in self.sessions.values():
            info = s.state
            if info.mode != "text" or info.session is None or s.output is None:
                continue
            if info.session.paused:
                info.next_due = now
                continue
            if info.pacer is not None and len(info.pacer.queue) >= PACED_HIGH_WATER_BLOCKS * max(
                info.pacer.block_frames(), 1.0
            ):
                info.next_due = now + PULL_INTERVAL_S  # enough made: pull again later
                waits.append(PULL_INTERVAL_S)
            elif info.next_due <= now:
                due.setdefault((s.width, s.height), []).append(s)
            else:
                waits.append(info.next_due - now)
        for group in due.values():
            requests: list[Request] = []
            for s in group:
                info = s.state
                assert info.session is not None
                stamps = np.zeros(N_STAMPS, dtype=np.int64)
                stamp(stamps, Stage.GENERATION_START)
                stamps[Stage.INFERENCE_START] = stamps[Stage.GENERATION_START]
                pts = (int(stamps[Stage.GENERATION_START]) - info.started_ns) * 90_000 // 10**9
                tag = FrameMeta(info.generated, pts, stamps)
                requests.append(info.session.request(None, tag))
            for session, outcome in self._call(requests):
                self.commit(session, outcome, None)
            after = time.monotonic()
            for s in group:
                info = s.state
                # A paced session pulls what the model made as soon as it is there; the pacer
                # decides when each frame leaves.
                step = PULL_INTERVAL_S if info.pacer is not None else 1.0 / self.text_fps
                info.next_due = max(info.next_due + step, after)
                waits.append(info.next_due - after)
        return max(0.0, min(waits)) if waits else None

    # ------------------------------------------------------------ paced output

    def _emit_paced(self) -> float | None:
        """Publish every paced frame whose time has come; seconds until the next one."""
        if not self.paced:
            return None
        waits: list[float] = []
        for s in list(self.sessions.values()):
            pacer = s.state.pacer
            if pacer is None or s.output is None:
                continue
            if s.state.session is not None and s.state.session.paused:
                pacer.clear()  # paused: nothing more leaves, what was made is dropped
                continue
            now = time.monotonic()
            while (due := pacer.pop_due(now)) is not None:
                made, produced = due
                self._publish_made(s, made, produced)
            if (at := pacer.next_at()) is not None:
                waits.append(max(0.0, at - time.monotonic()))
        return min(waits) if waits else None

    def _publish_made(
        self, session: StageSession[InferenceState], made: Made, produced: float
    ) -> None:
        assert session.output is not None
        info = session.state
        now_ns = time.monotonic_ns()
        if made.tag is not None:  # video: the input frame's stamps
            meta = made.tag
            stamps = meta.stamps if meta.stamps is not None else np.zeros(N_STAMPS, np.int64)
        else:  # text: the frame's life starts when it was made
            stamps = np.zeros(N_STAMPS, dtype=np.int64)
            stamps[Stage.GENERATION_START] = int(produced * 1e9)
            pts = (now_ns - info.started_ns) * 90_000 // 10**9
            meta = FrameMeta(info.generated, pts, stamps)
        stamps[Stage.MODEL_START] = made.model_start
        stamps[Stage.MODEL_END] = made.model_end
        stamps[Stage.PACED] = now_ns
        width, height = int(made.frame.shape[1]), int(made.frame.shape[0])
        slot = session.output.begin(width, height)
        copy_frame(slot.array, made.frame)
        stamp(stamps, Stage.INFERENCE_END)
        self.publish(session, slot, FrameMeta(meta.frame_number, meta.pts, stamps))
        info.generated += 1
        if made.info and made.info != info.last_info and info.pacer is not None:
            info.last_info = made.info  # once a block: the block number changes
            fps = info.pacer.production_fps()
            data = {**made.info, "production_fps": round(fps, 1) if fps else None}
            self._tell(session, "fetch_output", {"frame_number": meta.frame_number, **data})

    # ------------------------------------------------------------ the call

    def _call(
        self, requests: list[Request]
    ) -> list[tuple[StageSession[InferenceState], Filled | list[Made]]]:
        """One pipeline call; what each session's result becomes (a filled output slot, or a
        block's frames for its pacer). A failing call fails its sessions and yields nothing."""
        model_start = time.monotonic_ns()
        try:
            with self.calls.running() as call:
                results = self.pipeline(requests)
                # A call that made nothing only gathered input for work off the loop (a block
                # model's first block): no measure of a call, and not one done (a wait for that
                # block then gets a first call's allowance, not 4× these calls' 0 ms).
                call.record = any(r.frame is not None for r in results)
        except Exception as exc:
            if is_out_of_memory(exc):
                # The pipeline's status becomes ``error`` with this text and the process gives
                # back every byte it held by exiting; a smaller load works afterwards.
                raise PipelineOutOfMemory(
                    f"out of memory in {self.pipeline_spec.id}: {exc}"
                ) from exc
            reason = f"{self.pipeline_spec.id} failed: {type(exc).__name__}: {exc}"
            logger.exception("pipeline call failed")
            for r in requests:
                self._fail(self.sessions[r.session_id], reason)
            self.pipeline.free_memory()
            return []
        model_end = time.monotonic_ns()
        outcomes: list[tuple[StageSession[InferenceState], Filled | list[Made]]] = []
        for res in results:
            session = self.sessions[res.session_id]
            if session.state.pacer is not None:
                outcomes.append((session, self._made(session, res, model_start, model_end)))
            elif res.frame is not None and session.output is not None:
                outcomes.append((session, self._fill(session, res, model_start, model_end)))
        return outcomes

    def _made(
        self, session: StageSession[InferenceState], res: Result, model_start: int, model_end: int
    ) -> list[Made]:
        """A block pipeline's frames: this call's and the rest of its block."""
        pipeline_session = session.state.session
        made = [res] if res.frame is not None else []
        if pipeline_session is not None:
            made += self.pipeline.ready(pipeline_session.state)
        video = session.state.mode == "video"
        return [
            Made(
                r.frame,
                r.tag if video and isinstance(r.tag, FrameMeta) else None,
                r.info,
                model_start,
                model_end,
            )
            for r in made
        ]

    def _fill(
        self, session: StageSession[InferenceState], res: Result, model_start: int, model_end: int
    ) -> Filled:
        """A frame pipeline's result, copied into the session's next output slot."""
        assert session.output is not None
        meta: FrameMeta = res.tag
        stamps = meta.stamps if meta.stamps is not None else np.zeros(N_STAMPS, dtype=np.int64)
        stamps[Stage.MODEL_START] = model_start
        stamps[Stage.MODEL_END] = model_end
        width, height = int(res.frame.shape[1]), int(res.frame.shape[0])
        slot = session.output.begin(width, height)
        copy_frame(slot.array, res.frame)
        return Filled(slot, FrameMeta(meta.frame_number, meta.pts, stamps), res.info)

    def commit(
        self,
        session: StageSession[InferenceState],
        outcome: Filled | list[Made],
        out: WriteSlot | None,
    ) -> None:
        """A block's frames join the session's pacer (:meth:`_emit_paced` lets them go); a
        filled slot is published."""
        info = session.state
        if isinstance(outcome, list):
            assert info.pacer is not None
            now = time.monotonic()
            for made in outcome:
                info.pacer.push(made, now)
            return
        assert outcome.meta.stamps is not None  # _fill gave it its stamps
        stamp(outcome.meta.stamps, Stage.INFERENCE_END)
        self.publish(session, outcome.slot, outcome.meta)
        info.generated += 1
        if outcome.info and outcome.info != info.last_info:
            info.last_info = outcome.info
            data = {"frame_number": outcome.meta.frame_number, **outcome.info}
            self._tell(session, "fetch_output", data)

    def _fail(self, session: StageSession[InferenceState], reason: str) -> None:
        pipeline_session, session.state.session = session.state.session, None
        if pipeline_session is None:
            return  # failed already
        self.failures += 1
        try:
            pipeline_session.end()
        finally:
            self.report_session_failure(session.session_id, reason)

    def loras(self) -> list[p.LoraAdapter]:
        return self.pipeline.lora_status()

    def stage_ms(self) -> dict[str, float]:
        return self.pipeline.stage_ms()

    def memory_free_bytes(self) -> int | None:
        torch = sys.modules.get("torch")  # a CPU-only pipeline never imported it
        if torch is None or not torch.cuda.is_available():
            return None
        return int(torch.cuda.mem_get_info()[0])

    def close(self) -> None:
        self.pipeline.close()


class PipelineOutOfMemory(RuntimeError):
    """A call ran out of device memory: fatal to the process (reported as ServiceFailed)."""
