"""LoRAs on a loaded model, in Scope's two merge modes, through diffusers and peft.

* ``permanent_merge``: every such LoRA is loaded as a peft adapter, weighted by its scale and
  fused into the base weights (``fuse_lora``), the adapter layers then removed: the model costs
  per call what the base costs; its scales are fixed.
* ``runtime_peft``: the adapters stay (peft ``LoraLayer`` s), ``y = W x + Σ s·B(A x)``; a scale
  changes while streaming (``set_adapters``), on the next frame or block.

Permanent LoRAs are merged first, then the run-time ones are added (Scope's order). The file
formats are diffusers': its ``lora_state_dict`` turns the LoRAs users have into diffusers' names
(kohya ``lora_unet_…``, ComfyUI and diffusion-pipe ``diffusion_model.…`` with ``alpha``, PEFT);
each model adds what diffusers leaves (:func:`wan_state_dict`). A LoRA that names modules the
model does not have, or does not fit their shapes, fails the load naming the file.

A LoRA's scale belongs to the loaded model, not to a session: every session of the model sees
a change (``version`` counts changes, so sessions can drop what they cached with the old ones).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services import protocol as p
from services.inference.lora_files import LoraFileError, LoraItem, LoraScale, MergeMode, lora_path

logger = logging.getLogger(__name__)

#: The down (A) weight of one LoRA layer, in every format read here.
_DOWN = re.compile(r"(lora_A|lora_down|lora\.down)(\.default)?\.weight$")
#: Loads one converted LoRA into the model as a peft adapter of this name.
LoadAdapter = Callable[[dict[str, torch.Tensor], str], None]


@dataclass
class LoadedLora:
    path: str  # as the load gave it (what the client sends back in ``lora_scales``)
    file: Path
    scale: float
    merge_mode: MergeMode
    adapter_name: str


def adapter_name(file: Path, taken: set[str]) -> str:
    """A peft adapter name from the file's stem (Scope's rule), unique among ``taken``."""
    base = re.sub(r"[^A-Za-z0-9_]", "_", file.stem) or "lora"
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name


class LoraSet:
    """The LoRAs of one loaded model (``models``: the peft-capable modules they go into)."""

    def __init__(self, models: Sequence[Any]) -> None:
        self.models = list(models)
        self.loaded: list[LoadedLora] = []
        self.version = 0

    def load(
        self,
        items: Sequence[LoraItem],
        default_mode: MergeMode,
        models_dir: Path,
        read: Callable[[Path], dict[str, torch.Tensor]],
        load_adapter: LoadAdapter,
    ) -> None:
        """Every LoRA of a load, permanent ones merged first."""
        chosen = [(item, item.merge_mode or default_mode) for item in items]
        taken: set[str] = set()
        for mode in ("permanent_merge", "runtime_peft"):
            group: list[LoadedLora] = []
            for i, (item, item_mode) in enumerate(chosen):
                if item_mode != mode:
                    continue
                try:
                    file = lora_path(item.path, models_dir)
                    name = adapter_name(file, taken)
                    state = read(file)
                    load_adapter(state, name)
                    self._check_all_applied(state, name)
                except LoraFileError as exc:
                    raise LoraFileError(f"loras[{i}].path: {exc}") from exc
                except (ValueError, RuntimeError, KeyError) as exc:
                    raise LoraFileError(
                        f"loras[{i}].path: {item.path} does not fit this model: {exc}"
                    ) from exc
                taken.add(name)
                group.append(LoadedLora(item.path, file, item.scale, item_mode, name))
            if not group:
                continue
            names = [lora.adapter_name for lora in group]
            self._weigh(names, [lora.scale for lora in group])
            if mode == "permanent_merge":
                for model in self.models:
                    if _has_adapters(model, names):
                        model.fuse_lora(adapter_names=_present(model, names))
                        model.unload_lora()
            self.loaded += group
        for lora in self.loaded:
            logger.info(
                "LoRA %s (%s, scale %g) as %s", lora.file.name, lora.merge_mode, lora.scale,
                lora.adapter_name,
            )  # fmt: skip

    def _check_all_applied(self, state: dict[str, torch.Tensor], name: str) -> None:
        """Every down/A weight of the file became a layer of the model (diffusers and peft
        only warn about keys that name nothing: here that is a LoRA for another model)."""
        wanted = sum(1 for k in state if _DOWN.search(k))
        applied = sum(
            1
            for model in self.models
            for module in model.modules()
            if name in getattr(module, "lora_A", {})
        )
        if applied < wanted:
            raise ValueError(
                f"{wanted - applied} of its {wanted} LoRA layers name no module of this model"
            )

    def _weigh(self, names: list[str], scales: list[float]) -> None:
        for model in self.models:
            present = _present(model, names)
            if present:
                weights = [scales[names.index(n)] for n in present]
                model.set_adapters(present, weights=weights)

    def set_scales(self, updates: Sequence[LoraScale]) -> bool:
        """Run-time scales (``lora_scales``); True when one changed. A path not loaded, or a
        permanently merged LoRA asked for another scale, is a ``ValueError`` naming it."""
        by_path = {lora.path: lora for lora in self.loaded}
        changed = False
        for update in updates:
            lora = by_path.get(update.path)
            if lora is None:
                loaded = ", ".join(by_path) or "none"
                raise ValueError(f"lora_scales: {update.path} is not loaded (loaded: {loaded})")
            if abs(update.scale - lora.scale) < 1e-6:
                continue
            if lora.merge_mode == "permanent_merge":
                raise ValueError(
                    f"lora_scales: {update.path} was merged into the weights at load (scale "
                    f"{lora.scale:g}); load it with merge_mode runtime_peft to change it while "
                    "streaming"
                )
            lora.scale = update.scale
            changed = True
        if changed:
            runtime = [lora for lora in self.loaded if lora.merge_mode == "runtime_peft"]
            self._weigh([lora.adapter_name for lora in runtime], [lora.scale for lora in runtime])
            self.version += 1
        return changed

    def status(self) -> list[p.LoraAdapter]:
        return [
            p.LoraAdapter(
                path=lora.path,
                scale=lora.scale,
                merge_mode=lora.merge_mode,
                adapter_name=lora.adapter_name,
            )
            for lora in self.loaded
        ]


def _present(model: Any, names: list[str]) -> list[str]:
    config = getattr(model, "peft_config", None) or {}
    return [n for n in names if n in config]


def _has_adapters(model: Any, names: list[str]) -> bool:
    return bool(_present(model, names))


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return dict(load_file(str(file)))


# ---------------------------------------------------------------- per model


#: Prefixes of original-name Wan LoRAs (PEFT on the original model, training wrappers).
_WAN_PREFIXES = ("base_model.model.", "generator.model.", "model.", "transformer.")
#: A module of the original Wan model (diffusers' are ``attn1``, ``attn2``, ``ffn.net.N``).
_WAN_ORIGINAL = re.compile(r"\.(self_attn|cross_attn)\.|\.ffn\.[02]\.")


def wan_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Wan LoRA in diffusers' names, under ``transformer.``. diffusers converts
    ``diffusion_model.``-prefixed files (ComfyUI, diffusion-pipe, with ``alpha``) and musubi's
    ``lora_unet_`` ones; a LoRA in the original names under another prefix or none (PEFT on
    Scope's or LongLive's model, ``base_model.model.``) is given that prefix first; one in
    diffusers' names without ``transformer.`` gets it."""
    from diffusers.loaders import WanLoraLoaderMixin

    if any(_WAN_ORIGINAL.search(k) for k in state):
        for prefix in ("", *_WAN_PREFIXES):
            if all(k.startswith(prefix + "blocks.") for k in state):
                state = {f"diffusion_model.{k[len(prefix) :]}": v for k, v in state.items()}
                break
    elif state and all(k.startswith("blocks.") for k in state):
        state = {f"transformer.{k}": v for k, v in state.items()}
    converted: dict[str, torch.Tensor] = WanLoraLoaderMixin.lora_state_dict(state)
    return converted


