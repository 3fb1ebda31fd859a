"""Merge a PEFT-saved LoRA into original-key Wan weights (LongLive's built-in LoRA).

LongLive ships its generator as a base checkpoint plus ``models/lora.pt``: a
``{"generator_lora": state}`` pickle (or the bare ``state``), where ``state`` is what
``peft.get_peft_model_state_dict`` returns for the PEFT-wrapped causal Wan model, keys
``base_model.model.<module>.lora_A.weight`` and ``….lora_B.weight`` for every Linear of every
attention block (rank 256, alpha 256 in LongLive's config).

The adapter is fixed (no runtime scale), so it is merged once at load, ``W += (alpha / r) · B A``,
in the original key space before diffusers' key conversion: the served model then costs
exactly the base model per call, and no PEFT wrapper is needed. The merge is strict like the
base load: a LoRA key that names no base weight, a lone ``lora_A`` or ``lora_B``, or a shape
that does not fit is a :class:`~services.inference.wan.convert.CheckpointMismatch`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

#: Prefixes PEFT and training wrappers put before the module names, tried in order.
PREFIXES = ("base_model.model.model.", "base_model.model.", "generator.model.", "model.")
CONTAINERS = ("generator_lora", "lora", "state_dict")
LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight")


def read_lora(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    for name in CONTAINERS:
        if isinstance(obj, Mapping) and isinstance(obj.get(name), Mapping):
            obj = obj[name]
            break
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix) :]: v for k, v in state.items()}
    return state


def merge_lora(
    base: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], alpha: float | None = None
) -> list[str]:
    """Add every LoRA delta of ``lora`` to ``base`` (original Wan key names, prefixes
    stripped) in place; the merged weight names, sorted. ``alpha`` None means alpha = rank."""
    from services.inference.wan.convert import CheckpointMismatch

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unused: list[str] = []
    for key, tensor in _strip(lora).items():
        m = LORA_KEY.fullmatch(key)
        if m is None or f"{m['module']}.weight" not in base:
            unused.append(key)
            continue
        pairs.setdefault(m["module"], {})[m["part"]] = tensor
    missing = [
        f"{module}.lora_{'B' if 'A' in ab else 'A'}.weight"
        for module, ab in pairs.items()
        if len(ab) != 2
    ]
    if unused or missing:
        raise CheckpointMismatch(sorted(unused), sorted(missing))
    merged = []
    for module, ab in sorted(pairs.items()):
        weight_key = f"{module}.weight"
        down, up = ab["A"].float(), ab["B"].float()
        rank = down.shape[0]
        delta = (up @ down) * ((alpha if alpha is not None else rank) / rank)
        weight = base[weight_key]
        if delta.shape != weight.shape:
            raise CheckpointMismatch(
                [f"{module}.lora_A.weight ({tuple(delta.shape)} for {tuple(weight.shape)})"], []
            )
        base[weight_key] = (weight.float() + delta).to(weight.dtype)
        merged.append(weight_key)
    return merged
