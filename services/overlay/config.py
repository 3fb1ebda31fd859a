"""The ``moondream`` pipeline config: fields, defaults, bounds, UI hints and JSON Schema.

The fields, defaults, bounds, order and categories are those of Scope's Moondream plugin
(``../shared/reference/scope-moondream-interface.md``): ``configuration`` fields render in the
Settings panel, ``input`` fields in Input & Controls. :func:`config_json_schema` produces the
schema in the shape Pydantic's ``model_json_schema()`` gives Scope's frontend (enums as
``$defs`` referenced by ``$ref``, ``minimum``/``maximum``, ``default``, and the ``ui`` key that
``ui_field_config`` builds), so the web page renders the settings with no special code.

Importable without torch, transformers or Pillow: the inference registry imports it to list
schemas.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar, Literal

import msgspec

PIPELINE_ID = "moondream"


class MoondreamFeature(enum.Enum):
    """Available Moondream vision features."""

    CAPTION = "caption"
    QUERY = "query"
    DETECT = "detect"
    POINT = "point"


class CaptionLength(enum.Enum):
    """Caption detail level."""

    SHORT = "short"
    NORMAL = "normal"
    LONG = "long"


def ui_field_config(
    *,
    order: int,
    label: str,
    category: Literal["configuration", "input"] = "configuration",
    is_load_param: bool = False,
) -> dict[str, Any]:
    """The ``ui`` key of a property, as Scope's ``ui_field_config`` builds it."""
    return {
        "ui": {"category": category, "is_load_param": is_load_param, "order": order, "label": label}
    }


def _field(
    title: str,
    description: str,
    ui: dict[str, Any],
    ge: float | None = None,
    le: float | None = None,
) -> msgspec.Meta:
    return msgspec.Meta(ge=ge, le=le, title=title, description=description, extra_json_schema=ui)


class MoondreamConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Configuration for the Moondream vision language model pipeline."""

    pipeline_id: ClassVar[str] = PIPELINE_ID
    pipeline_name: ClassVar[str] = "Moondream"
    pipeline_description: ClassVar[str] = (
        "Vision language model: image captioning, visual Q&A, object detection, and point "
        "localization"
    )
    pipeline_version: ClassVar[str] = "0.1.0"
    docs_url: ClassVar[str] = "https://docs.moondream.ai/transformers/"
    estimated_vram_gb: ClassVar[float] = 3.0

    # --- Configuration fields (Settings panel) ---
    feature: Annotated[
        MoondreamFeature,
        _field(
            "Feature",
            "Vision feature to run on each frame",
            ui_field_config(order=1, label="Feature"),
        ),
    ] = MoondreamFeature.DETECT
    caption_length: Annotated[
        CaptionLength,
        _field(
            "Caption Length",
            "Detail level for generated captions. Only used when Feature is set to 'caption'",
            ui_field_config(order=2, label="Caption Length (caption)"),
        ),
    ] = CaptionLength.NORMAL
    temperature: Annotated[
        float,
        _field(
            "Temperature",
            "Sampling temperature for caption and query text generation",
            ui_field_config(order=3, label="Temperature (caption/query)"),
            ge=0.0,
            le=1.0,
        ),
    ] = 0.5
    max_objects: Annotated[
        int,
        _field(
            "Max Objects",
            "Maximum number of objects to find. Only used when Feature is set to 'detect' or "
            "'point'",
            ui_field_config(order=4, label="Max Objects (detect/point)"),
            ge=1,
            le=50,
        ),
    ] = 10
    inference_interval: Annotated[
        int,
        _field(
            "Inference Interval",
            "Run inference every N frames (higher = faster but less responsive)",
            ui_field_config(order=5, label="Inference Interval"),
            ge=1,
            le=30,
        ),
    ] = 1
    overlay_opacity: Annotated[
        float,
        _field(
            "Overlay Opacity",
            "Opacity of annotation overlays on the video",
            ui_field_config(order=6, label="Overlay Opacity"),
            ge=0.0,
            le=1.0,
        ),
    ] = 0.8
    font_scale: Annotated[
        float,
        _field(
            "Font Scale",
            "Text size multiplier for overlay labels",
            ui_field_config(order=7, label="Font Scale"),
            ge=0.5,
            le=3.0,
        ),
    ] = 1.0
    compile_model: Annotated[
        bool,
        _field(
            "Compile Model",
            "Compile model on load for faster inference (slower startup)",
            ui_field_config(order=8, label="Compile Model", is_load_param=True),
        ),
    ] = False

    # dreamwire's addition: Scope's plugin leaves Moondream's 768-token default.
    max_tokens: Annotated[
        int,
        _field(
            "Max Tokens",
            "Longest caption or answer, in tokens (Moondream's own default, 768, takes seconds "
            "per result on live video)",
            ui_field_config(order=9, label="Max Tokens (caption/query)"),
            ge=1,
            le=1024,
        ),
    ] = 128

    # --- Input fields (Input & Controls panel) ---
    question: Annotated[
        str,
        _field(
            "Question",
            "Question to ask about the video frame. Only used when Feature is set to 'query'",
            ui_field_config(order=1, label="Question (query)", category="input"),
        ),
    ] = "What is in this image?"
    detect_object: Annotated[
        str,
        _field(
            "Detect Object",
            "Object to find in the frame. Only used when Feature is set to 'detect' or 'point'",
            ui_field_config(order=2, label="Object (detect/point)", category="input"),
        ),
    ] = "person"

    def result_key(self) -> tuple[str, ...]:
        """What a result depends on: a change here invalidates the cached result."""
        match self.feature:
            case MoondreamFeature.CAPTION:
                return (self.feature.value, self.caption_length.value, str(self.max_tokens))
            case MoondreamFeature.QUERY:
                return (self.feature.value, self.question, str(self.max_tokens))
            case _:
                return (self.feature.value, self.detect_object)


FIELD_NAMES: frozenset[str] = frozenset(MoondreamConfig.__struct_fields__)


def parse_config(params: dict[str, Any], base: MoondreamConfig | None = None) -> MoondreamConfig:
    """Validate ``params`` over ``base`` (or the defaults). Keys of other pipelines are ignored.

    Raises ``msgspec.ValidationError`` naming the field for a bad value.
    """
    merged = msgspec.structs.asdict(base) if base is not None else {}
    merged.update({k: v for k, v in params.items() if k in FIELD_NAMES})
    return msgspec.convert(merged, MoondreamConfig)


def config_json_schema() -> dict[str, Any]:
    """The config's JSON Schema in Pydantic's ``model_json_schema()`` shape."""
    raw = msgspec.json.schema(MoondreamConfig)
    defs = dict(raw["$defs"])
    schema = dict(defs.pop(MoondreamConfig.__name__))
    if not schema.get("required"):
        schema.pop("required", None)
    enums = {cls.__name__: cls for cls in (MoondreamFeature, CaptionLength)}
    for name, definition in defs.items():
        if name in enums:  # msgspec sorts enum values; keep the declared order
            values = [member.value for member in enums[name]]
            defs[name] = {**definition, "enum": values, "type": "string"}
    return {**schema, "$defs": defs}


def schema_with_metadata() -> dict[str, Any]:
    """One entry of ``GET /api/v1/pipelines/schemas``, as Scope's ``get_schema_with_metadata``."""
    cls = MoondreamConfig
    return {
        "id": cls.pipeline_id,
        "name": cls.pipeline_name,
        "description": cls.pipeline_description,
        "version": cls.pipeline_version,
        "supported_modes": ["video"],
        "default_mode": "video",
        "supports_prompts": False,
        "default_temporal_interpolation_method": "slerp",
        "default_temporal_interpolation_steps": 0,
        "default_spatial_interpolation_method": "linear",
        "docs_url": cls.docs_url,
        "estimated_vram_gb": cls.estimated_vram_gb,
        "requires_models": True,
        "supports_lora": False,
        "supports_vace": False,
        "supports_cache_management": False,
        "supports_kv_cache_bias": False,
        "supports_quantization": False,
        "min_dimension": 1,
        "recommended_quantization_vram_threshold": None,
        "modified": False,
        "usage": [],
        "config_schema": config_json_schema(),
    }
