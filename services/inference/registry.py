"""Every pipeline dreamwire knows, from Python entry points (group ``dreamwire.pipelines``).

Built-ins register the same way plugins do; until the package is reinstalled with its entry
points, the built-in list below is used as well. An entry point's value is a
:class:`~services.inference.pipeline.PipelineSpec` (or a callable returning one). A plugin
that fails to import is reported (:func:`plugin_errors`, and in :func:`schemas`) and never
breaks the others.

Torch-free: signalling imports this to answer ``/api/v1/pipelines/schemas`` and to validate
parameters from the data channel. Model code is imported only by ``PipelineSpec.load``.
"""

from __future__ import annotations

import functools
import logging
import os
from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

import msgspec

from services.inference.pipeline import MIN_DIMENSION, PipelineSpec, Transition
from services.topology import OVERLAY

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dreamwire.pipelines"
#: Declared in supervisor.config.ENVIRONMENT.
PLUGINS_ENV = "DREAMWIRE_PIPELINES"

BUILTIN: dict[str, str] = {
    "passthrough": "services.inference.specs:PASSTHROUGH",
    "streamdiffusion": "services.inference.specs:STREAMDIFFUSION",
    "dream": "services.inference.specs:DREAM",
    "testcard": "services.inference.specs:TESTCARD",
    "moondream": "services.inference.specs:MOONDREAM",
    "streamdiffusionv2": "services.inference.wan.specs:STREAMDIFFUSIONV2",
    "longlive": "services.inference.wan.specs:LONGLIVE",
    "krea-realtime-video": "services.inference.wan.specs:KREA_REALTIME_VIDEO",
}


class UnknownPipelineError(KeyError):
    def __init__(self, pipeline_id: str) -> None:
        super().__init__(pipeline_id)
        self.pipeline_id = pipeline_id

    def __str__(self) -> str:
        return f"unknown pipeline {self.pipeline_id!r}"


class ParameterError(ValueError):
    """A parameter does not fit the schema; the message is ``"<field>: <what is wrong>"``."""


def _resolve(value: str) -> PipelineSpec:
    module_name, _, attr = value.partition(":")
    obj: Any = import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, PipelineSpec):
        obj = obj()
    if not isinstance(obj, PipelineSpec):
        raise TypeError(f"{value} is a {type(obj).__name__}, not a PipelineSpec")
    return obj


