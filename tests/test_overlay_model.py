"""Moondream's loading (up to where it needs the weights) and the feature calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from overlay_stand_in import StandInMoondream

from services.models.store import mark_complete
from services.overlay.config import MoondreamFeature as F
from services.overlay.core import OverlayCore
from services.overlay.model import (
    ARTIFACTS,
    FeatureRequest,
    ModelsNotDownloaded,
    check_downloaded,
    load_moondream,
    make_model,
    run_feature,
)
from services.overlay.moondream import MOONDREAM_REPO
from services.runtime import ServiceSpec
from services.topology import Kind

pytestmark = pytest.mark.timeout(30)

MISSING = "models not downloaded for moondream: run download_models --pipeline moondream"


def test_missing_models_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelsNotDownloaded, match=MISSING):
        load_moondream(tmp_path / "nowhere")
    mark_complete(tmp_path, MOONDREAM_REPO)
    with pytest.raises(ModelsNotDownloaded, match="moondream/starmie-v1"):
        check_downloaded(tmp_path)


def test_overlay_service_fails_to_start_with_that_error(tmp_path: Path) -> None:
    spec = ServiceSpec(
        name="overlay", kind=Kind.OVERLAY, run_dir=str(tmp_path), run_id="x", supervisor_pid=0,
        options={"models_dir": str(tmp_path), "load_params": {"compile_model": True}},
    )  # fmt: skip
    with pytest.raises(ModelsNotDownloaded, match=MISSING):
        OverlayCore(spec, outbox=None)  # type: ignore[arg-type]


def test_artifacts_are_declared_for_the_downloader() -> None:
    moondream, tokenizer = ARTIFACTS
    assert moondream.repo_id == "vikhyatk/moondream2"
    assert moondream.revision == "9a7d4024050840e001defacec2b00727e89149e6"  # tag 2025-06-21
    assert {"*.safetensors", "*.py", "*.json"} <= set(moondream.patterns)
    # The model code asks for its tokenizer unpinned; dreamwire downloads a fixed revision.
    assert tokenizer.repo_id == "moondream/starmie-v1"
    assert tokenizer.revision == "35192e10a54e36eabe0a7cc57a2c1aab371cafc5"


def test_stand_in_factory(tmp_path: Path) -> None:
    model = make_model("overlay_stand_in:StandInMoondream", tmp_path, False, {"delay_s": 0.0})
    assert isinstance(model, StandInMoondream)
    with pytest.raises(ValueError, match="module:callable"):
        make_model("overlay_stand_in", tmp_path, False, {})


def request(feature: F, max_objects: int = 10) -> FeatureRequest:
    return FeatureRequest(feature, "short", "Why?", "cat", 0.3, max_objects, 40)


def test_each_feature_calls_the_model_and_returns_json_data() -> None:
    model = StandInMoondream()
    rgb = np.zeros((48, 64, 3), np.uint8)
    assert run_feature(model, request(F.CAPTION), rgb) == {
        "caption": "A short caption of frame 0.",
        "length": "short",
    }
    assert run_feature(model, request(F.QUERY), rgb) == {
        "question": "Why?",
        "answer": "Frame 0 answers: Why?",
    }
    detected = run_feature(model, request(F.DETECT, max_objects=1), rgb)
    assert detected == {
        "object": "cat",
        "objects": [{"x_min": 0.25, "y_min": 0.25, "x_max": 0.75, "y_max": 0.75}],
    }
    pointed = run_feature(model, request(F.POINT), rgb)
    assert pointed["object"] == "cat" and len(pointed["points"]) == 2
    text = {"temperature": 0.3, "top_p": 0.3, "max_tokens": 40, "variant": None}
    assert [call[2] for call in model.calls] == [
        text,
        text,
        {"max_objects": 1, "variant": None},
        {"max_objects": 10, "variant": None},
    ]
