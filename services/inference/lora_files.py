"""LoRA files as a load names them, checked before anything loads them. No torch here:
signalling checks a load's LoRAs with this before the running pipeline is touched.

What a load's ``loras`` may name (Scope's contract: ``load_params.loras = [{"path", "scale",
"merge_mode"}]``, ``path`` as ``GET /api/v1/loras`` lists it):

* a file inside ``<models_dir>/loras`` (a relative path is taken from there; symlinks are
  followed and must stay inside);
* a ``.safetensors`` file: a ``.pt`` or ``.bin`` is a pickle, which can run code when loaded;
* of at most ``MAX_LORA_BYTES``, whose header parses and names LoRA weights
  (``lora_A``/``lora_B``, ``lora_down``/``lora_up``) and nothing but LoRA weights and alphas. A
  file of zeros has no header; a checkpoint is not a LoRA.

Whether its keys and shapes fit the model is checked where the model is (the inference
process), with the same refusal: the load fails naming the file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec

LORA_DIR = "loras"
MAX_LORA_BYTES = 4 * 2**30
MergeMode = Literal["permanent_merge", "runtime_peft"]
#: A LoRA weight (up/down or A/B, in PEFT's, kohya's and diffusers' spellings).
LORA_WEIGHT = re.compile(r"(^|\.|_)(lora_(A|B|down|up)|lora\.(down|up))", re.IGNORECASE)
#: What else a LoRA file holds: alphas, and the full-weight differences some trainers add.
LORA_EXTRA = re.compile(r"(\.alpha|\.diff|\.diff_b|\.dora_scale)$")


class LoraItem(msgspec.Struct, forbid_unknown_fields=True):
    """One LoRA of a load (Scope's ``LoRAConfig``)."""

    path: str
    scale: Annotated[float, msgspec.Meta(ge=-10.0, le=10.0)] = 1.0
    #: None: the load's ``lora_merge_mode``.
    merge_mode: MergeMode | None = None


class LoraScale(msgspec.Struct, forbid_unknown_fields=True):
    """A run-time scale change (``lora_scales`` on the data channel)."""

    path: str
    scale: Annotated[float, msgspec.Meta(ge=-10.0, le=10.0)]


class LoraFileError(ValueError):
    """A LoRA a load names cannot be used; the message names it and why."""


def lora_dir(models_dir: Path) -> Path:
    return models_dir / LORA_DIR


def lora_path(path: str, models_dir: Path) -> Path:
    """The file ``path`` names, checked (see the module doc); raises :class:`LoraFileError`."""
    root = lora_dir(models_dir).resolve()
    given = Path(path).expanduser()
    resolved = (given if given.is_absolute() else root / given).resolve()
    if not resolved.is_relative_to(root):
        raise LoraFileError(f"{path}: not in the LoRA directory {root}")
    if resolved.suffix.lower() != ".safetensors":
        kind = resolved.suffix or "file without an extension"
        raise LoraFileError(
            f"{path}: only .safetensors LoRAs load here (a {kind} may be a pickle, which can "
            "run code when loaded)"
        )
    if not resolved.is_file():
        raise LoraFileError(f"{path}: no such file in {root}")
    check_lora_file(path, resolved)
    return resolved


def check_lora_file(label: str, file: Path) -> None:
    """Its size and header name LoRA weights and nothing else (``label`` names it in errors)."""
    size = file.stat().st_size
    if size > MAX_LORA_BYTES:
        raise LoraFileError(f"{label}: {size / 2**30:.1f} GB is not a LoRA (at most 4 GB)")
    keys = _header_keys(label, file)
    other = [k for k in keys if not LORA_WEIGHT.search(k) and not LORA_EXTRA.search(k)]
    if other:
        raise LoraFileError(
            f"{label}: {len(other)} of its {len(keys)} tensors are not LoRA weights "
            f"({', '.join(other[:3])}): a checkpoint, not a LoRA"
        )
    if not any(LORA_WEIGHT.search(k) for k in keys):
        raise LoraFileError(f"{label}: no LoRA weights in it (lora_A/lora_B, lora_down/lora_up)")


def _header_keys(path: str, resolved: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(resolved), "np") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise LoraFileError(f"{path}: not a readable safetensors file ({exc})") from exc
