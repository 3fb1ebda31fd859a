"""The routes Scope's web UI calls besides streaming: cloud, onboarding, logs, plugins, LoRAs,
input sources, graph nodes, workflows, tempo/DMX/OSC, keys, assets.

Each tells the truth about this server in the shape Scope's UI expects (``studio_types.py``):
no cloud relay, the real log, the installed pipeline plugins, the LoRA files in the models
directory, the pipelines as graph nodes, whether a workflow's pipelines are here. Features Scope
has and dreamwire does not (tempo sync, DMX, OSC, server-side NDI/Spout/Syphon sources) answer
Scope's own "not available" shape rather than 404, which its UI would read as an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from importlib.metadata import Distribution, distributions
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from services.inference import registry
from signalling.api.errors import BadRequest, NotSupported
from signalling.api.loras import list_loras, lora_operations
from signalling.api.openapi import Operation, QueryParam, Resp
from signalling.api.state import StudioState, api_state, decode_body, guarded, json_response
from signalling.api.studio_types import (
    ApiKeyInfo,
    ApiKeysResponse,
    AssetsResponse,
    CloudStatusResponse,
    ControlPathsResponse,
    DmxConfigResponse,
    DmxStatusResponse,
    FailedPlugin,
    InputSource,
    InputSourcesResponse,
    LogsTailResponse,
    LorasResponse,
    NodeDefinition,
    NodeDefinitionsResponse,
    NodePort,
    OnboardingStatus,
    OnboardingUpdate,
    OscInventoryResponse,
    OscStatusResponse,
    PluginInfo,
    PluginPipeline,
    PluginsResponse,
    ResolutionItem,
    TempoSourcesResponse,
    TempoStatusResponse,
    WorkflowResolutionPlan,
)
from signalling.api.types import ErrorResponse
from signalling.connections import event_stream_slot

logger = logging.getLogger(__name__)

ONBOARDING_FILE = "onboarding.json"
#: ``logs/tail`` reads at most this much of the log per poll.
LOG_TAIL_MAX_BYTES = 256 * 1024
LOG_TAIL_MAX_LINES = 1000
#: An idle SSE stream sends a comment this often, so proxies keep it open.
SSE_KEEPALIVE_S = 15.0


def _studio(request: web.Request) -> StudioState:
    return api_state(request).studio


# --- cloud -----------------------------------------------------------------------------------


async def cloud_status(request: web.Request) -> web.StreamResponse:
    return json_response(CloudStatusResponse())


async def cloud_connect(request: web.Request) -> web.StreamResponse:
    raise NotSupported("dreamwire has no cloud relay: its pipelines run on this server's own GPU")


async def cloud_disconnect(request: web.Request) -> web.StreamResponse:
    return json_response(CloudStatusResponse())


# --- onboarding ------------------------------------------------------------------------------

_ONBOARDING = msgspec.json.Decoder(OnboardingStatus)


def _read_onboarding(home: Path | None) -> OnboardingStatus:
    if home is None:
        return OnboardingStatus()
    try:
        return _ONBOARDING.decode((home / ONBOARDING_FILE).read_bytes())
    except FileNotFoundError:
        return OnboardingStatus()
    except (OSError, msgspec.DecodeError) as exc:
        logger.warning("onboarding: ignoring unreadable %s: %s", home / ONBOARDING_FILE, exc)
        return OnboardingStatus()


async def onboarding_status(request: web.Request) -> web.StreamResponse:
    return json_response(_read_onboarding(_studio(request).home))


async def update_onboarding(request: web.Request) -> web.StreamResponse:
    update = await decode_body(request, msgspec.json.Decoder(OnboardingUpdate))
    home = _studio(request).home
    merged = msgspec.structs.replace(
        _read_onboarding(home),
        **{k: v for k, v in msgspec.structs.asdict(update).items() if v is not None},
    )
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
        tmp = home / f".{ONBOARDING_FILE}.{os.getpid()}"
        tmp.write_bytes(msgspec.json.encode(merged))
        tmp.replace(home / ONBOARDING_FILE)
    return json_response(merged)


# --- logs ------------------------------------------------------------------------------------


def _int_query(request: web.Request, name: str, low: int, high: int) -> int | None:
    """The integer query value ``name`` (None when absent or empty)."""
    raw = request.query.get(name, "")
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"`{name}` must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"`{name}` must be between {low} and {high}, got {value}")
    return value


def tail_log(path: Path | None, lines: int, since: int | None) -> LogsTailResponse:
    """The log's complete lines after byte ``since`` (or its last ``lines``), and the offset
    where the next poll starts. A log shorter than ``since`` was replaced: read it anew."""
    if path is None:
        return LogsTailResponse(lines=[], offset=0)
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = 0 if since is None or since > size else since
            start = max(start, size - LOG_TAIL_MAX_BYTES)
            f.seek(start)
            data = f.read(size - start)
    except FileNotFoundError:
        return LogsTailResponse(lines=[], offset=0)
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
    text = data[:end].decode("utf-8", "replace").splitlines()
    if start > 0 and (since is None or start != since):
        text = text[1:]  # began mid-line
    return LogsTailResponse(lines=text[-lines:], offset=start + end)


async def logs_tail(request: web.Request) -> web.StreamResponse:
    lines = _int_query(request, "lines", 1, LOG_TAIL_MAX_LINES) or 200
    since = _int_query(request, "since_offset", 0, 2**62)
    result = await asyncio.to_thread(tail_log, _studio(request).log_file, lines, since)
    return json_response(result)


async def logs_current(request: web.Request) -> web.StreamResponse:
    path = _studio(request).log_file
    if path is None or not path.exists():
        raise web.HTTPNotFound(text="no server log")
    return web.FileResponse(
        path,
        headers={
            "Content-Type": "text/plain; charset=utf-8",
            "Content-Disposition": 'attachment; filename="dreamwire.log"',
        },
    )


# --- plugins, LoRAs --------------------------------------------------------------------------


def _source(dist: Distribution) -> tuple[str, bool, str | None]:
    """(pypi | git | local, editable, its directory) from the install's direct_url.json."""
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        direct = {}
    url = str(direct.get("url", ""))
    editable = bool(direct.get("dir_info", {}).get("editable", False))
    path = url.removeprefix("file://") if url.startswith("file://") else None
    if "vcs_info" in direct:
        return "git", editable, path
    return ("local" if path else "pypi"), editable, path if editable else None


