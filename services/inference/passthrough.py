"""passthrough: every input frame leaves unchanged (the latency floor; tests)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.inference.pipeline import Pipeline, PipelineSpec, Request, Result


class PassthroughPipeline(Pipeline):
    # The result is a view of the ring slot; the core copies it out before releasing the slot.
    copies_input = False

    def new_session(self, session_id: str, width: int, height: int, config: Any) -> Any:
        return {"session_id": session_id}

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        return [Result(r.session_id, r.frames, r.tag) for r in requests]


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> PassthroughPipeline:
    return PassthroughPipeline(spec)


def __getattr__(name: str) -> Any:
    # ``PassthroughCore`` was this module's service core before pipelines had a registry.
    if name == "PassthroughCore":
        from services.inference.core import InferenceCore

        return InferenceCore
    raise AttributeError(name)
