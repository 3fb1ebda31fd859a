"""Moondream 2: its artifacts, loading it the real way, and calling one feature on one frame.

The model is loaded with ``transformers`` (``AutoModelForCausalLM.from_pretrained`` with
``trust_remote_code``) from the local models directory that ``download_models`` fills; nothing
is fetched at load time. bfloat16 on CUDA, float32 on CPU.

Anything with Moondream's four methods can stand in for the model (tests, plugins): see
:class:`VisionModel` and :func:`make_model`. torch and transformers are imported only when the
real model is loaded.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import msgspec
import numpy as np

from services.overlay.config import PIPELINE_ID, MoondreamFeature

logger = logging.getLogger(__name__)


class HFArtifact(msgspec.Struct, frozen=True):
    """Files of one Hugging Face repository a pipeline needs (``fnmatch`` patterns).

    Downloaded to ``<models_dir>/<repo_id>/`` (the layout of ``services.models.store``)."""

    repo_id: str
    patterns: tuple[str, ...]
    revision: str
    #: A file whose presence says the repository is there.
    required: str = "config.json"


MOONDREAM_REPO = "vikhyatk/moondream2"
#: The last Moondream 2 release (a tag of the repository).
MOONDREAM_REVISION = "2025-06-21"
#: Moondream's remote code loads its tokenizer from this repository by name (unpinned there).
TOKENIZER_REPO = "moondream/starmie-v1"

ARTIFACTS: tuple[HFArtifact, ...] = (
    HFArtifact(MOONDREAM_REPO, ("*.json", "*.py", "*.safetensors"), MOONDREAM_REVISION),
    HFArtifact(TOKENIZER_REPO, ("*.json",), "main", required="tokenizer.json"),
)


def artifact_dir(models_dir: Path, artifact: HFArtifact) -> Path:
    return models_dir / artifact.repo_id


class ModelsNotDownloaded(RuntimeError):
    """The pipeline's files are not in the models directory."""


class VisionModel(Protocol):
    """Moondream 2's interface (``hf_moondream.HfMoondream``); images are PIL images.

    ``settings`` is keyword-only for caption and query: Moondream has other parameters (``stream``,
    and ``reasoning`` for query) before it.
    """

    def caption(self, image: Any, length: str = ..., *, settings: Any = ...) -> dict[str, Any]: ...

    def query(self, image: Any, question: str, *, settings: Any = ...) -> dict[str, Any]: ...

    def detect(self, image: Any, object: str, settings: Any = ...) -> dict[str, Any]: ...

    def point(self, image: Any, object: str, settings: Any = ...) -> dict[str, Any]: ...


def check_downloaded(models_dir: Path) -> None:
    """Raise :class:`ModelsNotDownloaded` unless every artifact's directory has files."""
    for artifact in ARTIFACTS:
        path = artifact_dir(models_dir, artifact)
        if not (path / artifact.required).is_file():
            raise ModelsNotDownloaded(
                f"models not downloaded for {PIPELINE_ID}: run download_models --pipeline "
                f"{PIPELINE_ID} ({artifact.repo_id} is missing from {path})"
            )


def load_moondream(models_dir: Path, compile_model: bool = False) -> VisionModel:
    """Load Moondream 2 from ``models_dir`` with transformers (no network)."""
    check_downloaded(models_dir)
    import torch
    from transformers import AutoModelForCausalLM

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    model_dir = artifact_dir(models_dir, ARTIFACTS[0])
    logger.info(
        "loading %s@%s from %s on %s as %s",
        MOONDREAM_REPO,
        MOONDREAM_REVISION,
        model_dir,
        device,
        str(dtype).removeprefix("torch."),
    )
    started = time.monotonic()
    with local_tokenizer(artifact_dir(models_dir, ARTIFACTS[1]) / "tokenizer.json"):
        model: Any = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            revision=MOONDREAM_REVISION,
            trust_remote_code=True,
            local_files_only=True,
            dtype=dtype,
        )
    model.to(device).eval()
    if compile_model:
        logger.info("compiling moondream (slower start-up, faster inference)")
        # Moondream's own compile() (on the inner model) compiles its decode steps.
        inner: Any = getattr(model, "model", model)
        inner.compile()
    logger.info("moondream loaded in %.1f s", time.monotonic() - started)
    return cast(VisionModel, model)


