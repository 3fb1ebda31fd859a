"""Moondream 2: its artifacts, loading its own code, and calling one feature on one frame.

The real model is Moondream's own code and weights from the models directory that
``download_models`` fills, loaded by :mod:`services.overlay.moondream` (no ``trust_remote_code``,
nothing fetched at load time).

Anything with Moondream's four methods can stand in for the model (tests that need canned
answers, plugins): see :class:`VisionModel` and :func:`make_model`. torch and transformers are
imported only when the real model is loaded.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import msgspec
import numpy as np

from services.models.store import is_complete, repo_dir
from services.overlay import moondream as md
from services.overlay.config import PIPELINE_ID, MoondreamFeature

logger = logging.getLogger(__name__)


class HFArtifact(msgspec.Struct, frozen=True):
    """Files of one Hugging Face repository a pipeline needs (``fnmatch`` patterns), at a fixed
    revision; downloaded to ``<models_dir>/<repo_id>/`` (``services.models.store``)."""

    repo_id: str
    patterns: tuple[str, ...]
    revision: str


ARTIFACTS: tuple[HFArtifact, ...] = (
    HFArtifact(md.MOONDREAM_REPO, ("*.json", "*.py", "*.safetensors"), md.MOONDREAM_REVISION),
    HFArtifact(md.TOKENIZER_REPO, ("*.json",), md.TOKENIZER_REVISION),
)


class ModelsNotDownloaded(RuntimeError):
    """The pipeline's files are not in the models directory."""


class VisionModel(Protocol):
    """Moondream 2's interface (``moondream.MoondreamModel``); images are PIL images.

    ``settings`` is keyword-only for caption and query: Moondream has other parameters (``stream``,
    and ``reasoning`` for query) before it.
    """

    def caption(self, image: Any, length: str = ..., *, settings: Any = ...) -> dict[str, Any]: ...

    def query(self, image: Any, question: str, *, settings: Any = ...) -> dict[str, Any]: ...

    def detect(self, image: Any, object: str, settings: Any = ...) -> dict[str, Any]: ...

    def point(self, image: Any, object: str, settings: Any = ...) -> dict[str, Any]: ...


def check_downloaded(models_dir: Path) -> None:
    """Raise :class:`ModelsNotDownloaded` unless the downloader completed every artifact."""
    for artifact in ARTIFACTS:
        if not is_complete(models_dir, artifact.repo_id):
            raise ModelsNotDownloaded(
                f"models not downloaded for {PIPELINE_ID}: run download_models --pipeline "
                f"{PIPELINE_ID} ({artifact.repo_id} is missing from "
                f"{repo_dir(models_dir, artifact.repo_id)})"
            )


def load_moondream(models_dir: Path, compile_model: bool = False) -> VisionModel:
    """Moondream 2 from ``models_dir``: its own code, its weights, the pinned tokenizer."""
    check_downloaded(models_dir)
    loaded = md.load(
        repo_dir(models_dir, md.MOONDREAM_REPO),
        repo_dir(models_dir, md.TOKENIZER_REPO) / "tokenizer.json",
    )
    if compile_model:
        logger.info("compiling moondream (slower start-up, faster inference)")
        loaded.model.model.compile()  # Moondream's own: vision encoder, prefill, decode steps
    return cast(VisionModel, loaded.model)


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


#: Moondream's own default nucleus for caption and query (passed explicitly, as every key is).
TOP_P = 0.3


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """One model call: the feature and the parameters it uses."""

    feature: MoondreamFeature
    caption_length: str
    question: str
    detect_object: str
    temperature: float
    max_objects: int
    max_tokens: int


def text_settings(request: FeatureRequest) -> dict[str, Any]:
    """Every key Moondream's caption and query read: ``variant`` None (no fine-tuned variant:
    those are fetched from Moondream's servers) and a bounded answer (its default is 768
    tokens: seconds per result on live video)."""
    return {
        "temperature": request.temperature,
        "top_p": TOP_P,
        "max_tokens": request.max_tokens,
        "variant": None,
    }


def object_settings(request: FeatureRequest) -> dict[str, Any]:
    """Every key Moondream's detect and point read."""
    return {"max_objects": request.max_objects, "variant": None}


def run_feature(model: VisionModel, request: FeatureRequest, rgb: np.ndarray) -> dict[str, Any]:
    """Call the model on an H×W×3 uint8 frame; a JSON-able result (model keys + its input).
    Coordinates stay normalised to [0, 1], as Moondream gives them."""
    from PIL import Image

    image = Image.fromarray(rgb)  # H×W×3 uint8 → mode "RGB"
    match request.feature:
        case MoondreamFeature.CAPTION:
            out = model.caption(
                image, length=request.caption_length, settings=text_settings(request)
            )
            return {"caption": str(out.get("caption", "")), "length": request.caption_length}
        case MoondreamFeature.QUERY:
            out = model.query(image, question=request.question, settings=text_settings(request))
            return {"question": request.question, "answer": str(out.get("answer", ""))}
        case MoondreamFeature.DETECT:
            out = model.detect(
                image, object=request.detect_object, settings=object_settings(request)
            )
            objects = [
                {k: float(obj[k]) for k in ("x_min", "y_min", "x_max", "y_max")}
                for obj in out.get("objects", [])[: request.max_objects]
            ]
            return {"object": request.detect_object, "objects": objects}
        case MoondreamFeature.POINT:
            out = model.point(
                image, object=request.detect_object, settings=object_settings(request)
            )
            points = [
                {"x": float(pt["x"]), "y": float(pt["y"])}
                for pt in out.get("points", [])[: request.max_objects]
            ]
            return {"object": request.detect_object, "points": points}
    raise ValueError(f"unknown feature {request.feature!r}")