def wan_adapters(transformer: Any) -> LoadAdapter:
    """Loads a Wan LoRA file's tensors into the causal Wan transformer as one adapter."""

    def load(state: dict[str, torch.Tensor], name: str) -> None:
        transformer.load_lora_adapter(wan_state_dict(state), adapter_name=name)

    return load


def sd_unet_adapters(unet: Any) -> LoadAdapter:
    """Loads an SD LoRA file's UNet part into the UNet as one adapter."""

    def load(state: dict[str, torch.Tensor], name: str) -> None:
        converted, alphas = sd_unet_state_dict(state)
        unet.load_lora_adapter(converted, prefix="unet", network_alphas=alphas, adapter_name=name)

    return load


def merge_mode(load: Any) -> MergeMode:
    """A load's mode for LoRAs without their own: Scope's UI sends ``lora_merge_mode``, its
    schema names the field ``lora_merge_strategy``; runtime_peft if either says so."""
    modes = (getattr(load, "lora_merge_mode", None), getattr(load, "lora_merge_strategy", None))
    return "runtime_peft" if "runtime_peft" in modes else "permanent_merge"


def sd_unet_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """An SD LoRA's UNet part in diffusers' names, and its alphas (diffusers converts kohya's
    ``lora_unet_…``; PEFT and diffusers files pass). The text encoder's part is left out: the
    prompt embeddings of the stream stay those of the base text encoder."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    converted, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(state)
    unet = {k: v for k, v in converted.items() if not k.startswith("text_encoder")}
    if dropped := len(converted) - len(unet):
        logger.info("LoRA: %d text-encoder weights left out (the UNet's are applied)", dropped)
    if alphas is not None:
        alphas = {k: v for k, v in alphas.items() if not k.startswith("text_encoder")}
    return unet, alphas
