"""The pipeline registry: schemas in the Scope format, validation, plugins — without torch."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from services.inference import registry

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def fresh_registry() -> Iterator[None]:
    registry.reload()
    yield
    registry.reload()


def test_registry_and_schemas_import_without_torch() -> None:
    code = (
        "import sys\n"
        "from services.inference import registry\n"
        "from services.models import downloads\n"
        "s = registry.schemas()\n"
        "registry.validate_parameters('streamdiffusion', {'noise_scale': 0.5})\n"
        "downloads.models_status('streamdiffusion', '/nonexistent')\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print(sorted(s))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for pipeline_id in ("dream", "moondream", "passthrough", "streamdiffusion", "testcard"):
        assert repr(pipeline_id) in out.stdout


def test_schema_has_scope_shape_defaults_bounds_and_ui_hints() -> None:
    info = registry.schemas()["streamdiffusion"]
    assert info["supported_modes"] == ["video"] and info["default_mode"] == "video"
    assert info["requires_models"] is True
    assert {a["repo_id"] for a in info["artifacts"]} == {
        "stabilityai/sd-turbo",
        "madebyollin/taesd",
    }
    schema = info["config_schema"]
    assert schema["type"] == "object"
    props = schema["properties"]
    assert props["noise_scale"]["minimum"] == 0.0 and props["noise_scale"]["maximum"] == 1.0
    assert props["noise_scale"]["ui"]["category"] == "configuration"
    # No ui hint on prompts, as in Scope: its UI draws them itself and warns about an array
    # field it cannot draw; the step list names Scope's component.
    assert "ui" not in props["prompts"]
    assert props["denoising_step_list"]["ui"]["component"] == "denoising_steps"
    assert props["denoising_step_list"]["ui"]["is_load_param"] is False
    assert props["prompts"]["default"][0]["weight"] == 1.0
    assert props["prompts"]["items"]["$ref"] == "#/$defs/PromptItem"
    assert "PromptItem" in schema["$defs"] and "Transition" in schema["$defs"]
    assert props["seed"]["ui"]["is_load_param"] is True
    assert "ui" not in props["height"]  # hidden, load-time
    assert {"height", "width", "seed"} <= set(info["load_params"])
    assert registry.schemas()["dream"]["supported_modes"] == ["text"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"nope": 1}, "nope: unknown parameter for pipeline streamdiffusion"),
        ({"noise_scale": 1.5}, "noise_scale: Expected `float` <= 1.0"),
        ({"noise_scale": "x"}, "noise_scale: Expected `float`, got `str`"),
        ({"denoising_step_list": [100, 400]}, "denoising_step_list: must be strictly descending"),
        ({"denoising_step_list": [0]}, "denoising_step_list: Expected `int` >= 1"),
        ({"prompts": [{"text": "a", "weight": -1}]}, "prompts: Expected `float` >= 0.0"),
        ({"prompt_interpolation_method": "cubic"}, "prompt_interpolation_method: Invalid enum"),
        ({"width": 256}, "width: can only be set when the pipeline is loaded"),
        ({"transition": {"num_steps": 3}}, "transition: Object missing required field"),
    ],
)
def test_bad_parameters_name_the_field(params: dict, message: str) -> None:
    with pytest.raises(registry.ParameterError) as info:
        registry.validate_parameters("streamdiffusion", params)
    assert str(info.value).startswith(message), str(info.value)


def test_good_parameters_come_back_as_plain_values() -> None:
    got = registry.validate_parameters(
        "streamdiffusion",
        {
            "prompts": [{"text": "a cat"}],
            "transition": {"target_prompts": [{"text": "a dog", "weight": 2}], "num_steps": 4},
            "paused": True,
        },
    )
    assert got == {
        "prompts": [{"text": "a cat", "weight": 1.0}],
        "transition": {
            "target_prompts": [{"text": "a dog", "weight": 2.0}],
            "num_steps": 4,
            "temporal_interpolation_method": "linear",
        },
        "paused": True,
    }
    assert registry.validate_load_params("dream", {"width": 256, "height": 128}) == {
        "width": 256,
        "height": 128,
    }
    assert registry.resolution("dream", {"width": 256}) == (256, 512)
    with pytest.raises(registry.UnknownPipelineError):
        registry.get("nope")


def test_a_broken_plugin_is_reported_and_breaks_nothing(
    fresh_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(registry.BUILTIN, "broken", "dreamwire_no_such_module:SPEC")
    monkeypatch.setitem(registry.BUILTIN, "wrong", "services.inference.specs:DEFAULT_PROMPT")
    registry.reload()
    errors = registry.plugin_errors()
    assert "ModuleNotFoundError" in errors["broken"]
    assert "not a PipelineSpec" in errors["wrong"]
    schemas = registry.schemas()
    assert schemas["broken"]["error"] == errors["broken"]
    assert "streamdiffusion" in schemas and not registry.is_known("broken")
