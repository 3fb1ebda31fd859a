"""Moondream's loading (up to where it needs the weights) and the feature calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from overlay_stand_in import StandInMoondream

from services.overlay.config import MoondreamFeature as F
from services.overlay.core import OverlayCore
from services.overlay.model import (
    ARTIFACTS,
    MOONDREAM_REPO,
    FeatureRequest,
    ModelsNotDownloaded,
    check_downloaded,
    load_moondream,
    local_tokenizer,
    make_model,
    run_feature,
)
from services.runtime import ServiceSpec

pytestmark = pytest.mark.timeout(30)

MISSING = "models not downloaded for moondream: run download_models --pipeline moondream"


def test_missing_models_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelsNotDownloaded, match=MISSING):
        load_moondream(tmp_path / "nowhere")
    (tmp_path / MOONDREAM_REPO).mkdir(parents=True)
    (tmp_path / MOONDREAM_REPO / "config.json").write_text("{}")
    with pytest.raises(ModelsNotDownloaded, match="moondream/starmie-v1"):
        check_downloaded(tmp_path)


def test_overlay_service_fails_to_start_with_that_error(tmp_path: Path) -> None:
    spec = ServiceSpec(
        name="overlay", kind="overlay", run_dir=str(tmp_path), run_id="x", supervisor_pid=0,
        options={"models_dir": str(tmp_path), "load_params": {"compile_model": True}},
    )  # fmt: skip
    with pytest.raises(ModelsNotDownloaded, match=MISSING):
        OverlayCore(spec, outbox=None)  # type: ignore[arg-type]


def test_artifacts_are_declared_for_the_downloader() -> None:
    moondream, tokenizer = ARTIFACTS
    assert moondream.repo_id == "vikhyatk/moondream2"
    assert moondream.revision == "2025-06-21"
    assert {"*.safetensors", "*.py", "*.json"} <= set(moondream.patterns)
    assert tokenizer.repo_id == "moondream/starmie-v1"


def test_stand_in_factory(tmp_path: Path) -> None:
    model = make_model("overlay_stand_in:StandInMoondream", tmp_path, False, {"delay_s": 0.0})
    assert isinstance(model, StandInMoondream)
    with pytest.raises(ValueError, match="module:callable"):
        make_model("overlay_stand_in", tmp_path, False, {})


def request(feature: F, max_objects: int = 10) -> FeatureRequest:
    return FeatureRequest(feature, "short", "Why?", "cat", 0.3, max_objects)


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
    assert [call[2] for call in model.calls] == [
        {"temperature": 0.3},
        {"temperature": 0.3},
        {"max_objects": 1},
        {"max_objects": 10},
    ]


def test_local_tokenizer_serves_moondreams_tokenizer_from_the_models_dir(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "moon": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    real = tokenizers.Tokenizer
    with local_tokenizer(path):
        from tokenizers import Tokenizer  # as Moondream's remote code imports it

        loaded = Tokenizer.from_pretrained("moondream/starmie-v1")
        assert loaded.encode("hello moon").ids == [1, 2]
        assert Tokenizer.from_file(str(path)).encode("moon").ids == [2]
    assert tokenizers.Tokenizer is real
