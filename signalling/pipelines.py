"""What signalling needs to know about pipelines, without importing any model code.

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

    def is_overlay(self, pipeline_id: str) -> bool:
        return bool(_registry().get(pipeline_id).extra.get("stage") == "overlay")

    def fields(self, pipeline_id: str) -> set[str]:
        return {f.name for f in msgspec.structs.fields(_registry().get(pipeline_id).config)}

    def validate_for(self, pipeline_ids: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
        """Validate against a chain of pipelines: each key by the pipeline that has it."""
        if len(pipeline_ids) == 1:
            return self.validate(pipeline_ids[0], params)
        owners = {pid: self.fields(pid) for pid in pipeline_ids}
        out: dict[str, Any] = {}
        for pid, fields in owners.items():
            mine = {k: v for k, v in params.items() if k in fields}
            if mine:
                out.update(self.validate(pid, mine))
        for key in params:
            if not any(key in fields for fields in owners.values()):
                raise ParameterError(
                    f"{key}: unknown parameter for pipelines {', '.join(pipeline_ids)}"
                )
        return out

    def validate(self, pipeline_id: str, params: dict[str, Any]) -> dict[str, Any]:
        """The params converted to the pipeline's types; raises :class:`ParameterError`."""
        try:
            return dict(_registry().validate_parameters(pipeline_id, params))
        except ValueError as exc:
            raise ParameterError(str(exc)) from None
