"""LoRAs, as Scope's users load them: each file format and both merge modes against a LoRA
merged by hand (``W += scale · (alpha / rank) · up @ down`` on the modules the LoRA names, the
Wan-to-diffusers names written out here), on small random models; bad files refused.

The models and LoRAs are tiny and random; the comparisons are of model outputs (float32)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
from safetensors.torch import save_file  # noqa: E402
from test_wan_model import inputs, small_model  # noqa: E402

from services.inference.lora_files import (  # noqa: E402
    LoraFileError,
    LoraItem,
    LoraScale,
    lora_path,
)
from services.inference.loras import (  # noqa: E402
    LoraSet,
    read_safetensors,
    sd_unet_adapters,
    wan_adapters,
)

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

TOLERANCE = 1e-5
RANK = 2
#: Original Wan module names -> diffusers' (the oracle's own table).
WAN_NAMES = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
WAN_FORMATS = [
    "comfyui",
    "diffusion_pipe_alpha",
    "peft_original",
    "peft_wrapped",
    "musubi",
    "diffusers",
    "diffusers_bare",
]


def wan_lora(model: Any, fmt: str, seed: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    """A LoRA file's tensors in ``fmt``, and each diffusers module's delta at scale 1."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    state: dict[str, Any] = {}
    deltas: dict[str, Any] = {}
    alpha = 1.0 if fmt in ("diffusion_pipe_alpha", "musubi") else None
    for block in range(len(model.blocks)):
        for original, diffusers in WAN_NAMES.items():
            weight = modules[f"blocks.{block}.{diffusers}"].weight
            down = torch.randn(RANK, weight.shape[1], generator=gen) * 0.2
            up = torch.randn(weight.shape[0], RANK, generator=gen) * 0.2
            factor = alpha / RANK if alpha is not None else 1.0
            deltas[f"blocks.{block}.{diffusers}"] = factor * (up @ down)
            name = f"blocks.{block}.{original}"
            if fmt == "comfyui":
                state[f"diffusion_model.{name}.lora_A.weight"] = down
                state[f"diffusion_model.{name}.lora_B.weight"] = up
            elif fmt == "diffusion_pipe_alpha":
                state[f"diffusion_model.{name}.lora_down.weight"] = down
                state[f"diffusion_model.{name}.lora_up.weight"] = up
                state[f"diffusion_model.{name}.alpha"] = torch.tensor(alpha)
            elif fmt == "peft_original":
                state[f"{name}.lora_A.weight"] = down
                state[f"{name}.lora_B.weight"] = up
            elif fmt == "peft_wrapped":  # PEFT's save of a wrapped model (LongLive's lora.pt)
                state[f"base_model.model.{name}.lora_A.weight"] = down
                state[f"base_model.model.{name}.lora_B.weight"] = up
            elif fmt in ("diffusers", "diffusers_bare"):  # diffusers' save_lora_weights
                key = ("transformer." if fmt == "diffusers" else "") + f"blocks.{block}.{diffusers}"
                state[f"{key}.lora_A.weight"] = down
                state[f"{key}.lora_B.weight"] = up
            else:  # musubi-tuner: kohya-style names
                key = "lora_unet_" + name.replace(".", "_")
                state[f"{key}.lora_down.weight"] = down
                state[f"{key}.lora_up.weight"] = up
                state[f"{key}.alpha"] = torch.tensor(alpha)
    return state, deltas


def merged_by_hand(base: Any, deltas: dict[str, Any], scale: float) -> Any:
    model = copy.deepcopy(base)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, delta in deltas.items():
            modules[name].weight += scale * delta
    return model


def wan_output(model: Any) -> Any:
    latents, timesteps, context = inputs(3)
    with torch.inference_mode():
        return model.forward_causal(latents, timesteps, model.cross_kv(context))


def write(tmp_path: Path, name: str, state: dict[str, Any]) -> str:
    folder = tmp_path / "loras"
    folder.mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / name))
    return name


def load_wan(base: Any, tmp_path: Path, items: list[LoraItem]) -> tuple[Any, LoraSet]:
    model = copy.deepcopy(base)
    loras = LoraSet([model])
    loras.load(
        items,
        "permanent_merge",
        tmp_path,
        read_safetensors,
        wan_adapters(model),
    )
    return model, loras


def max_diff(a: Any, b: Any) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def wan_base() -> Any:
    return small_model()


