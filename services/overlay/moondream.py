"""Loading Moondream 2 from the model code it ships, without ``trust_remote_code``.

The Hugging Face repository ``vikhyatk/moondream2`` carries its own PyTorch modules
(``hf_moondream.py``, ``moondream.py``, ``text.py``, …) beside ``config.json`` and
``model.safetensors``. ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)`` fails
on them in ways that do not depend on the model (``HfMoondream`` never calls ``post_init``: an
``AttributeError`` on transformers 5; its constructor-computed buffers left uninitialised when
forced; on transformers 4 a local folder loses the modules imported only indirectly). So this
module does what the model needs and nothing more:

1. import the downloaded folder as one Python package (its relative imports resolve), named
   after a hash of its sources so that two revisions never share a module;
2. build ``HfMoondream(HfConfig())`` directly on the target device: the constructor computes the
   attention mask and the rotary table itself, so they are right;
3. load ``model.safetensors`` with ``strict=True``: every key must fit, none may be left over.

Moondream's constructor fetches its tokenizer by repository name (``moondream/starmie-v1``,
unpinned); while the model is built that one call is served from the downloaded, pinned copy.

``HfConfig`` discards the sizes in ``config.json`` (it sets ``config = {}``): the real release
uses the defaults in ``config.py``. A ``config`` object in ``config.json`` (as the tiny test
models written by ``scripts/make_tiny_moondream.py`` carry) is honoured.

Precision: the model code builds its weights in bfloat16 and casts image crops to bfloat16, so
bfloat16 is what runs, on CUDA and on the CPU alike; the log says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

MOONDREAM_REPO = "vikhyatk/moondream2"
#: The 2025-06-21 release (the repository's tag of that name), pinned by commit.
MOONDREAM_REVISION = "9a7d4024050840e001defacec2b00727e89149e6"
MOONDREAM_RELEASE = "2025-06-21"
#: Moondream's code loads its tokenizer from this repository by name; dreamwire pins it.
TOKENIZER_REPO = "moondream/starmie-v1"
TOKENIZER_REVISION = "35192e10a54e36eabe0a7cc57a2c1aab371cafc5"

ENTRY_MODULE = "hf_moondream"
WEIGHTS_FILE = "model.safetensors"
#: What dreamwire calls on the model (Moondream's public interface).
FEATURES = ("caption", "query", "detect", "point")


class ModelCodeMismatch(RuntimeError):
    """The downloaded model code or weights are not what this loader knows how to run."""


@dataclass(frozen=True)
class LoadedMoondream:
    model: Any  # hf_moondream.HfMoondream
    device: str
    dtype: str
    parameters: int


def code_package_name(code_dir: Path) -> str:
    """A package name unique to the folder's sources (two revisions never share modules)."""
    digest = hashlib.sha256()
    for path in sorted(code_dir.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return f"dreamwire_moondream_{digest.hexdigest()[:16]}"


def import_model_code(code_dir: Path, revision: str) -> ModuleType:
    """The folder's ``hf_moondream`` module, imported with the folder as a package."""
    if not (code_dir / f"{ENTRY_MODULE}.py").is_file():
        raise ModelCodeMismatch(
            f"{MOONDREAM_REPO}@{revision}: {code_dir} has no {ENTRY_MODULE}.py "
            "(download_models --pipeline moondream fetches it)"
        )
    name = code_package_name(code_dir)
    if name not in sys.modules:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(code_dir)]
        sys.modules[name] = importlib.util.module_from_spec(spec)
    try:
        return importlib.import_module(f"{name}.{ENTRY_MODULE}")
    except ImportError as exc:
        raise ModelCodeMismatch(
            f"{MOONDREAM_REPO}@{revision}: importing {ENTRY_MODULE}.py from {code_dir} failed: "
            f"{exc}"
        ) from exc


def _code_attr(module: ModuleType, attr: str, file: str, revision: str) -> Any:
    value = getattr(module, attr, None)
    if value is None:
        raise ModelCodeMismatch(
            f"{MOONDREAM_REPO}@{revision}: {file} has no {attr}; this dreamwire knows the "
            f"interface of release {MOONDREAM_RELEASE}"
        )
    return value


