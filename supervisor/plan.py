"""Which services a run starts, and with what options: typed per kind (``services.options``),
turned into the plain options a :class:`ServiceConfig` carries to the process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from services import topology
from services.inference import registry
from services.options import InferenceOptions, OverlayOptions
from services.topology import Kind
from supervisor.config import Config, ServiceConfig, default_home


def service_plan(config: Config, models_dir: Path) -> list[ServiceConfig]:
    """Data-plane services first, signalling last (the API answers once all are up)."""
    pipelines = config.pipelines if config.local_pipelines else []
    plan = [svc for pid in pipelines for svc in pipeline_services(config, models_dir, pid)]
    if config.media:
        plan.append(_service(topology.DECODE, config.decode, config))
        plan.append(_service(topology.ENCODE, config.encode, config))
    plan += config.services
    if config.nodes is not None:
        plan.append(_service(topology.NODES, config.nodes, config))
    if config.node is not None:
        node = config.node
        options = {
            "name": node.name,
            "join": node.join,
            "secret_key": node.secret_key,
            "front_public_key": node.front_public_key,
            "timeout_s": node.timeout_s,
            "beat_interval_s": config.heartbeat_interval_s,
        }
        plan.append(ServiceConfig(topology.NODE_LINK, topology.NODE_LINK, options, config.restart))
    if config.signalling:
        options = {
            "host": config.host,
            "port": config.port,
            "max_sessions": config.max_sessions,
            "connect_timeout_s": config.connect_timeout_s,
            "models_dir": str(models_dir),
            "home": str(Path(config.home).expanduser() if config.home else default_home()),
            "api": msgspec.to_builtins(config.api),
            "dreams": msgspec.to_builtins(config.dreams),
            "recording": msgspec.to_builtins(config.recording),
        }
        plan.append(ServiceConfig(topology.SIGNALLING, Kind.SIGNALLING, options, config.restart))
    return plan


def _service(name: str, options: msgspec.Struct, config: Config) -> ServiceConfig:
    return ServiceConfig(name, Kind(name), msgspec.to_builtins(options), config.restart)


def pipeline_services(
    config: Config, models_dir: Path, pipeline_id: str, load_params: dict[str, Any] | None = None
) -> list[ServiceConfig]:
    """The process of a pipeline, or with ``devices`` configured one per device (a model
    pipeline; the overlay stays one process)."""
    name = topology.service_of_pipeline(pipeline_id, registry.overlays())
    kind = Kind(topology.StageAddress.parse(name).kind)
    params = dict(load_params or {})
    if kind == topology.OVERLAY:
        overlay = OverlayOptions(
            pipeline=pipeline_id, load_params=params, models_dir=str(models_dir)
        )
        if config.overlay_model:
            overlay.model = config.overlay_model
            overlay.model_options = dict(config.overlay_model_options)
        return [ServiceConfig(name, kind, _options(overlay), config.restart)]
    inference = InferenceOptions(
        pipeline=pipeline_id, load_params=params, models_dir=str(models_dir)
    )
    if not config.devices:
        return [ServiceConfig(name, kind, _options(inference), config.restart)]
    return [
        ServiceConfig(
            topology.inference_service(pipeline_id, device),
            kind,
            {**_options(inference), "device": device},
            config.restart,
        )
        for device in config.devices
    ]


def _options(options: msgspec.Struct) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(options)
    return out


def same_load(running: dict[str, Any], wanted: dict[str, Any], load_keys: list[str]) -> bool:
    """Whether a pipeline process started with ``running`` options serves a load asking for
    ``wanted``: everything equal but the load params outside ``load_keys`` (none: all count)."""

    def identity(options: dict[str, Any]) -> dict[str, Any]:
        params = dict(options.get("load_params", {}))
        if load_keys:
            params = {k: v for k, v in params.items() if k in load_keys}
        return {**options, "load_params": params}

    return identity(running) == identity(wanted)