@pytest.mark.parametrize("fmt", WAN_FORMATS)
def test_wan_formats_merge_as_by_hand(wan_base: Any, tmp_path: Path, fmt: str) -> None:
    state, deltas = wan_lora(wan_base, fmt)
    path = write(tmp_path, f"{fmt}.safetensors", state)
    reference = wan_output(merged_by_hand(wan_base, deltas, 0.7))
    assert max_diff(reference, wan_output(wan_base)) > 1e-2  # the LoRA does something
    merged, loras = load_wan(wan_base, tmp_path, [LoraItem(path, 0.7, "permanent_merge")])
    assert max_diff(wan_output(merged), reference) <= TOLERANCE
    assert not any(hasattr(m, "lora_A") for m in merged.modules())  # fused: plain layers
    runtime, _ = load_wan(wan_base, tmp_path, [LoraItem(path, 0.7, "runtime_peft")])
    assert max_diff(wan_output(runtime), reference) <= TOLERANCE
    assert [(a.path, a.scale, a.merge_mode) for a in loras.status()] == [
        (path, 0.7, "permanent_merge")
    ]


def test_a_runtime_scale_equals_a_merge_at_that_scale_and_zero_is_none(
    wan_base: Any, tmp_path: Path
) -> None:
    state, deltas = wan_lora(wan_base, "comfyui")
    path = write(tmp_path, "style.safetensors", state)
    runtime, loras = load_wan(wan_base, tmp_path, [LoraItem(path, 1.0, "runtime_peft")])
    for scale in (1.3, -0.5, 0.0):
        assert loras.set_scales([LoraScale(path, scale)])
        expected = wan_output(merged_by_hand(wan_base, deltas, scale))
        assert max_diff(wan_output(runtime), expected) <= TOLERANCE, scale
    assert max_diff(wan_output(runtime), wan_output(wan_base)) <= TOLERANCE  # scale 0: no LoRA
    assert loras.status()[0].scale == 0.0 and loras.version == 3
    assert not loras.set_scales([LoraScale(path, 0.0)])  # unchanged: nothing to do


def test_two_loras_of_both_modes_add_up(wan_base: Any, tmp_path: Path) -> None:
    a, deltas_a = wan_lora(wan_base, "comfyui", seed=4)
    b, deltas_b = wan_lora(wan_base, "peft_original", seed=5)
    items = [
        LoraItem(write(tmp_path, "a.safetensors", a), 0.5, "permanent_merge"),
        LoraItem(write(tmp_path, "b.safetensors", b), 0.8, "runtime_peft"),
    ]
    model, loras = load_wan(wan_base, tmp_path, items)
    both = merged_by_hand(merged_by_hand(wan_base, deltas_a, 0.5), deltas_b, 0.8)
    assert max_diff(wan_output(model), wan_output(both)) <= TOLERANCE
    with pytest.raises(ValueError, match=r"a\.safetensors was merged into the weights at load"):
        loras.set_scales([LoraScale("a.safetensors", 0.9)])
    with pytest.raises(ValueError, match=r"lora_scales: c\.safetensors is not loaded"):
        loras.set_scales([LoraScale("c.safetensors", 0.9)])
    loras.set_scales([LoraScale("a.safetensors", 0.5), LoraScale("b.safetensors", 0.2)])
    both = merged_by_hand(merged_by_hand(wan_base, deltas_a, 0.5), deltas_b, 0.2)
    assert max_diff(wan_output(model), wan_output(both)) <= TOLERANCE


# ---------------------------------------------------------------- SD-Turbo's UNet


def small_unet() -> Any:
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    ).eval()