def model_sizes(code_dir: Path) -> dict[str, Any]:
    """The ``config`` object of ``config.json`` (empty in the real release: the defaults)."""
    raw = json.loads((code_dir / "config.json").read_text())
    sizes = raw.get("config") or {}
    if not isinstance(sizes, dict):
        raise ModelCodeMismatch(f"{code_dir / 'config.json'}: 'config' must be an object")
    return sizes


@contextlib.contextmanager
def local_tokenizer(model_module: ModuleType, tokenizer_json: Path) -> Iterator[None]:
    """While the model is built, its ``Tokenizer.from_pretrained(TOKENIZER_REPO)`` reads the
    downloaded file instead of the network; any other name is refused (nothing is fetched)."""
    real: Any = getattr(model_module, "Tokenizer", None)
    if real is None:
        raise ModelCodeMismatch(
            f"{model_module.__name__.rpartition('.')[2]}.py does not load a tokenizer the way "
            f"release {MOONDREAM_RELEASE} does (no Tokenizer name)"
        )

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(identifier: str, *args: Any, **kwargs: Any) -> Any:
            if identifier != TOKENIZER_REPO:
                raise ModelCodeMismatch(
                    f"the model code asks for tokenizer {identifier!r}; dreamwire has "
                    f"{TOKENIZER_REPO} and fetches nothing at load time"
                )
            return real.from_file(str(tokenizer_json))

    setattr(model_module, "Tokenizer", LocalTokenizer)  # noqa: B010 - a module global swap
    try:
        yield
    finally:
        setattr(model_module, "Tokenizer", real)  # noqa: B010


def build_model(code_dir: Path, tokenizer_json: Path, device: str, revision: str) -> Any:
    """``HfMoondream`` with its buffers computed on ``device``; weights not yet loaded."""
    import torch

    hf = import_model_code(code_dir, revision)
    hf_config = _code_attr(hf, "HfConfig", f"{ENTRY_MODULE}.py", revision)
    hf_model = _code_attr(hf, "HfMoondream", f"{ENTRY_MODULE}.py", revision)
    moondream_module = sys.modules.get(hf.__name__.rpartition(".")[0] + ".moondream")
    if moondream_module is None:
        raise ModelCodeMismatch(f"{MOONDREAM_REPO}@{revision}: no moondream.py in {code_dir}")
    config = hf_config()
    config.config = model_sizes(code_dir)
    with local_tokenizer(moondream_module, tokenizer_json), torch.device(device):
        try:
            model = hf_model(config)
        except (TypeError, AttributeError, KeyError) as exc:
            raise ModelCodeMismatch(
                f"{MOONDREAM_REPO}@{revision}: building HfMoondream from {ENTRY_MODULE}.py "
                f"failed: {type(exc).__name__}: {exc}"
            ) from exc
    inner = getattr(model, "model", None)
    missing = [name for name in FEATURES if not callable(getattr(inner, name, None))]
    if missing:
        raise ModelCodeMismatch(
            f"{MOONDREAM_REPO}@{revision}: moondream.py's model has no {', '.join(missing)}"
        )
    return model


def load_weights(model: Any, weights: Path, device: str, revision: str) -> None:
    """``model.safetensors`` into the model, every key accounted for."""
    from safetensors.torch import load_file

    state = load_file(str(weights), device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelCodeMismatch(
            f"{MOONDREAM_REPO}@{revision}: {WEIGHTS_FILE} does not fit the model that "
            f"{ENTRY_MODULE}.py builds: {' '.join(str(exc).split())}"
        ) from exc


def load(
    code_dir: Path, tokenizer_json: Path, revision: str = MOONDREAM_REVISION
) -> LoadedMoondream:
    """Moondream 2 from a downloaded repository folder, on CUDA when there is one."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.monotonic()
    model = build_model(code_dir, tokenizer_json, device, revision)
    load_weights(model, code_dir / WEIGHTS_FILE, device, revision)
    model.eval()
    first = next(model.parameters())
    loaded = LoadedMoondream(
        model=model,
        device=str(first.device),
        dtype=str(first.dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()),
    )
    logger.info(
        "moondream %s@%s (%s) loaded in %.1f s: %.1f M parameters on %s as %s "
        "(Moondream's own code builds its weights and image crops in bfloat16)",
        MOONDREAM_REPO,
        MOONDREAM_RELEASE,
        revision[:12],
        time.monotonic() - started,
        loaded.parameters / 1e6,
        loaded.device,
        loaded.dtype,
    )
    return loaded