@contextlib.contextmanager
def local_tokenizer(tokenizer_json: Path) -> Iterator[None]:
    """Serve ``Tokenizer.from_pretrained(TOKENIZER_REPO)`` from the downloaded file.

    Moondream's remote code (imported during ``from_pretrained``) does
    ``from tokenizers import Tokenizer`` and fetches its tokenizer by repository name at
    construction. While this context is active that name resolves to a shim whose
    ``from_pretrained`` reads the local file; every other attribute is the real class's.
    """
    import tokenizers

    real = tokenizers.Tokenizer

    class _Meta(type):
        def __getattr__(cls, name: str) -> Any:
            return getattr(real, name)

    class TokenizerShim(metaclass=_Meta):
        @staticmethod
        def from_pretrained(identifier: str, *args: Any, **kwargs: Any) -> Any:
            if identifier == TOKENIZER_REPO:
                return real.from_file(str(tokenizer_json))
            return real.from_pretrained(identifier, *args, **kwargs)

    setattr(tokenizers, "Tokenizer", TokenizerShim)  # noqa: B010 - module attribute swap
    try:
        yield
    finally:
        setattr(tokenizers, "Tokenizer", real)  # noqa: B010


def make_model(
    factory: str | None, models_dir: Path, compile_model: bool, options: dict[str, Any]
) -> VisionModel:
    """The real Moondream (``factory`` None), or ``module:callable(**options)``."""
    if factory is None:
        return load_moondream(models_dir, compile_model)
    module_name, _, attr = factory.partition(":")
    if not attr:
        raise ValueError(f"model factory must be 'module:callable', got {factory!r}")
    built = getattr(importlib.import_module(module_name), attr)(**options)
    logger.info("using stand-in model %s", factory)
    return cast(VisionModel, built)


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """One model call: the feature and the parameters it uses."""

    feature: MoondreamFeature
    caption_length: str
    question: str
    detect_object: str
    temperature: float
    max_objects: int


def run_feature(model: VisionModel, request: FeatureRequest, rgb: np.ndarray) -> dict[str, Any]:
    """Call the model on an H×W×3 uint8 frame; a JSON-able result (model keys + its input).

    Settings as Scope's plugin passes them: ``temperature`` for caption and query,
    ``max_objects`` for detect and point. Coordinates stay normalised to [0, 1].
    """
    from PIL import Image

    image = Image.fromarray(rgb)  # H×W×3 uint8 → mode "RGB"
    match request.feature:
        case MoondreamFeature.CAPTION:
            out = model.caption(
                image,
                length=request.caption_length,
                settings={"temperature": request.temperature},
            )
            return {"caption": str(out.get("caption", "")), "length": request.caption_length}
        case MoondreamFeature.QUERY:
            out = model.query(
                image, question=request.question, settings={"temperature": request.temperature}
            )
            return {"question": request.question, "answer": str(out.get("answer", ""))}
        case MoondreamFeature.DETECT:
            out = model.detect(
                image, object=request.detect_object, settings={"max_objects": request.max_objects}
            )
            objects = [
                {k: float(obj[k]) for k in ("x_min", "y_min", "x_max", "y_max")}
                for obj in out.get("objects", [])[: request.max_objects]
            ]
            return {"object": request.detect_object, "objects": objects}
        case MoondreamFeature.POINT:
            out = model.point(
                image, object=request.detect_object, settings={"max_objects": request.max_objects}
            )
            points = [
                {"x": float(pt["x"]), "y": float(pt["y"])}
                for pt in out.get("points", [])[: request.max_objects]
            ]
            return {"object": request.detect_object, "points": points}
    raise ValueError(f"unknown feature {request.feature!r}")