def list_plugins() -> PluginsResponse:
    """Distributions with ``dreamwire.pipelines`` entry points, and those that failed."""
    specs = registry.specs()
    errors = registry.plugin_errors()
    plugins: list[PluginInfo] = []
    failed: list[FailedPlugin] = []
    for dist in distributions():
        eps = [ep for ep in dist.entry_points if ep.group == registry.ENTRY_POINT_GROUP]
        if not eps:
            continue
        name = dist.metadata["Name"]
        source, editable, path = _source(dist)
        plugins.append(
            PluginInfo(
                name=name,
                version=dist.version,
                author=dist.metadata["Author"] or dist.metadata["Author-email"],
                description=dist.metadata["Summary"],
                source=source,  # type: ignore[arg-type]
                editable=editable,
                editable_path=path,
                pipelines=[
                    PluginPipeline(pipeline_id=ep.name, pipeline_name=specs[ep.name].name)
                    for ep in eps
                    if ep.name in specs
                ],
                bundled=name == "dreamwire",
            )
        )
        for ep in eps:
            if ep.name in errors:
                kind, _, message = errors[ep.name].partition(": ")
                failed.append(
                    FailedPlugin(
                        package_name=name,
                        entry_point_name=ep.name,
                        error_type=kind,
                        error_message=message,
                    )
                )
    return PluginsResponse(plugins=plugins, total=len(plugins), failed_plugins=failed)


async def plugins(request: web.Request) -> web.StreamResponse:
    return json_response(await asyncio.to_thread(list_plugins))


async def install_plugin(request: web.Request) -> web.StreamResponse:
    raise NotSupported(
        "dreamwire installs pipeline plugins with pip (entry point group dreamwire.pipelines), "
        "then a restart"
    )


# --- input sources, nodes, workflows -----------------------------------------------------------

_SERVER_SOURCES = (
    ("ndi", "NDI", "NDI video over the network"),
    ("spout", "Spout", "Spout texture sharing (Windows)"),
    ("syphon", "Syphon", "Syphon texture sharing (macOS)"),
)


