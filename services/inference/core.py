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
import os
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from services import protocol as p
from services.inference import registry
from services.inference.pipeline import COMPILE_ENV, Pipeline, PipelineSpec, Request, Result
from services.models.store import resolve_models_dir
from services.options import InferenceOptions
from services.runtime import Outbox, ServiceSpec
from services.stage import FrameStage, StageSession
from shm.ring import N_STAMPS, FrameMeta, ReadFrame, Stage, stamp

logger = logging.getLogger(__name__)

#: Session parameters that are not pipeline config.
SESSION_KEYS = frozenset({"mode"})


def copy_frame(dst: np.ndarray, src: Any) -> None:
    """Copy an (H, W, 3) uint8 frame (numpy, or a CPU/CUDA tensor) into a ring slot view."""
    if isinstance(src, np.ndarray):
        np.copyto(dst, src, casting="no")
        return
    import torch

    torch.from_numpy(dst).copy_(src)


def warm_up(pipeline: Pipeline, spec: PipelineSpec, load_config: Any) -> None:
    """A few calls of one throwaway session at the load size, in the pipeline's default mode.

    ``torch.compile`` compiles on a model's first calls, which takes a minute or more: made here
    (before the service is Ready, under the load timeout) rather than in a user's first frames,
    where the supervisor would take the silent process for a stuck one.
    """
    width = int(getattr(load_config, "width", spec.default_width))
    height = int(getattr(load_config, "height", spec.default_height))
    state = pipeline.new_session("warm-up", width, height, load_config)
    rng = np.random.default_rng(0)
    try:
        # Two blocks' worth and one more: calls with and without a cache, and a block ahead.
        for i in range(2 * 4 * spec.frames_per_call + 1):
            frames = None
            if spec.default_mode == "video":
                rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                frames = pipeline.prepare(state, rgb)
            pipeline([Request("warm-up", state, frames, i)])
    finally:
        pipeline.end_session(state)


