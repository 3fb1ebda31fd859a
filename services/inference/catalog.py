"""What signalling and the supervisor know of pipelines, without importing any model code.

Backed by the inference registry (``services.inference.registry``), which declares every
pipeline's config, modes and default size in modules that import neither torch nor diffusers.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import msgspec


class ParameterError(ValueError):
    """A parameter does not fit the pipeline's schema; the message is ``"<field>: <what>"``."""


#: Scope's session-level keys: no pipeline's parameter. dreamwire acts on ``input_mode``,
#: ``pipeline_ids``, ``graph`` and ``node_id`` (``signalling.intent``); the others steer Scope
#: features dreamwire does not have (recording, audio, tempo sync and beat quantising, output
#: sinks, server-side sources) and are ignored quietly, since Scope's frontends send them on
#: every start. A mid-stream ``input_mode`` is ignored too: a session's chain is fixed.
SESSION_KEYS = frozenset(
    {
        "input_mode",
        "pipeline_ids",
        "graph",
        "node_id",
        "recording",
        "produces_video",
        "produces_audio",
        "quantize_mode",
        "lookahead_ms",
        "beat_cache_reset_rate",
        "modulations",
        "_quantized",
        "input_source",
        "output_sinks",
        "spout_sender",
        "spout_receiver",
    }
)


@dataclass(frozen=True)
class SortedParameters:
    """What :meth:`PipelineCatalog.sort` made of a set of parameters."""

    #: Known keys, converted to the pipelines' types (plain JSON values).
    valid: dict[str, Any]
    #: Keys no pipeline of the chain has: ignored.
    unknown: tuple[str, ...]
    #: ``"<field>: <what is wrong>"`` for each known key with a bad value.
    errors: tuple[str, ...]
    #: Load-time keys sent at run time (Scope's UIs repeat height and width in the offer): the
    #: pipeline runs as it was loaded, so they are ignored and reported.
    load_time: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipelineInfo:
    pipeline_id: str
    modes: tuple[str, ...]  # "video" and/or "text"
    width: int
    height: int


def _registry() -> Any:
    return importlib.import_module("services.inference.registry")


class PipelineCatalog:
    """Schemas, modes, sizes and parameter validation for every registered pipeline."""

    def schemas(self) -> dict[str, dict[str, Any]]:
        return dict(_registry().schemas())

    def info(self, pipeline_id: str, load_params: dict[str, Any]) -> PipelineInfo:
        registry = _registry()
        spec = registry.get(pipeline_id)
        width, height = registry.resolution(pipeline_id, load_params)
        return PipelineInfo(pipeline_id, tuple(spec.modes), width, height)

    def known(self, pipeline_id: str) -> bool:
        return bool(_registry().is_known(pipeline_id))

    def overlays(self) -> frozenset[str]:
        return frozenset(_registry().overlays())

    def is_overlay(self, pipeline_id: str) -> bool:
        return pipeline_id in self.overlays()

    def load_keys(self, pipeline_id: str) -> list[str]:
        registry = _registry()
        return sorted(registry.load_param_names(registry.get(pipeline_id)))

    def fields(self, pipeline_id: str) -> set[str]:
        return {f.name for f in msgspec.structs.fields(_registry().get(pipeline_id).config)}

    def sort(
        self, pipeline_ids: tuple[str, ...], params: dict[str, Any], *, load: bool = False
    ) -> SortedParameters:
        """Scope's parameter policy for a chain of pipelines, key by key.

        A key no pipeline of the chain has is ignored (``unknown``), as Scope does: its clients
        send every setting to every pipeline; so is a load-time key at run time
        (``load_time``). A key the chain has is converted by each pipeline that has it; a wrong
        type or value is an error naming the key, and the other keys still apply.
        Session-level keys (:data:`SESSION_KEYS`) are the caller's business.
        """
        owners: dict[str, list[str]] = {}
        for pid in pipeline_ids:
            for name in self.fields(pid):
                owners.setdefault(name, []).append(pid)
        valid: dict[str, Any] = {}
        unknown: list[str] = []
        errors: list[str] = []
        load_time: list[str] = []
        registry = _registry()
        for key, value in params.items():
            if key in SESSION_KEYS:
                continue
            if key not in owners:
                unknown.append(key)
                continue
            if not load and all(key in registry.get(pid).load_only for pid in owners[key]):
                load_time.append(key)
                continue
            try:
                for pid in owners[key]:
                    converted = registry.validate_parameters(pid, {key: value}, load=load)[key]
            except ValueError as exc:
                errors.append(str(exc))
            else:
                valid[key] = converted
        return SortedParameters(valid, tuple(unknown), tuple(errors), tuple(load_time))
