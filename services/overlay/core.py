"""``overlay``: draws Moondream's latest result on every frame; the model runs beside the video.

Per frame (main thread, never waiting for the model):

1. take the newest input frame; on every ``inference_interval``-th frame of the session (0, N,
   2N, …), or on the first frame after ``feature`` / the question / the object changed, copy
   it for the model (the job replaces one of this session still waiting, see
   :mod:`services.overlay.runner`);
2. collect finished inferences: a result computed for other settings than the current ones is
   discarded (never drawn, never sent); a good one becomes the session's result and goes to the
   client as ``StageOutput(kind="fetch_output", data={"feature", "frame", "result"})``; a model
   error clears the result (video continues unannotated) and goes to the client as
   ``StageOutput(kind="error")``;
3. copy the frame into the output ring, draw the result (unless older than
   ``max_result_age_s``, counted from the frame the model saw), publish, notify downstream.

Parameters: ``StartSession.params`` then ``UpdateParameters`` (newest value of each key wins;
keys of other pipelines are ignored). Client messages go to the ``signalling`` service.
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
from services import topology
from services.models.store import resolve_models_dir
from services.options import OverlayOptions
from services.overlay.config import MoondreamConfig, parse_config
from services.overlay.draw import OverlayPlan, build_plan
from services.overlay.model import FeatureRequest, VisionModel, make_model, run_feature
from services.overlay.runner import ModelJob, ModelOutcome, ModelRunner
from services.runtime import Outbox, ServiceSpec
from services.stage import FrameStage, StageSession
from shm.ring import FrameMeta, ReadFrame, Stage, WriteSlot, stamp

logger = logging.getLogger(__name__)

CLIENT_SERVICE = topology.SIGNALLING
#: How often the loop looks for finished inferences while one runs and no frame arrives.
RESULT_POLL_S = 0.01
#: The interpreter's thread switch interval in this process (CPython's default is 5 ms). A model
#: whose Python code holds the interpreter lock for long stretches made the video thread wait
#: the whole interval each time it wanted the lock back: 9.9 fps out of 30 in
#: ``scripts/bench_overlay.py --models python``; at 1 ms it keeps 30 fps.
SWITCH_INTERVAL_S = 0.001


@dataclass(slots=True)
class Result:
    key: tuple[str, ...]
    seq: int
    data: dict[str, Any]
    frame_number: int
    submitted_at: float


@dataclass(slots=True)
class OverlayState:
    """What the overlay keeps per session."""

    config: MoondreamConfig
    frames_seen: int = 0
    submitted_key: tuple[str, ...] | None = None
    result: Result | None = None
    plan: OverlayPlan | None = None
    plan_for: tuple[Any, ...] = ()
    last_error: str | None = None
    inferences: int = 0
    stale_dropped: int = 0


@dataclass(slots=True)
class Drawn:
    """A frame drawn into its output slot: published, and its due job submitted, only if the
    input frame was intact."""

    meta: FrameMeta
    job: ModelJob | None


class OverlayCore(FrameStage[OverlayState]):
    """The ``overlay`` service core: one model, any number of sessions."""

    def __init__(self, spec: ServiceSpec, outbox: Outbox, model: VisionModel | None = None) -> None:
        super().__init__(spec, outbox)
        self.options = msgspec.convert(spec.options, OverlayOptions)
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        if model is None:
            models_dir = resolve_models_dir(self.options.models_dir)
            compile_model = bool(self.options.load_params.get("compile_model", False))
            model = make_model(
                self.options.model, models_dir, compile_model, dict(self.options.model_options)
            )
        self.model = model
        self.clock = time.monotonic  # result ages; tests move it
        self._seq = 0
        self.runner = ModelRunner(self._infer, name=f"{spec.name}.model")

    def _infer(self, request: FeatureRequest, image: np.ndarray) -> dict[str, Any]:
        return run_feature(self.model, request, image)

    # ------------------------------------------------------------ sessions

    def start_session(self, msg: p.StartSession) -> None:
        if not msg.input_ring or not msg.output_ring:
            raise ValueError("overlay needs an input ring and an output ring")
        super().start_session(msg)

    def new_state(
        self, session: StageSession[OverlayState], previous: OverlayState | None
    ) -> OverlayState:
        config = parse_config(session.params)  # a bad value fails the session, naming the field
        if previous is not None:
            config = previous.config  # StartSession again (a restart): later updates are newer
        self.runner.cancel(session.session_id)
        return OverlayState(config=config)

    def end_state(self, session: StageSession[OverlayState]) -> None:
        self.runner.cancel(session.session_id)

    # ------------------------------------------------------------ messages

    def on_parameters(self, session: StageSession[OverlayState], changed: dict[str, Any]) -> None:
        """Newest value of each key wins; a bad value changes nothing and tells the client."""
        state = session.state
        try:
            config = parse_config(changed, state.config)
        except msgspec.ValidationError as exc:
            self._send(
                p.StageOutput(session.session_id, self.spec.name, "error", f"parameters: {exc}")
            )
            return
        if config.result_key() != state.config.result_key():
            state.result = None  # never draw a result of other settings
            state.plan = None
        state.config = config

    def tick(self) -> float | None:
        self.collect()
        return RESULT_POLL_S if self.runner.busy() else None

    def close(self) -> None:
        self.runner.close()
        super().close()

    # ------------------------------------------------------------ frames

    def step(
        self, session: StageSession[OverlayState], frame: ReadFrame, out: WriteSlot | None
    ) -> Drawn:
        assert out is not None
        state = session.state
        stamps = frame.stamps
        stamp(stamps, Stage.OVERLAY_START)
        job = self._schedule(session.session_id, state, frame.array, frame.frame_number)
        self.collect()
        np.copyto(out.array, frame.array, casting="no")
        plan = self._plan(state, session.width, session.height)
        if plan is not None:
            plan.draw(out.array)
        stamp(stamps, Stage.OVERLAY_END)
        return Drawn(FrameMeta(frame.frame_number, frame.pts, stamps), job)

    def commit(
        self, session: StageSession[OverlayState], outcome: Drawn, out: WriteSlot | None
    ) -> None:
        if outcome.job is not None:
            self.runner.submit(outcome.job)
        super().commit(session, outcome.meta, out)

    def on_torn(self, session: StageSession[OverlayState], outcome: Drawn) -> None:
        if outcome.job is not None:
            session.state.submitted_key = None  # the due inference happens on the next frame

    def _schedule(
        self, session_id: str, state: OverlayState, rgb: np.ndarray, frame_number: int
    ) -> ModelJob | None:
        """A job for this frame when it is due (copied now, submitted once the frame is
        known intact), else None."""
        config = state.config
        index = state.frames_seen
        state.frames_seen += 1
        key = config.result_key()
        if key == state.submitted_key and index % config.inference_interval != 0:
            return None
        state.submitted_key = key
        state.inferences += 1
        self._seq += 1
        request = FeatureRequest(
            feature=config.feature,
            caption_length=config.caption_length.value,
            question=config.question,
            detect_object=config.detect_object,
            temperature=config.temperature,
            max_objects=config.max_objects,
            max_tokens=config.max_tokens,
        )
        return ModelJob(
            session_id=session_id,
            seq=self._seq,
            key=key,
            request=request,
            image=rgb.copy(),
            frame_number=frame_number,
            submitted_at=self.clock(),
        )

    def _plan(self, state: OverlayState, width: int, height: int) -> OverlayPlan | None:
        result = state.result
        if result is None:
            return None
        max_age_s = self.options.max_result_age_s
        if max_age_s > 0 and self.clock() - result.submitted_at > max_age_s:
            state.result = None
            state.plan = None
            state.stale_dropped += 1
            return None
        config = state.config
        wanted = (result.seq, width, height, config.overlay_opacity, config.font_scale)
        if state.plan is None or state.plan_for != wanted:
            state.plan = build_plan(
                config.feature, result.data, width, height, config.overlay_opacity,
                config.font_scale,
            )  # fmt: skip
            state.plan_for = wanted
        return state.plan

    # ------------------------------------------------------------ results

    def collect(self) -> None:
        """Take finished inferences into the sessions' state and tell the clients."""
        for outcome in self.runner.poll():
            session = self.sessions.get(outcome.session_id)
            if session is not None:
                self._accept(outcome, session.state)

    def _accept(self, outcome: ModelOutcome, state: OverlayState) -> None:
        if outcome.key != state.config.result_key():
            return  # computed for settings the client has left
        if state.result is not None and state.result.seq > outcome.seq:
            return
        feature = outcome.request.feature.value
        if outcome.error is not None:
            state.result = None
            state.plan = None
            message = f"moondream {feature} failed: {outcome.error}"
            if message != state.last_error:
                state.last_error = message
                self._send(p.StageOutput(outcome.session_id, self.spec.name, "error", message))
            return
        assert outcome.result is not None
        state.last_error = None
        state.result = Result(
            key=outcome.key,
            seq=outcome.seq,
            data=outcome.result,
            frame_number=outcome.frame_number,
            submitted_at=outcome.submitted_at,
        )
        state.plan = None
        data = {"feature": feature, "frame": outcome.frame_number, "result": outcome.result}
        self._send(p.StageOutput(outcome.session_id, self.spec.name, "fetch_output", data))

    def _send(self, message: p.StageOutput) -> None:
        self.outbox.send(CLIENT_SERVICE, message)