async def input_sources(request: web.Request) -> web.StreamResponse:
    sources = [
        InputSource(
            source_id=sid,
            source_name=name,
            source_description=f"{what}: not in dreamwire, whose input is the browser's "
            "camera or file over WebRTC",
            available=False,
        )
        for sid, name, what in _SERVER_SOURCES
    ]
    return json_response(InputSourcesResponse(input_sources=sources))


def node_definition(pipeline_id: str, meta: dict[str, Any]) -> NodeDefinition:
    """A pipeline as Scope 0.2's graph editor sees it: stream ports and its schema entry."""
    inputs = [NodePort(name=port, port_type="video") for port in meta.get("inputs", [])]
    if meta.get("supports_prompts"):
        inputs.append(NodePort(name="prompts", port_type="string"))
    return NodeDefinition(
        node_type_id=pipeline_id,
        display_name=str(meta.get("name", pipeline_id)),
        category="pipeline",
        description=str(meta.get("description", "")),
        inputs=inputs,
        outputs=[NodePort(name=port, port_type="video") for port in meta.get("outputs", [])],
        pipeline_meta={k: v for k, v in meta.items() if k != "plugin_name"},
        plugin_name=meta.get("plugin_name"),
    )


async def node_definitions(request: web.Request) -> web.StreamResponse:
    schemas = await api_state(request).backend.pipeline_schemas()
    nodes = [node_definition(pid, meta) for pid, meta in schemas.items() if "error" not in meta]
    return json_response(NodeDefinitionsResponse(nodes=nodes))


class WorkflowLora(msgspec.Struct):
    filename: str | None = None


class WorkflowEntry(msgspec.Struct):
    """A node or pipeline of a ``.scope-workflow`` (other keys are Scope's, ignored here)."""

    pipeline_id: str | None = None
    node_type_id: str | None = None
    loras: list[WorkflowLora] | None = None


class Workflow(msgspec.Struct):
    nodes: list[WorkflowEntry] | None = None
    pipelines: list[WorkflowEntry] | None = None


_WORKFLOW = msgspec.json.Decoder(Workflow)


def resolve_workflow(
    workflow: Workflow, schemas: dict[str, dict[str, Any]], loras: LorasResponse
) -> WorkflowResolutionPlan:
    """Which of a ``.scope-workflow``'s pipelines, node types and LoRAs this server has."""
    entries = [*(workflow.nodes or []), *(workflow.pipelines or [])]
    items: list[ResolutionItem] = []
    seen: set[tuple[str, str]] = set()
    have_loras = {f.name for f in loras.lora_files} | {Path(f.path).name for f in loras.lora_files}
    for entry in entries:
        pid = entry.pipeline_id or entry.node_type_id
        if pid is not None and ("pipeline", pid) not in seen:
            seen.add(("pipeline", pid))
            if pid in schemas and "error" not in schemas[pid]:
                items.append(ResolutionItem(kind="pipeline", name=pid, status="ok"))
            elif entry.pipeline_id is None:
                items.append(
                    ResolutionItem(
                        kind="node",
                        name=pid,
                        status="missing",
                        detail=f"dreamwire has no node type {pid!r}: it runs linear chains "
                        "of pipelines",
                    )
                )
            else:
                items.append(
                    ResolutionItem(
                        kind="pipeline",
                        name=pid,
                        status="missing",
                        detail=f"Pipeline {pid!r} is not installed on this server "
                        f"(available: {', '.join(sorted(schemas))})",
                    )
                )
        for lora in entry.loras or []:
            name = lora.filename
            if name is not None and ("lora", name) not in seen:
                seen.add(("lora", name))
                ok = name in have_loras or Path(name).stem in have_loras
                items.append(
                    ResolutionItem(
                        kind="lora",
                        name=name,
                        status="ok" if ok else "missing",
                        detail=None if ok else f"put {name} in the models directory's loras/",
                    )
                )
    warnings = [] if items else ["the workflow names no pipeline"]
    return WorkflowResolutionPlan(
        can_apply=bool(items) and all(i.status == "ok" for i in items),
        items=items,
        warnings=warnings,
    )


async def workflow_resolve(request: web.Request) -> web.StreamResponse:
    workflow = await decode_body(request, _WORKFLOW)
    schemas = await api_state(request).backend.pipeline_schemas()
    found = await asyncio.to_thread(list_loras, _studio(request).models_dir)
    return json_response(resolve_workflow(workflow, schemas, found))