@functools.cache
def _discover() -> tuple[dict[str, PipelineSpec], dict[str, str]]:
    found: dict[str, PipelineSpec] = {}
    errors: dict[str, str] = {}
    sources = [(ep.name, ep.value) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    # Plugins under development, without an installed distribution: "id=module:attr,…".
    for item in os.environ.get(PLUGINS_ENV, "").split(","):
        name, _, value = item.strip().partition("=")
        if name and value:
            sources.append((name, value))
    names = {name for name, _ in sources}
    sources += [(name, value) for name, value in BUILTIN.items() if name not in names]
    for name, value in sources:
        try:
            spec = _resolve(value)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
            logger.warning("pipeline plugin %s (%s) failed to load: %s", name, value, exc)
            continue
        if spec.id != name:
            logger.warning("pipeline entry point %s declares id %s", name, spec.id)
        found[spec.id] = spec
    return found, errors


def reload() -> None:
    """Forget what was discovered (tests, plugin installs)."""
    _discover.cache_clear()


def specs() -> dict[str, PipelineSpec]:
    return dict(_discover()[0])


def plugin_errors() -> dict[str, str]:
    """Entry point name -> error text, for plugins that could not be imported."""
    return dict(_discover()[1])


def is_known(pipeline_id: str) -> bool:
    return pipeline_id in _discover()[0]


def overlays() -> frozenset[str]:
    """The pipelines that draw on another's frames (or the camera's) in the overlay process."""
    return frozenset(
        pid for pid, spec in _discover()[0].items() if spec.extra.get("stage") == OVERLAY
    )


def get(pipeline_id: str) -> PipelineSpec:
    try:
        return _discover()[0][pipeline_id]
    except KeyError:
        raise UnknownPipelineError(pipeline_id) from None


# ---------------------------------------------------------------- schemas


def config_schema(spec: PipelineSpec) -> dict[str, Any]:
    """The config's JSON Schema, Scope style: an object schema with ``$defs`` beside its
    properties, every default filled in, ``ui`` hints per property."""
    raw = msgspec.json.schema(spec.config)
    defs: dict[str, Any] = dict(raw.get("$defs", {}))
    top = dict(defs.pop(spec.config.__name__))
    defaults = msgspec.to_builtins(spec.config())
    props = {name: dict(prop) for name, prop in top.get("properties", {}).items()}
    for name, prop in props.items():
        if name in defaults:
            prop["default"] = defaults[name]
    top["properties"] = props
    top.pop("required", None)
    if defs:
        top["$defs"] = defs
    return top


def _mode_defaults(spec: PipelineSpec, defaults: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Scope's ``mode_defaults``: the settings its UI starts each mode with. Its UI shows the
    noise controls only where ``video`` has a ``noise_scale``, and reads the step list as
    ``denoising_steps`` (it sends it back as ``denoising_step_list``)."""
    out: dict[str, dict[str, Any]] = {}
    for mode in spec.modes:
        entry: dict[str, Any] = {}
        mode_steps = spec.extra.get("mode_steps", {}).get(mode)
        if mode_steps is not None:
            entry["denoising_steps"] = list(mode_steps)
        elif "denoising_step_list" in defaults:
            entry["denoising_steps"] = defaults["denoising_step_list"]
        if mode == "video":
            for name in ("noise_scale", "noise_controller"):
                if name in defaults:
                    entry[name] = defaults[name]
        if entry:
            out[mode] = entry
    return out


def plugin_names() -> dict[str, str]:
    """Pipeline id -> the distribution that registers it, for plugins (not dreamwire's own)."""
    out: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        if dist and dist != "dreamwire":
            out[ep.name] = dist
    return out


#: A transition's default blend over time (Scope's ``default_temporal_interpolation_method``).
TEMPORAL_DEFAULT = next(
    f.default
    for f in msgspec.structs.fields(Transition)
    if f.name == "temporal_interpolation_method"
)


def schema(spec: PipelineSpec, plugin_name: str | None = None) -> dict[str, Any]:
    """One pipeline's entry of ``/api/v1/pipelines/schemas``, with every field Scope's UI reads
    (``supports_*`` flags, ``mode_defaults``, ``usage``, …) and dreamwire's own beside them."""
    defaults = msgspec.to_builtins(spec.config())
    fields = set(defaults)
    config = config_schema(spec)
    meta: dict[str, Any] = {
        "supports_prompts": "prompts" in fields,
        "default_temporal_interpolation_method": TEMPORAL_DEFAULT,
        "default_temporal_interpolation_steps": 0,
        "default_spatial_interpolation_method": defaults.get(
            "prompt_interpolation_method", "linear"
        ),
        "docs_url": spec.docs_url,
        "estimated_vram_gb": spec.estimated_vram_gb,
        "supports_lora": "loras" in fields,
        "supports_vace": False,
        "supports_cache_management": "manage_cache" in fields,
        "supports_kv_cache_bias": "kv_cache_attention_bias" in fields,
        "supports_quantization": "quantization" in fields,
        "min_dimension": MIN_DIMENSION,
        "recommended_quantization_vram_threshold": spec.recommended_quantization_vram_threshold,
        "modified": False,
        "produces_video": True,
        "produces_audio": False,
        "usage": list(spec.usage),
        "inputs": ["video"] if "video" in spec.modes else [],
        "outputs": ["video"],
        "plugin_name": plugin_name,
    }
    if mode_defaults := _mode_defaults(spec, defaults):
        meta["mode_defaults"] = mode_defaults
    return {
        "id": spec.id,
        "name": spec.name,
        "description": spec.description,
        "version": spec.version,
        "supported_modes": list(spec.modes),
        "default_mode": spec.default_mode,
        **meta,
        "default_width": spec.default_width,
        "default_height": spec.default_height,
        "frames_per_call": spec.frames_per_call,
        "requires_models": bool(spec.artifacts),
        "artifacts": [
            {"repo_id": a.repo_id, "files": list(a.patterns), "revision": a.revision}
            for a in spec.artifacts
        ],
        "load_params": sorted(load_param_names(spec, config)),
        "config_schema": config,
        **spec.extra,
    }


def load_param_names(spec: PipelineSpec, config: dict[str, Any] | None = None) -> set[str]:
    """The fields that take effect only when the pipeline loads (a change reloads it); the
    others are a session's settings, live while it streams."""
    config = config if config is not None else config_schema(spec)
    return {
        name
        for name, prop in config["properties"].items()
        if prop.get("ui", {}).get("is_load_param") or name in spec.load_only
    }


def schemas() -> dict[str, dict[str, Any]]:
    """Pipeline id -> metadata + config schema; plugins that failed carry ``error``."""
    plugins = plugin_names()
    out = {pid: schema(spec, plugins.get(pid)) for pid, spec in sorted(_discover()[0].items())}
    for name, error in plugin_errors().items():
        out.setdefault(
            name,
            {
                "id": name,
                "name": name,
                "error": error,
                "supported_modes": [],
                "config_schema": {"type": "object", "properties": {}},
            },
        )
    return out


# ---------------------------------------------------------------- validation


def _field_types(spec: PipelineSpec) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(spec.config)}


def _convert_field(name: str, typ: Any, value: Any) -> Any:
    try:
        return msgspec.convert(value, typ)
    except msgspec.ValidationError as exc:
        text = str(exc).replace(" - at `$`", "")
        raise ParameterError(f"{name}: {text.replace('`$', '`' + name)}") from None


def validate_parameters(
    pipeline_id: str, params: dict[str, Any], *, load: bool = False
) -> dict[str, Any]:
    """Check run-time parameters (data channel, ``initialParameters``) against the schema.

    Returns them converted to the schema's types as plain JSON values (defaults not added).
    Raises :class:`ParameterError` ``"<field>: <what is wrong>"`` for an unknown field, a wrong
    type, a value out of range, or a load-time field changed at run time (unless ``load``).
    """
    spec = get(pipeline_id)
    if not isinstance(params, dict):
        raise ParameterError(f"parameters: expected an object, got {type(params).__name__}")
    types = _field_types(spec)
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in types:
            raise ParameterError(f"{name}: unknown parameter for pipeline {pipeline_id}")
        if not load and name in spec.load_only:
            raise ParameterError(f"{name}: can only be set when the pipeline is loaded")
        out[name] = _convert_field(name, types[name], value)
    config = full_config(spec, out)
    return {name: msgspec.to_builtins(getattr(config, name)) for name in out}


def validate_load_params(pipeline_id: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Load parameters (``POST /api/v1/pipeline/load``): any config field is allowed."""
    return validate_parameters(pipeline_id, dict(params or {}), load=True)


def full_config(spec: PipelineSpec, params: dict[str, Any]) -> Any:
    """The whole config with defaults for what ``params`` leaves out; runs ``spec.check``."""
    try:
        config = msgspec.convert(params, spec.config)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if " - at `$." in text:
            message, _, where = text.rpartition(" - at `$.")
            field = where.rstrip("`").split(".")[0].split("[")[0]
            raise ParameterError(f"{field}: {message}") from None
        raise ParameterError(f"parameters: {text}") from None
    if spec.check is not None:
        try:
            spec.check(config)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None
    return config


def resolution(pipeline_id: str, load_params: dict[str, Any] | None = None) -> tuple[int, int]:
    """(width, height) the pipeline runs at with these load parameters."""
    spec = get(pipeline_id)
    params = load_params or {}
    width = int(params.get("width", spec.default_width))
    height = int(params.get("height", spec.default_height))
    return width, height