def sd_lora(unet: Any, fmt: str) -> tuple[dict[str, Any], dict[str, Any]]:
    gen = torch.Generator().manual_seed(7)
    state: dict[str, Any] = {}
    deltas: dict[str, Any] = {}
    linears = [
        (n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and "attn" in n
    ]
    for name, module in linears:
        down = torch.randn(RANK, module.weight.shape[1], generator=gen) * 0.2
        up = torch.randn(module.weight.shape[0], RANK, generator=gen) * 0.2
        if fmt == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = down
            state[f"{key}.lora_up.weight"] = up
            state[f"{key}.alpha"] = torch.tensor(1.0)
            deltas[name] = (1.0 / RANK) * (up @ down)
        else:  # diffusers / PEFT
            state[f"unet.{name}.lora_A.weight"] = down
            state[f"unet.{name}.lora_B.weight"] = up
            deltas[name] = up @ down
    return state, deltas


def unet_output(unet: Any) -> Any:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    ctx = torch.randn(1, 7, 32, generator=gen)
    with torch.inference_mode():
        return unet(x, torch.tensor([359]), encoder_hidden_states=ctx).sample


def load_sd(base: Any, tmp_path: Path, items: list[LoraItem]) -> tuple[Any, LoraSet]:
    unet = copy.deepcopy(base)
    loras = LoraSet([unet])
    loras.load(items, "permanent_merge", tmp_path, read_safetensors, sd_unet_adapters(unet))
    return unet, loras


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("mode", ["permanent_merge", "runtime_peft"])
def test_sd_unet_formats_merge_as_by_hand(tmp_path: Path, fmt: str, mode: str) -> None:
    base = small_unet()
    state, deltas = sd_lora(base, fmt)
    path = write(tmp_path, f"sd-{fmt}.safetensors", state)
    reference = unet_output(merged_by_hand(base, deltas, 0.6))
    unet, _ = load_sd(base, tmp_path, [LoraItem(path, 0.6, mode)])  # type: ignore[arg-type]
    assert max_diff(unet_output(unet), reference) <= TOLERANCE
    assert max_diff(reference, unet_output(base)) > 1e-3


# ---------------------------------------------------------------- files refused


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda d: d.parent / "outside.safetensors", r"not in the LoRA directory"),
        (lambda d: d / "style.pt", r"only \.safetensors LoRAs load here .*pickle"),
        (lambda d: d / "missing.safetensors", r"no such file"),
        (lambda d: d / "zeros.safetensors", r"not a readable safetensors file"),
        (lambda d: d / "checkpoint.safetensors", r"are not LoRA weights .*a checkpoint"),
        (lambda d: d / "empty.safetensors", r"no LoRA weights in it"),
    ],
    ids=["outside", "pickle", "missing", "zeros", "checkpoint", "no-lora"],
)
def test_files_that_are_not_loras_are_refused(
    tmp_path: Path, make: Callable[[Path], Path], error: str
) -> None:
    folder = tmp_path / "loras"
    folder.mkdir()
    target = make(folder)
    if target.name == "outside.safetensors":
        save_file({"a.lora_A.weight": torch.zeros(2, 2)}, str(target))
    elif target.name == "style.pt":
        torch.save({"a.lora_A.weight": torch.zeros(2, 2)}, target)
    elif target.name == "zeros.safetensors":
        with target.open("wb") as f:  # sparse: 64 MB of zeros, no header
            f.truncate(64 * 2**20)
    elif target.name == "checkpoint.safetensors":
        save_file({"blocks.0.self_attn.q.weight": torch.zeros(2, 2)}, str(target))
    elif target.name == "empty.safetensors":
        save_file({"x.alpha": torch.zeros(())}, str(target))
    with pytest.raises(LoraFileError, match=error):
        lora_path(str(target), tmp_path)


def test_a_lora_for_another_model_fails_naming_it(wan_base: Any, tmp_path: Path) -> None:
    state, _ = wan_lora(wan_base, "comfyui")
    wrong_shape = {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in state.items()}
    path = write(tmp_path, "wide.safetensors", wrong_shape)
    with pytest.raises(LoraFileError, match=r"loras\[0\]\.path: wide\.safetensors does not fit"):
        load_wan(wan_base, tmp_path, [LoraItem(path)])
    renamed = {k.replace("blocks.1.", "blocks.9."): v for k, v in state.items()}
    path = write(tmp_path, "deeper.safetensors", renamed)
    with pytest.raises(LoraFileError, match=r"10 of its 20 LoRA layers name no module"):
        load_wan(wan_base, tmp_path, [LoraItem(path)])


def test_every_pipeline_with_loras_takes_them_at_load_only() -> None:
    """A LoRA list sent with a session is a load-time key (reported, the model stays as
    loaded), on every pipeline that offers LoRAs."""
    from services.inference import registry
    from services.inference.fields import LORA_LOAD_KEYS

    with_loras = [s for s in registry.specs().values() if "loras" in registry.load_param_names(s)]
    assert {s.id for s in with_loras} >= {"longlive", "krea-realtime-video", "streamdiffusion"}
    for spec in with_loras:
        assert spec.load_only >= LORA_LOAD_KEYS, spec.id