# --- tempo, DMX, OSC -------------------------------------------------------------------------


async def tempo_status(request: web.Request) -> web.StreamResponse:
    return json_response(TempoStatusResponse())


async def tempo_sources(request: web.Request) -> web.StreamResponse:
    return json_response(TempoSourcesResponse())


async def dmx_status(request: web.Request) -> web.StreamResponse:
    return json_response(DmxStatusResponse())


async def dmx_config(request: web.Request) -> web.StreamResponse:
    return json_response(DmxConfigResponse())


async def dmx_paths(request: web.Request) -> web.StreamResponse:
    return json_response(ControlPathsResponse())


async def osc_paths(request: web.Request) -> web.StreamResponse:
    return json_response(ControlPathsResponse())


async def osc_status(request: web.Request) -> web.StreamResponse:
    return json_response(OscStatusResponse())


async def osc_inventory(request: web.Request) -> web.StreamResponse:
    await decode_body(request, msgspec.json.Decoder(dict[str, Any]))
    return json_response(OscInventoryResponse())


async def osc_stream(request: web.Request) -> web.StreamResponse:
    """Scope's OSC command stream: open, with keepalives only (no OSC server here)."""
    with event_stream_slot(request):
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        with contextlib.suppress(ConnectionResetError, asyncio.CancelledError):
            while True:
                await response.write(b": keepalive\n\n")
                await asyncio.sleep(SSE_KEEPALIVE_S)
        return response


# --- keys, assets ------------------------------------------------------------------------------


async def api_keys(request: web.Request) -> web.StreamResponse:
    token = os.environ.get("HF_TOKEN")
    keys = [
        ApiKeyInfo(
            id="huggingface",
            name="Hugging Face",
            description="Token for gated model repositories (set HF_TOKEN before starting)",
            is_set=bool(token),
            source="env" if token else None,
            env_var="HF_TOKEN",
            key_url="https://huggingface.co/settings/tokens",
        )
    ]
    return json_response(ApiKeysResponse(keys=keys))


async def assets(request: web.Request) -> web.StreamResponse:
    return json_response(AssetsResponse())


# --- the route table -------------------------------------------------------------------------


def _ok(description: str, body: Any) -> dict[int, Resp]:
    return {200: Resp(description, body)}


NOT_HERE = {400: Resp("Not something dreamwire does (the detail says why)", ErrorResponse)}


