"""``supervisor worker --generator pipeline:<id>``: a Dreams worker running one of dreamwire's
text-mode inference pipelines (``dream``; ``testcard`` for tests) in its own process.

Imported by :func:`dreams.worker.find_generator` only when such a generator is asked for,
so a worker of another generator never loads pipeline code.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec
import numpy as np

from dreams.generators import Generator, GeneratorFactory, Rendered, WorkerOptions
from dreams.wire import DreamState
from services.inference import registry
from services.inference.session import PipelineSession, load_pipeline
from services.models.store import resolve_models_dir

__all__ = ["PipelineGenerator", "load_params_for", "pipeline_factory"]

logger = logging.getLogger("dreams.worker")

#: A pipeline may yield no frame for a call (warming up); more calls than this without one fail.
MAX_EMPTY_CALLS = 8


class PipelineGenerator:
    """Frames from one of dreamwire's text-mode inference pipelines (``pipeline:<id>``), loaded
    and run as the inference service runs them (:mod:`services.inference.session`: the same
    load, the same per-session parameter handling), one text-mode session, one request
    without input per frame. The frame size is the worker's (``--width``/``--height``,
    overriding load params).

    The worker state drives the session: its prompt becomes the pipeline's ``prompts`` and its
    seed the ``seed`` (modulo 2**32), for pipelines that have them; a change is applied as a
    parameter update (the pipeline shows it on the next frame). A jump in the frame number
    (a state restored with 0x14) opens a new session positioned at the saved frame: pipelines
    have no seek, so the session's ``frames`` and ``keyframe_number`` counters are set where it
    has them (testcard draws ``frames``; dream walks its noise from ``keyframe_number``). The
    result's ``keyframe_number`` and ``generation_time_ms`` are reported when it has them."""

    def __init__(
        self,
        pipeline_id: str,
        width: int,
        height: int,
        *,
        load_params: Mapping[str, Any] | None = None,
        models_dir: str | None = None,
    ) -> None:
        pipeline_factory(pipeline_id)  # a text-mode pipeline
        params = load_params_for(pipeline_id, load_params, width, height)
        self.loaded = load_pipeline(pipeline_id, params, resolve_models_dir(models_dir))
        self.pipeline = self.loaded.pipeline
        self.spec = self.loaded.spec
        self._fields = self.loaded.fields
        self.width = width
        self.height = height
        self._session: PipelineSession | None = None
        self._applied: dict[str, Any] = {}
        self._next_frame = 0

    def _state_params(self, state: DreamState) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if "prompts" in self._fields:
            params["prompts"] = [{"text": state.prompt, "weight": 1.0}]
        if "seed" in self._fields:
            params["seed"] = state.seed & 0xFFFFFFFF
        return params

    def _open(self, state: DreamState, params: dict[str, Any]) -> PipelineSession:
        self._end_session()
        session = PipelineSession(self.loaded, "dreams", self.width, self.height, params)
        for attr, value in (
            ("frames", state.frame_number),
            ("keyframe_number", state.keyframe_number),
        ):
            if isinstance(getattr(session.state, attr, None), int):
                setattr(session.state, attr, value)
        self._session = session
        self._applied = params
        return session

    def render(self, state: DreamState) -> Rendered:
        params = self._state_params(state)
        session = self._session
        if session is None or state.frame_number != self._next_frame:
            session = self._open(state, params)
        elif params != self._applied:
            session.update({k: v for k, v in params.items() if self._applied.get(k) != v})
            self._applied = params
        for _ in range(MAX_EMPTY_CALLS):
            results = self.pipeline([session.request(None, state.frame_number)])
            result = next((r for r in results if r.frame is not None), None)
            if result is not None:
                break
        else:
            raise RuntimeError(f"{self.spec.id} made no frame in {MAX_EMPTY_CALLS} calls")
        frame = result.frame
        if not isinstance(frame, np.ndarray):  # a torch tensor, maybe on the GPU
            frame = frame.cpu().numpy()
        self._next_frame = state.frame_number + 1
        info = result.info or {}
        keyframe = info.get("keyframe_number")
        gen_ms = info.get("generation_time_ms")
        return Rendered(
            np.ascontiguousarray(frame),
            int(keyframe) if keyframe is not None else None,
            float(gen_ms) if gen_ms is not None else None,
        )

    def _end_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.end()

    def close(self) -> None:
        self._end_session()
        self.pipeline.close()


def pipeline_factory(pipeline_id: str) -> GeneratorFactory:
    """``--generator pipeline:<id>``; ``ValueError`` unless ``id`` is a text-mode pipeline."""
    spec = registry.specs().get(pipeline_id)
    if spec is None or "text" not in spec.modes:
        text = sorted(pid for pid, s in registry.specs().items() if "text" in s.modes)
        raise ValueError(
            f"no text-mode pipeline {pipeline_id!r} (text-mode pipelines: {', '.join(text)})"
        )

    def factory(o: WorkerOptions) -> Generator:
        return PipelineGenerator(
            pipeline_id, o.width, o.height, load_params=o.load_params, models_dir=o.models_dir
        )

    return factory


def load_params_for(
    pipeline_id: str, load_params: Mapping[str, Any] | None, width: int, height: int
) -> dict[str, Any]:
    """Validated load parameters with the worker's frame size; ``ValueError``
    (``registry.ParameterError``: ``"<field>: <what>"``) for what the pipeline refuses."""
    spec = registry.get(pipeline_id)
    fields = {f.name for f in msgspec.structs.fields(spec.config)}
    params = registry.validate_load_params(pipeline_id, dict(load_params or {}))
    size = {"width": width, "height": height}
    params.update({k: v for k, v in size.items() if k in fields})
    registry.full_config(spec, params)  # the size and cross-field checks
    return params
