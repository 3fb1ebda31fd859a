"""What an ``OpenSession`` for pipelines becomes before its chain is started: whether the
pipelines can take a session at all, and the session's size, mode and parameters. Pure: from
the pipelines' states and the registry's declarations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from services import protocol as p
from services.inference import registry
from services.inference.catalog import PipelineCatalog


class NotLoaded(ValueError):
    """No pipeline can take a session now (none loaded, one still loading, one failed): Scope
    answers "load first"."""


class InvalidRequest(ValueError):
    """Fields of the client's request are wrong: ``problems``, one ``"<field>: <what>"``
    each."""

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True)
class Settled:
    width: int
    height: int
    #: The session's parameters: known keys, converted, over the loaded session settings.
    params: dict[str, Any]
    unknown: tuple[str, ...]
    load_time: tuple[str, ...]


def check_loaded(states: Sequence[p.PipelineState]) -> None:
    """A failed load and a load under way refuse a session, as Scope does."""
    if errors := [s for s in states if s.status == "error"]:
        raise NotLoaded(f"Pipeline {errors[0].pipeline_id} failed to load: {errors[0].error}")
    if any(s.status == "loading" for s in states):
        raise NotLoaded("Pipeline is still loading. Wait for status 'loaded'.")
    if not any(s.status == "loaded" for s in states):
        raise NotLoaded("Pipeline not loaded. Please load pipeline first.")


def pick_mode(pipeline_id: str, offered: Sequence[p.Mode]) -> p.Mode:
    """The first of the offer's modes the chain's first pipeline supports."""
    modes = registry.get(pipeline_id).modes
    if (mode := next((m for m in offered if m in modes), None)) is not None:
        return mode
    asked = offered[0] if offered else "video"
    raise InvalidRequest(
        f"mode: {pipeline_id} does not support "
        + ("video input" if asked == "video" else "no-input (text-to-video) sessions")
    )


def settle(
    req: p.OpenSession,
    pipeline_ids: Sequence[str],
    states: Sequence[p.PipelineState],
    catalog: PipelineCatalog,
) -> Settled:
    """The chain's first pipeline gives the size (as loaded, unless the request has one);
    the parameters are ``req.params`` over the session settings the chain's pipelines were
    loaded with (Scope's UI sends a node's settings with its load)."""
    loaded = {s.pipeline_id: s for s in states if s.status == "loaded"}
    first = pipeline_ids[0]
    load_params = loaded[first].load_params if first in loaded else {}
    width, height = req.width, req.height
    if not (width and height):
        width, height = registry.resolution(first, load_params)
    defaults: dict[str, Any] = {}
    for pid in pipeline_ids:
        if (state := loaded.get(pid)) is None:
            continue
        load_keys = set(catalog.load_keys(pid))
        for key, value in state.load_params.items():
            if key not in load_keys:
                defaults.setdefault(key, value)
    checked = catalog.sort(tuple(pipeline_ids), {**defaults, **req.params})
    if checked.errors:
        raise InvalidRequest(*checked.errors)
    # Scope's UIs repeat the load settings (height, width, vae_type) in every offer: only one
    # that differs from what the pipeline was loaded with is worth a warning.
    as_loaded = {
        k: v for pid in pipeline_ids if pid in loaded for k, v in loaded[pid].load_params.items()
    }
    load_time = tuple(
        key
        for key in checked.load_time
        if key not in as_loaded or as_loaded[key] != req.params[key]
    )
    return Settled(width, height, checked.valid, checked.unknown, load_time)