def studio_operations() -> list[Operation]:
    """The routes of Scope's UI beyond streaming, documented like the others."""
    ui = "scope-ui"
    operations = [
        Operation(
            "GET",
            "/api/v1/cloud/status",
            cloud_status,
            "Cloud relay status: never connected (pipelines run here)",
            ui,
            responses=_ok("Status", CloudStatusResponse),
        ),
        Operation(
            "POST",
            "/api/v1/cloud/connect",
            cloud_connect,
            "Connect to a cloud relay: not in dreamwire",
            ui,
            responses=NOT_HERE,
        ),
        Operation(
            "POST",
            "/api/v1/cloud/disconnect",
            cloud_disconnect,
            "Disconnect from the cloud relay (never connected)",
            ui,
            responses=_ok("Status", CloudStatusResponse),
        ),
        Operation(
            "GET",
            "/api/v1/onboarding/status",
            onboarding_status,
            "The UI's onboarding answers, kept in the dreamwire home",
            ui,
            responses=_ok("Stored answers", OnboardingStatus),
        ),
        Operation(
            "PUT",
            "/api/v1/onboarding/status",
            update_onboarding,
            "Store onboarding answers (the keys given replace the stored ones)",
            ui,
            request=OnboardingUpdate,
            responses=_ok("Stored answers", OnboardingStatus),
        ),
        Operation(
            "GET",
            "/api/v1/logs/tail",
            logs_tail,
            "The server log's lines after a byte offset (every process of the run)",
            ui,
            query=(
                QueryParam(
                    "lines",
                    "At most this many lines (default 200)",
                    False,
                    {"type": "integer", "minimum": 1, "maximum": LOG_TAIL_MAX_LINES},
                ),
                QueryParam(
                    "since_offset",
                    "Byte offset the last answer gave",
                    False,
                    {"type": "integer", "minimum": 0},
                ),
            ),
            responses=_ok("Lines and the next offset", LogsTailResponse),
        ),
        Operation(
            "GET",
            "/api/v1/logs/current",
            logs_current,
            "The whole server log, as a download",
            ui,
            responses={200: Resp("The log", str, "text/plain"), 404: Resp("No log", ErrorResponse)},
        ),
        Operation(
            "GET",
            "/api/v1/plugins",
            plugins,
            "Installed pipeline plugins (dreamwire.pipelines entry points) and failed ones",
            ui,
            responses=_ok("Plugins", PluginsResponse),
        ),
        Operation(
            "POST",
            "/api/v1/plugins",
            install_plugin,
            "Install a plugin: not from the UI (pip install, then restart)",
            ui,
            responses=NOT_HERE,
        ),
        *lora_operations(ui),
        Operation(
            "GET",
            "/api/v1/input-sources",
            input_sources,
            "Server-side video sources (NDI, Spout, Syphon): none in dreamwire",
            ui,
            responses=_ok("Sources", InputSourcesResponse),
        ),
        Operation(
            "GET",
            "/api/v1/nodes/definitions",
            node_definitions,
            "Every pipeline as a node type of Scope 0.2's graph editor",
            ui,
            responses=_ok("Node types", NodeDefinitionsResponse),
        ),
        Operation(
            "POST",
            "/api/v1/workflow/resolve",
            workflow_resolve,
            "Whether this server has a workflow's pipelines and LoRAs",
            ui,
            request=dict[str, Any],
            responses=_ok("The plan", WorkflowResolutionPlan),
        ),
        Operation(
            "GET",
            "/api/v1/tempo/status",
            tempo_status,
            "Tempo sync: not in dreamwire (Scope's disabled shape)",
            ui,
            responses=_ok("Disabled", TempoStatusResponse),
        ),
        Operation(
            "GET",
            "/api/v1/tempo/sources",
            tempo_sources,
            "Tempo sources: none",
            ui,
            responses=_ok("None", TempoSourcesResponse),
        ),
        Operation(
            "GET",
            "/api/v1/dmx/status",
            dmx_status,
            "DMX input: not in dreamwire (Scope's disabled shape)",
            ui,
            responses=_ok("Disabled", DmxStatusResponse),
        ),
        Operation(
            "GET",
            "/api/v1/dmx/config",
            dmx_config,
            "DMX mappings: none (no DMX input)",
            ui,
            responses=_ok("Disabled", DmxConfigResponse),
        ),
        Operation(
            "GET",
            "/api/v1/dmx/paths",
            dmx_paths,
            "Parameters DMX could drive: none",
            ui,
            responses=_ok("None", ControlPathsResponse),
        ),
        Operation(
            "GET",
            "/api/v1/osc/paths",
            osc_paths,
            "Parameters OSC could drive: none",
            ui,
            responses=_ok("None", ControlPathsResponse),
        ),
        Operation(
            "GET",
            "/api/v1/osc/status",
            osc_status,
            "OSC input: not in dreamwire (Scope's disabled shape)",
            ui,
            responses=_ok("Disabled", OscStatusResponse),
        ),
        Operation(
            "POST",
            "/api/v1/osc/inventory",
            osc_inventory,
            "The UI's OSC paths: accepted, none routed (no OSC server)",
            ui,
            request=dict[str, Any],
            responses=_ok("Paths routed", OscInventoryResponse),
        ),
        Operation(
            "GET",
            "/api/v1/osc/stream",
            osc_stream,
            "OSC commands as server-sent events: keepalives only",
            ui,
            responses={200: Resp("Event stream", str, "text/event-stream")},
            streams=True,
        ),
        Operation(
            "GET",
            "/api/v1/keys",
            api_keys,
            "Credentials dreamwire reads from its environment",
            ui,
            responses=_ok("Keys", ApiKeysResponse),
        ),
        Operation(
            "GET",
            "/api/v1/assets",
            assets,
            "Media library: none (inputs come over WebRTC)",
            ui,
            query=(
                QueryParam(
                    "type", "image | video | audio", False, {"enum": ["image", "video", "audio"]}
                ),
            ),
            responses=_ok("Assets", AssetsResponse),
        ),
    ]
    return [dataclasses.replace(op, handler=guarded(op.handler)) for op in operations]
