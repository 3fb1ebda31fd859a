"""Bodies of the routes Scope's web UI calls beyond the streaming API (``studio.py``).

Field names, types and defaults are those of Daydream Scope's server (0.1 and 0.2), since its
UI replaces whole objects with what it gets and tests some keys against ``null`` exactly (a
missing ``last_close_code`` toasts "Cloud connection lost"). Where dreamwire has no such feature,
the answer is Scope's own "not available" shape.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

JsonObject = dict[str, Any]


# --- cloud -----------------------------------------------------------------------------------


class CloudStatusResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/cloud/status``: dreamwire runs everything here, so never connected."""

    connected: bool = False
    connecting: bool = False
    error: str | None = None
    webrtc_connected: bool = False
    app_id: str | None = None
    connection_id: str | None = None
    credentials_configured: bool = False
    stats: JsonObject | None = None
    last_close_code: int | None = None
    last_close_reason: str | None = None
    connect_stage: str | None = None


# --- onboarding ------------------------------------------------------------------------------


class OnboardingStatus(msgspec.Struct, kw_only=True):
    """``GET/PUT /api/v1/onboarding/status``, kept in ``onboarding.json`` in the dreamwire home."""

    completed: bool = False
    inference_mode: str | None = None
    onboarding_style: str | None = None
    referral_source: str | None = None
    use_case: str | None = None


class OnboardingUpdate(msgspec.Struct, kw_only=True):
    """A partial update: the keys given replace the stored ones."""

    completed: bool | None = None
    inference_mode: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    onboarding_style: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    referral_source: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    use_case: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


# --- logs ------------------------------------------------------------------------------------


class LogsTailResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/logs/tail``: new lines of the server log and where the next poll starts."""

    lines: list[str]
    offset: Annotated[int, msgspec.Meta(description="Byte offset for the next since_offset")]


# --- plugins, LoRAs --------------------------------------------------------------------------


class PluginPipeline(msgspec.Struct, kw_only=True):
    pipeline_id: str
    pipeline_name: str


class PluginInfo(msgspec.Struct, kw_only=True):
    """One distribution registering ``dreamwire.pipelines`` entry points."""

    name: str
    version: str | None = None
    author: str | None = None
    description: str | None = None
    source: Literal["pypi", "git", "local"] = "pypi"
    editable: bool = False
    editable_path: str | None = None
    pipelines: list[PluginPipeline] = []
    latest_version: str | None = None
    update_available: bool | None = None
    package_spec: str | None = None
    bundled: bool = False
    kind: str | None = "pipeline"
    origin: Literal["local", "cloud"] | None = "local"


class FailedPlugin(msgspec.Struct, kw_only=True):
    package_name: str
    entry_point_name: str
    error_type: str
    error_message: str


class PluginsResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/plugins``."""

    plugins: list[PluginInfo]
    total: int
    failed_plugins: list[FailedPlugin] = []


class LoraFile(msgspec.Struct, kw_only=True):
    name: str
    path: str
    size_mb: float
    folder: str | None = None
    sha256: str | None = None
    provenance: JsonObject | None = None
    read_only: bool = True


class LorasResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/loras`` (0.2) and ``GET /api/v1/lora/list`` (0.1)."""

    lora_files: list[LoraFile]


# --- input sources, nodes, workflows -----------------------------------------------------------


class InputSource(msgspec.Struct, kw_only=True):
    source_id: str
    source_name: str
    source_description: str
    available: bool


class InputSourcesResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/input-sources``: server-side sources (NDI, Spout, Syphon)."""

    input_sources: list[InputSource]


class NodePort(msgspec.Struct, kw_only=True):
    name: str
    port_type: str
    required: bool = True
    description: str = ""
    default_value: Any = None


class NodeDefinition(msgspec.Struct, kw_only=True):
    node_type_id: str
    display_name: str
    category: str
    description: str
    inputs: list[NodePort]
    outputs: list[NodePort]
    params: list[JsonObject] = []
    continuous: bool = False
    pipeline_meta: JsonObject | None = None
    plugin_name: str | None = None


class NodeDefinitionsResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/nodes/definitions``: every pipeline as a graph node type."""

    nodes: list[NodeDefinition]


class ResolutionItem(msgspec.Struct, kw_only=True):
    kind: Literal["pipeline", "node", "plugin", "lora"]
    name: str
    status: Literal["ok", "missing", "version_mismatch"]
    detail: str | None = None
    action: str | None = None
    can_auto_resolve: bool = False


class WorkflowResolutionPlan(msgspec.Struct, kw_only=True):
    """``POST /api/v1/workflow/resolve``: can this server run the workflow, and if not, why."""

    can_apply: bool
    items: list[ResolutionItem]
    warnings: list[str] = []


# --- tempo, DMX, OSC: not in dreamwire ---------------------------------------------------------


class TempoStatusResponse(msgspec.Struct, kw_only=True):
    enabled: bool = False
    source: JsonObject | None = None
    beats_per_bar: int = 4
    beat_state: JsonObject | None = None


class TempoSourcesResponse(msgspec.Struct, kw_only=True):
    sources: dict[str, JsonObject] = {}


class DmxStatusResponse(msgspec.Struct, kw_only=True):
    enabled: bool = False
    listening: bool = False
    port: int | None = None
    preferred_port: int = 6454
    host: str | None = None
    log_all_messages: bool = False
    mapping_count: int = 0


class OscStatusResponse(msgspec.Struct, kw_only=True):
    enabled: bool = False
    listening: bool = False
    port: int | None = None
    host: str | None = None
    log_all_messages: bool = False


class DmxConfigResponse(msgspec.Struct, kw_only=True):
    enabled: bool = False
    preferred_port: int = 6454
    log_all_messages: bool = False
    mappings: list[JsonObject] = []


class ControlPathsResponse(msgspec.Struct, kw_only=True):
    """``osc/paths`` and ``dmx/paths``: the parameters an OSC or DMX message could drive."""

    active: dict[str, list[JsonObject]] = {}
    available: dict[str, list[JsonObject]] = {}
    active_pipeline_ids: list[str] = []


class OscInventoryResponse(msgspec.Struct, kw_only=True):
    """How many OSC paths the server now routes: none, it has no OSC server."""

    count: int = 0


# --- keys, assets ------------------------------------------------------------------------------


class ApiKeyInfo(msgspec.Struct, kw_only=True):
    id: str
    name: str
    description: str
    is_set: bool
    source: str | None = None
    env_var: str | None = None
    key_url: str | None = None


class ApiKeysResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/keys``: the credentials dreamwire reads (from its environment)."""

    keys: list[ApiKeyInfo]


class AssetsResponse(msgspec.Struct, kw_only=True):
    """``GET /api/v1/assets``: dreamwire keeps no media library; inputs come over WebRTC."""

    assets: list[JsonObject] = []