def is_out_of_memory(exc: BaseException) -> bool:
    """``torch.cuda.OutOfMemoryError`` (or any ``OutOfMemoryError``), without importing torch."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


@dataclass(eq=False)
class InferenceState:
    """What the inference stage keeps per session."""

    mode: str
    config: dict[str, Any]
    pipeline_state: Any
    started_ns: int
    next_due: float = 0.0
    generated: int = 0
    failed: str | None = None
    #: The last result sent to the client: a result is sent only when it changes.
    last_info: dict[str, Any] | None = None


class InferenceCore(FrameStage[InferenceState]):
    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        options = msgspec.convert(spec.options, InferenceOptions)
        pipeline_id = options.pipeline or spec.name.partition("/")[2] or "passthrough"
        self.pipeline_spec = registry.get(pipeline_id)
        self.load_params = registry.validate_load_params(pipeline_id, options.load_params)
        load_config = registry.full_config(self.pipeline_spec, self.load_params)
        self.models_dir = resolve_models_dir(options.models_dir)
        self.notify = options.notify
        self.text_fps = options.text_fps
        started = time.monotonic()
        try:
            self.pipeline: Pipeline = self.pipeline_spec.load(load_config, self.models_dir)
        except Exception as exc:
            if is_out_of_memory(exc):
                _free_after_oom()
                raise RuntimeError(f"out of memory loading {pipeline_id}: {exc}") from None
            raise
        logger.info(
            "pipeline %s loaded in %.1f s on %s",
            pipeline_id,
            time.monotonic() - started,
            self.pipeline.device_description,
        )
        if os.environ.get(COMPILE_ENV) == "1":
            started = time.monotonic()
            warm_up(self.pipeline, self.pipeline_spec, load_config)
            logger.info(
                "%s compiled and warmed up in %.1f s", pipeline_id, time.monotonic() - started
            )
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
        mode = "video" if session.input is not None else "text"
        if mode not in spec.modes:
            raise ValueError(f"mode: {spec.id} supports {', '.join(spec.modes)}, not {mode}")
        fields = {f.name for f in msgspec.structs.fields(spec.config)}
        initial = self._known(session, session.params)
        params = registry.validate_parameters(spec.id, initial, load=True)
        size = {
            k: v for k, v in (("width", session.width), ("height", session.height)) if k in fields
        }
        merged = {**self.load_params, **params, **size}
        config = registry.full_config(spec, merged)
        state = self.pipeline.new_session(session.session_id, session.width, session.height, config)
        merged["reset_cache"] = False if "reset_cache" in fields else merged.get("reset_cache")
        merged = {k: v for k, v in merged.items() if v is not None or k in params}
        return InferenceState(
            mode=mode,
            config=merged,
            pipeline_state=state,
            started_ns=time.monotonic_ns(),
            next_due=time.monotonic(),
        )

    def end_state(self, session: StageSession[InferenceState]) -> None:
        if session.state.failed is None:
            self.pipeline.end_session(session.state.pipeline_state)

    def on_parameters(self, session: StageSession[InferenceState], changed: dict[str, Any]) -> None:
        """Merge new values (newest wins); the pipeline applies them on the next frame."""
        info = session.state
        if info.failed is not None:
            return
        spec = self.pipeline_spec
        try:
            valid = registry.validate_parameters(spec.id, self._known(session, changed))
            config = registry.full_config(spec, {**info.config, **valid})
        except ValueError as exc:
            logger.warning("session %s: parameters refused: %s", session.session_id, exc)
            self._tell(session, "error", str(exc))
            return
        self.pipeline.update(info.pipeline_state, config, set(valid))
        info.config.update(valid)
        if info.config.get("reset_cache"):
            info.config["reset_cache"] = False

    def _known(
        self, session: StageSession[InferenceState], params: dict[str, Any]
    ) -> dict[str, Any]:
        """The parameters this pipeline has. The same parameters go to every stage of a
        session (signalling has validated them against the session's pipeline), so others are
        not this stage's business."""
        fields = {f.name for f in msgspec.structs.fields(self.pipeline_spec.config)}
        unknown = sorted(set(params) - fields - SESSION_KEYS)
        if unknown:
            logger.debug("session %s: ignoring %s", session.session_id, ", ".join(unknown))
        return {k: v for k, v in params.items() if k in fields}

    def _paused(self, info: InferenceState) -> bool:
        return bool(info.config.get("paused", False))

    def _tell(self, session: StageSession[InferenceState], kind: str, data: Any) -> None:
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
            if info.mode == "video" and info.failed is None and s.input.has_new():
                groups.setdefault((s.width, s.height), []).append(s)
        for group in groups.values():
            self._run_video_group(group)

    def _run_video_group(self, group: list[StageSession[InferenceState]]) -> None:
        requests: list[Request] = []
        held: dict[str, ReadFrame] = {}
        for s in group:
            assert s.input is not None
            frame = s.input.acquire_latest()
            if frame is None:
                continue
            info = s.state
            stamps = frame.stamps
            stamp(stamps, Stage.INFERENCE_START)
            if self._paused(info):
                s.input.release(frame)
                continue
            try:
                prepared = self.pipeline.prepare(info.pipeline_state, frame.array)
            except BaseException:
                s.input.release(frame)
                raise
            if self.pipeline.copies_input:
                if not self.release(s, frame):
                    continue  # overwritten while we copied it: never reaches the model
            else:
                held[s.session_id] = frame
            tag = FrameMeta(frame.frame_number, frame.pts, stamps)
            requests.append(Request(s.session_id, info.pipeline_state, prepared, tag))
        try:
            if requests:
                self._run(requests, held)
        finally:
            for session_id, frame in held.items():  # inputs held but not turned into an output
                self.release(self.sessions[session_id], frame)

    # ------------------------------------------------------------ text sessions

    def tick(self) -> float | None:
        if self._pending:
            self._run_video()
        wait = self._run_text()
        return 0.0 if self._pending else wait

    def _run_text(self) -> float | None:
        now = time.monotonic()
        due: dict[tuple[int, int], list[StageSession[InferenceState]]] = {}
        waits: list[float] = []
        for s in self.sessions.values():
            info = s.state
            if info.mode != "text" or info.failed is not None or s.output is None:
                continue
            if self._paused(info):
                info.next_due = now
                continue
            if info.next_due <= now:
                due.setdefault((s.width, s.height), []).append(s)
            else:
                waits.append(info.next_due - now)
        for group in due.values():
            requests: list[Request] = []
            for s in group:
                info = s.state
                stamps = np.zeros(N_STAMPS, dtype=np.int64)
                stamp(stamps, Stage.GENERATION_START)
                stamps[Stage.INFERENCE_START] = stamps[Stage.GENERATION_START]
                pts = (int(stamps[Stage.GENERATION_START]) - info.started_ns) * 90_000 // 10**9
                tag = FrameMeta(info.generated, pts, stamps)
                requests.append(Request(s.session_id, info.pipeline_state, None, tag))
            self._run(requests, {})
            after = time.monotonic()
            for s in group:
                info = s.state
                info.next_due = max(info.next_due + 1.0 / self.text_fps, after)
                waits.append(info.next_due - after)
        return max(0.0, min(waits)) if waits else None

    # ------------------------------------------------------------ the call

    def _run(self, requests: list[Request], held: dict[str, ReadFrame]) -> None:
        """One pipeline call; results go to their sessions by id (``held``: inputs still in
        use, released once their output is filled)."""
        model_start = time.monotonic_ns()
        try:
            results = self.pipeline(requests)
        except Exception as exc:
            if is_out_of_memory(exc):
                # The pipeline's status becomes ``error`` with this text and the process gives
                # back every byte it held by exiting; a smaller load works afterwards.
                raise PipelineOutOfMemory(
                    f"out of memory in {self.pipeline_spec.id}: {exc}"
                ) from exc
            else:
                reason = f"{self.pipeline_spec.id} failed: {type(exc).__name__}: {exc}"
                logger.exception("pipeline call failed")
            for r in requests:
                self._fail(self.sessions[r.session_id], reason)
            self.pipeline.free_memory()
            return
        model_end = time.monotonic_ns()
        for res in results:
            if res.frame is None:
                continue
            session = self.sessions[res.session_id]
            self._publish_result(
                session, res, model_start, model_end, held.pop(res.session_id, None)
            )

    def _publish_result(
        self,
        session: StageSession[InferenceState],
        res: Result,
        model_start: int,
        model_end: int,
        held: ReadFrame | None,
    ) -> None:
        if session.output is None:
            if held is not None and session.input is not None:
                session.input.release(held)
            return
        meta: FrameMeta = res.tag
        stamps = meta.stamps if meta.stamps is not None else np.zeros(N_STAMPS, dtype=np.int64)
        stamps[Stage.MODEL_START] = model_start
        stamps[Stage.MODEL_END] = model_end
        width, height = int(res.frame.shape[1]), int(res.frame.shape[0])
        slot = session.output.begin(width, height)
        copy_frame(slot.array, res.frame)
        if held is not None and not self.release(session, held):
            return  # the input was torn while we used it: drop the output
        stamp(stamps, Stage.INFERENCE_END)
        self.publish(session, slot, FrameMeta(meta.frame_number, meta.pts, stamps))
        info = session.state
        info.generated += 1
        if res.info and res.info != info.last_info:
            info.last_info = res.info
            self._tell(session, "fetch_output", {"frame_number": meta.frame_number, **res.info})

    def _fail(self, session: StageSession[InferenceState], reason: str) -> None:
        info = session.state
        if info.failed is not None:
            return
        info.failed = reason
        self.failures += 1
        try:
            self.pipeline.end_session(info.pipeline_state)
        finally:
            info.pipeline_state = None
            self.report_session_failure(session.session_id, reason)

    def close(self) -> None:
        self.pipeline.close()


class PipelineOutOfMemory(RuntimeError):
    """A call ran out of device memory: fatal to the process (reported as ServiceFailed)."""


def _free_after_oom() -> None:
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
