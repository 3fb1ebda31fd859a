"""Load a causal Wan transformer from a released single-file checkpoint (original key names).

The released checkpoints (StreamDiffusionV2 ``model.pt``, LongLive ``longlive_base.pt``, Krea
``*.safetensors``) keep the original Wan module names (``blocks.0.self_attn.q.weight``,
``head.head.weight``, …), often under a training wrapper's prefix (``generator.model.``,
``model.``) and sometimes inside a ``{"generator": state_dict}`` dict. This module:

1. reads the file (safetensors, or a ``torch.load(weights_only=True)`` pickle);
2. unwraps the container and strips the prefix;
3. merges a LoRA when the release ships one (LongLive; :mod:`services.inference.wan.lora`);
4. renames the keys with diffusers' own ``convert_wan_transformer_to_diffusers`` (the mapping
   ``from_single_file`` uses);
5. infers the architecture from the tensor shapes (width, depth, FFN, text and frequency dims;
   heads = width / 128 as in every Wan2.1 model);
6. loads strictly: a key of the checkpoint that no parameter takes, or a parameter the
   checkpoint lacks, is a :class:`CheckpointMismatch` naming them, never silently ignored.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from services.inference.wan.model import CausalWanTransformer

logger = logging.getLogger(__name__)

HEAD_DIM = 128
#: Wrapper prefixes seen in released causal Wan checkpoints, tried in order.
PREFIXES = ("generator.model.", "model.diffusion_model.", "generator.", "model.")
#: Containers the state dict may sit in, tried in order. A file with both ``generator`` and
#: ``generator_ema`` gives ``generator``: what Scope's streamdiffusionv2 and longlive load
#: (scope:longlive/model.yaml, wan2_1/components/generator.py), so the same file makes the same
#: video here.
CONTAINERS = ("generator", "generator_ema", "state_dict", "model")


class CheckpointMismatch(ValueError):
    def __init__(self, unused: list[str], missing: list[str]) -> None:
        self.unused, self.missing = unused, missing
        parts = []
        if unused:
            parts.append(f"{len(unused)} checkpoint keys unused ({', '.join(unused[:5])})")
        if missing:
            parts.append(f"{len(missing)} parameters missing ({', '.join(missing[:5])})")
        super().__init__("; ".join(parts))


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    for name in CONTAINERS:
        if isinstance(obj, Mapping) and name in obj and isinstance(obj[name], Mapping):
            obj = obj[name]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def to_diffusers(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Wan names -> ``WanTransformer3DModel`` names (diffusers' mapping)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted: dict[str, torch.Tensor] = convert_wan_transformer_to_diffusers(
        dict(strip_prefix(original))
    )
    return converted


def infer_config(state: dict[str, torch.Tensor], rope_max_seq_len: int = 1024) -> dict[str, Any]:
    """The ``WanTransformer3DModel`` config of a converted state dict, from its shapes."""
    patch = state["patch_embedding.weight"]
    dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
    patch_size = tuple(int(s) for s in patch.shape[2:])
    layers = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    heads = max(1, dim // HEAD_DIM)
    return {
        "patch_size": patch_size,
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": in_channels,
        "out_channels": int(state["proj_out.weight"].shape[0]) // math.prod(patch_size),
        "text_dim": int(state["condition_embedder.text_embedder.linear_1.weight"].shape[1]),
        "freq_dim": int(state["condition_embedder.time_embedder.linear_1.weight"].shape[1]),
        "ffn_dim": int(state["blocks.0.ffn.net.0.proj.weight"].shape[0]),
        "num_layers": len(layers),
        "cross_attn_norm": "blocks.0.norm2.weight" in state,
        "rope_max_seq_len": rope_max_seq_len,
    }


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load every parameter, use every key; :class:`CheckpointMismatch` otherwise."""
    expected = set(model.state_dict())
    unused = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unused or missing:
        raise CheckpointMismatch(unused, missing)
    model.load_state_dict(state, strict=True, assign=True)


def load_transformer(
    path: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    lora: Path | None = None,
    lora_alpha: float | None = None,
) -> CausalWanTransformer:
    """The checkpoint at ``path`` as a :class:`CausalWanTransformer` (built on the meta device,
    so a 14B model never exists twice in memory), with the LoRA at ``lora`` merged in."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    original = strip_prefix(read_checkpoint(path))
    if lora is not None:
        from services.inference.wan.lora import merge_lora, read_lora

        merged = merge_lora(original, read_lora(lora), lora_alpha)
        logger.info("merged the LoRA %s into %d weights", lora.name, len(merged))
    state = to_diffusers(original)
    with torch.device("meta"):
        model = CausalWanTransformer(**infer_config(state))
    load_state_strict(model, state)
    # The RoPE table is a non-persistent buffer (still on meta): build it, in float64 as
    # diffusers keeps it.
    rope = model.rope
    model.rope = WanRotaryPosEmbed(rope.attention_head_dim, rope.patch_size, rope.max_seq_len)
    cast_keeping_fp32(model, dtype)
    torch.nn.Module.to(model, device)
    return model.eval().requires_grad_(False)


def cast_keeping_fp32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Weights to ``dtype``, except the modules diffusers keeps in float32 (time embedding,
    modulation tables, norms)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if keep.isdisjoint(name.split(".")):
            param.data = param.data.to(dtype)
        else:
            param.data = param.data.float()
