"""A loaded pipeline and its sessions, as every host of a pipeline runs them: the inference
service (:mod:`services.inference.core`) and a Dreams worker (:mod:`dreams.pipeline`).

:func:`load_pipeline` validates the load parameters, loads (an out-of-memory load is a clear
error), logs where it runs, and warms a ``torch.compile``\\ d model up. A
:class:`PipelineSession` is one session of it: the parameters it was started with and those
updated since (validated against the pipeline's config, newest value of each key wins), and the
pipeline's state for it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from services.inference import registry
from services.inference.pipeline import COMPILE_ENV, Pipeline, PipelineSpec, Request

logger = logging.getLogger(__name__)

#: Session parameters that are not pipeline config.
SESSION_KEYS = frozenset({"mode"})


@dataclass(frozen=True)
class LoadedPipeline:
    pipeline: Pipeline
    spec: PipelineSpec
    #: The validated load parameters (every session starts from them).
    load_params: dict[str, Any]

    @property
    def fields(self) -> set[str]:
        """The names of the pipeline's config fields."""
        return {f.name for f in msgspec.structs.fields(self.spec.config)}


def load_pipeline(
    pipeline_id: str, load_params: Mapping[str, Any], models_dir: Path
) -> LoadedPipeline:
    """Raises ``ValueError`` naming a bad load parameter, ``RuntimeError`` when out of memory."""
    spec = registry.get(pipeline_id)
    params = registry.validate_load_params(pipeline_id, dict(load_params))
    load_config = registry.full_config(spec, params)
    started = time.monotonic()
    try:
        pipeline = spec.load(load_config, models_dir)
    except Exception as exc:
        if is_out_of_memory(exc):
            free_after_oom()
            raise RuntimeError(f"out of memory loading {pipeline_id}: {exc}") from None
        raise
    logger.info(
        "pipeline %s loaded in %.1f s on %s",
        pipeline_id,
        time.monotonic() - started,
        pipeline.device_description,
    )
    if os.environ.get(COMPILE_ENV) == "1":
        started = time.monotonic()
        warm_up(pipeline, spec, load_config)
        logger.info("%s compiled and warmed up in %.1f s", pipeline_id, time.monotonic() - started)
    return LoadedPipeline(pipeline, spec, params)


class PipelineSession:
    """One session of a loaded pipeline. ``config`` holds the parameters given so far (the
    load parameters, then the session's): what :meth:`update` merges into."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        session_id: str,
        width: int,
        height: int,
        params: Mapping[str, Any],
    ) -> None:
        spec = loaded.spec
        self.pipeline = loaded.pipeline
        self.spec = spec
        self.session_id = session_id
        self.fields = loaded.fields
        valid = registry.validate_parameters(spec.id, self.known(params), load=True)
        size = {k: v for k, v in (("width", width), ("height", height)) if k in self.fields}
        merged = {**loaded.load_params, **valid, **size}
        config = registry.full_config(spec, merged)
        self.state: Any = self.pipeline.new_session(session_id, width, height, config)
        if valid.get("lora_scales"):  # Scope's UI carries a node's last scales into the offer
            self.pipeline.update(self.state, config, {"lora_scales"})
        if "reset_cache" in self.fields:
            merged["reset_cache"] = False  # a one-shot: never carried into later updates
        self.config = {k: v for k, v in merged.items() if v is not None or k in valid}

    def known(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters this pipeline has. The same parameters go to every stage of a
        session (signalling has validated them against the session's pipelines), so others
        are not this pipeline's business."""
        unknown = sorted(set(params) - self.fields - SESSION_KEYS)
        if unknown:
            logger.debug("session %s: ignoring %s", self.session_id, ", ".join(unknown))
        return {k: v for k, v in params.items() if k in self.fields}

    def update(self, changed: Mapping[str, Any]) -> None:
        """Merge new values; the pipeline applies them on its next call. ``ValueError``
        (``"<field>: <what>"``) for a value the pipeline refuses: then nothing changes."""
        valid = registry.validate_parameters(self.spec.id, self.known(changed))
        config = registry.full_config(self.spec, {**self.config, **valid})
        self.pipeline.update(self.state, config, set(valid))
        self.config.update(valid)
        if self.config.get("reset_cache"):
            self.config["reset_cache"] = False

    @property
    def paused(self) -> bool:
        return bool(self.config.get("paused", False))

    def request(self, frames: Any, tag: Any) -> Request:
        return Request(self.session_id, self.state, frames, tag)

    def end(self) -> None:
        self.pipeline.end_session(self.state)


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


def free_after_oom() -> None:
    import gc

    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
