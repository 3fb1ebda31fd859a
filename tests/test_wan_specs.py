"""The causal Wan pipelines' declarations: served schemas, defaults, bounds, load-time fields."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from services.inference import registry
from services.inference.wan import specs as ws

pytestmark = pytest.mark.timeout(30)

SPECS = {s.id: s for s in (ws.STREAMDIFFUSIONV2, ws.LONGLIVE, ws.KREA_REALTIME_VIDEO)}


#: What the registry's BUILTIN gains (or the package's ``dreamwire.pipelines`` entry points).
REGISTRY_LINES = {
    "streamdiffusionv2": "services.inference.wan.specs:STREAMDIFFUSIONV2",
    "longlive": "services.inference.wan.specs:LONGLIVE",
    "krea-realtime-video": "services.inference.wan.specs:KREA_REALTIME_VIDEO",
}


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(registry, "BUILTIN", {**registry.BUILTIN, **REGISTRY_LINES})
    registry.reload()
    yield
    monkeypatch.undo()
    registry.reload()


def test_registered_under_the_scope_ids() -> None:
    for pid, spec in SPECS.items():
        assert registry.get(pid) is spec
    assert not registry.plugin_errors()


def test_specs_import_without_torch() -> None:
    code = (
        "import sys\n"
        "from services.inference.wan import specs\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(
    ("pid", "modes", "size", "steps", "frames"),
    [
        ("streamdiffusionv2", ["video", "text"], (512, 512), [750, 250], 4),
        ("longlive", ["text", "video"], (576, 320), [1000, 750, 500, 250], 12),
        ("krea-realtime-video", ["text", "video"], (576, 320), [1000, 750, 500, 250], 12),
    ],
)
def test_schema_defaults(
    pid: str, modes: list[str], size: tuple[int, int], steps: list[int], frames: int
) -> None:
    s = registry.schema(SPECS[pid])
    props: dict[str, Any] = s["config_schema"]["properties"]
    assert s["supported_modes"] == modes and s["default_mode"] == modes[0]
    assert (s["default_width"], s["default_height"]) == size
    assert (props["width"]["default"], props["height"]["default"]) == size
    assert props["denoising_step_list"]["default"] == steps
    assert s["frames_per_call"] == frames
    assert props["manage_cache"]["default"] is True and props["reset_cache"]["default"] is False
    assert {"height", "width", "seed"} <= set(s["load_params"])
    assert s["requires_models"] and s["artifacts"][0]["repo_id"] == ws.WAN_BASE.repo_id


def test_pipeline_specific_parameters_and_bounds() -> None:
    sdv2 = registry.schema(ws.STREAMDIFFUSIONV2)["config_schema"]["properties"]
    assert sdv2["noise_scale"]["maximum"] == 1.0 and sdv2["noise_controller"]["default"] is True
    krea = registry.schema(ws.KREA_REALTIME_VIDEO)
    props = krea["config_schema"]["properties"]
    bias = props["kv_cache_attention_bias"]
    assert (bias["minimum"], bias["maximum"], bias["default"]) == (0.01, 1.0, 0.3)
    assert "quantization" in krea["load_params"] and props["quantization"]["default"] is None
    assert (
        "kv_cache_attention_bias" not in registry.schema(ws.LONGLIVE)["config_schema"]["properties"]
    )


def test_parameters_validate() -> None:
    ok = registry.validate_parameters("krea-realtime-video", {"kv_cache_attention_bias": 0.5})
    assert ok == {"kv_cache_attention_bias": 0.5}
    with pytest.raises(registry.ParameterError, match="kv_cache_attention_bias"):
        registry.validate_parameters("krea-realtime-video", {"kv_cache_attention_bias": 0.0})
    with pytest.raises(registry.ParameterError, match="denoising_step_list"):
        registry.validate_parameters("longlive", {"denoising_step_list": [250, 750]})
    with pytest.raises(registry.ParameterError, match="quantization"):
        registry.validate_parameters("krea-realtime-video", {"quantization": "fp8_e4m3fn"})
    assert registry.validate_load_params("krea-realtime-video", {"quantization": "fp8_e4m3fn"})
    # Every causal Wan pipeline takes video mode's noise settings, as Scope's schemas do.
    assert registry.validate_parameters("longlive", {"noise_scale": 0.5}) == {"noise_scale": 0.5}
    with pytest.raises(registry.ParameterError, match="noise_scale"):
        registry.validate_parameters("longlive", {"noise_scale": 1.5})
