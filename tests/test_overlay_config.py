"""The moondream config: the reference's fields, defaults, bounds, order, categories; schema."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest

from services.overlay.config import (
    MoondreamConfig,
    config_json_schema,
    parse_config,
    schema_with_metadata,
)

pytestmark = pytest.mark.timeout(60)

# (name, default, minimum, maximum, order, category, is_load_param), as Scope's plugin, and
# dreamwire's token budget.
REFERENCE = [
    ("feature", "detect", None, None, 1, "configuration", False),
    ("caption_length", "normal", None, None, 2, "configuration", False),
    ("temperature", 0.5, 0.0, 1.0, 3, "configuration", False),
    ("max_objects", 10, 1, 50, 4, "configuration", False),
    ("inference_interval", 1, 1, 30, 5, "configuration", False),
    ("overlay_opacity", 0.8, 0.0, 1.0, 6, "configuration", False),
    ("font_scale", 1.0, 0.5, 3.0, 7, "configuration", False),
    ("compile_model", False, None, None, 8, "configuration", True),
    ("max_tokens", 128, 1, 1024, 9, "configuration", False),  # dreamwire's: a bounded answer
    ("question", "What is in this image?", None, None, 1, "input", False),
    ("detect_object", "person", None, None, 2, "input", False),
]


def test_fields_defaults_bounds_order_and_categories() -> None:
    schema = config_json_schema()
    props = schema["properties"]
    assert list(props) == [row[0] for row in REFERENCE]
    for name, default, minimum, maximum, order, category, load in REFERENCE:
        prop = props[name]
        assert prop["default"] == default, name
        assert prop.get("minimum") == minimum, name
        assert prop.get("maximum") == maximum, name
        assert prop["ui"]["order"] == order, name
        assert prop["ui"]["category"] == category, name
        assert prop["ui"]["is_load_param"] is load, name
        assert prop["ui"]["label"] and prop["description"], name
    assert props["feature"]["$ref"] == "#/$defs/MoondreamFeature"
    assert schema["$defs"]["MoondreamFeature"]["enum"] == ["caption", "query", "detect", "point"]
    assert schema["$defs"]["CaptionLength"]["enum"] == ["short", "normal", "long"]
    assert props["temperature"]["type"] == "number"
    assert props["max_objects"]["type"] == "integer"
    assert props["compile_model"]["type"] == "boolean"
    assert props["question"]["type"] == "string"
    assert schema["type"] == "object" and "required" not in schema


def test_schema_round_trip() -> None:
    jsonschema = pytest.importorskip("jsonschema")  # the test extra should carry it
    schema = config_json_schema()
    assert json.loads(json.dumps(schema)) == schema
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    defaults = {name: prop["default"] for name, prop in schema["properties"].items()}
    validator.validate(defaults)
    assert parse_config(defaults) == MoondreamConfig()
    assert msgspec.to_builtins(MoondreamConfig()) == defaults
    changed = {**defaults, "feature": "point", "max_objects": 50, "font_scale": 0.5}
    validator.validate(changed)
    config = parse_config(changed)
    assert msgspec.json.decode(msgspec.json.encode(config), type=MoondreamConfig) == config
    for bad in ({"temperature": 1.5}, {"max_objects": 0}, {"feature": "segment"},
                {"inference_interval": 31}, {"font_scale": "big"}):  # fmt: skip
        assert not validator.is_valid({**defaults, **bad}), bad
        with pytest.raises(msgspec.ValidationError, match=next(iter(bad))):
            parse_config(bad)


def test_metadata_entry() -> None:
    entry = schema_with_metadata()
    assert entry["id"] == "moondream"
    assert entry["supported_modes"] == ["video"] and entry["supports_prompts"] is False
    assert entry["requires_models"] is True
    assert entry["config_schema"] == config_json_schema()


def test_importable_without_torch_transformers_or_pillow() -> None:
    code = (
        "import sys, services.overlay.config, services.overlay;"
        "heavy = {'torch', 'transformers', 'PIL'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
