"""streamdiffusionv2, longlive and krea-realtime-video in one process on tiny random models
(original-key checkpoints, diffusers-layout text encoder and VAE, loaded by the real loaders)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from services.inference import registry  # noqa: E402
from services.inference.pipeline import PipelineSpec, Request  # noqa: E402
from services.inference.wan import specs as ws  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
SPECS = {s.id: s for s in (ws.STREAMDIFFUSIONV2, ws.LONGLIVE, ws.KREA_REALTIME_VIDEO)}


def config(pipeline_id: str, **params: Any) -> Any:
    return registry.full_config(SPECS[pipeline_id], {"height": SIZE, "width": SIZE, **params})


_loaded: dict[str, Any] = {}


@pytest.fixture(scope="module")
def models(tiny_wan: Path) -> Path:
    return tiny_wan


@pytest.fixture(scope="module")
def pipes(models: Path) -> Iterator[dict[str, Any]]:
    for pid, spec in SPECS.items():
        _loaded[pid] = spec.load(config(pid), models)
        # Blocks on demand, so counters can be read between calls; blocks ahead (the default
        # in the service) have their own test below and run in the end-to-end tests.
        _loaded[pid].prefetch = False
    yield _loaded
    _loaded.clear()


def text(pipe: Any, state: Any, n: int, start: int = 0) -> list[Any]:
    out = []
    for i in range(start, start + n):
        (r,) = pipe([Request(state, None, i)])
        out.append(r)
    return out


def moving_frames(n: int, step: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return [np.roll(base, i * step, axis=1) for i in range(n)]


def diff(a: Any, b: Any) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


@pytest.mark.parametrize("pipeline_id", list(SPECS))
def test_text_mode_frames_at_size_and_block_cadence(
    pipes: dict[str, Any], pipeline_id: str
) -> None:
    pipe = pipes[pipeline_id]
    n = pipe.block_frames
    first, later = 4 * n - 3, 4 * n
    state = pipe.new_session("t", SIZE, SIZE, config(pipeline_id))
    results = text(pipe, state, first + 2 * later)
    assert [r.tag for r in results] == list(range(first + 2 * later))
    for r in results:
        assert tuple(r.frame.shape) == (SIZE, SIZE, 3) and r.frame.dtype == torch.uint8
    blocks = [r.info["block"] for r in results]
    assert blocks == [1] * first + [2] * later + [3] * later  # one block per 4·n frames
    assert state.cache.next_frame == 3 * n


def test_streamdiffusionv2_video_mode_keeps_tags_and_cadence(pipes: dict[str, Any]) -> None:
    pipe = pipes["streamdiffusionv2"]
    state = pipe.new_session("v", SIZE, SIZE, config("streamdiffusionv2"))
    results = []
    for i, f in enumerate(moving_frames(9, 2)):
        (r,) = pipe([Request(state, pipe.prepare(state, f), i)])
        results.append(r)
    # Block 1 is one frame (the VAE's first), then four frames per block, one out per call.
    assert results[0].tag == 0 and results[0].info["block"] == 1
    assert all(r.frame is None for r in results[1:4])
    out = [r for r in results if r.frame is not None]
    assert [r.tag for r in out] == [0, 1, 2, 3, 4, 5]
    assert all(tuple(r.frame.shape) == (SIZE, SIZE, 3) for r in out)
    assert state.blocks == 3


def test_output_depends_on_prompt_and_seed_reproduces(pipes: dict[str, Any]) -> None:
    pipe = pipes["longlive"]

    def run(**params: Any) -> Any:
        state = pipe.new_session("r", SIZE, SIZE, config("longlive", **params))
        return text(pipe, state, 10)[-1].frame.numpy()

    cat = {"prompts": [{"text": "a cat", "weight": 1.0}]}
    a = run(**cat)
    assert np.array_equal(a, run(**cat))
    assert diff(a, run(prompts=[{"text": "a dog on the moon", "weight": 1.0}])) > 0.01
    assert diff(a, run(seed=7, **cat)) > 0.1


def test_manage_cache_resets_on_prompt_change_but_not_in_a_transition(
    pipes: dict[str, Any],
) -> None:
    pipe = pipes["krea-realtime-video"]
    cfg = config("krea-realtime-video")
    state = pipe.new_session("m", SIZE, SIZE, cfg)
    text(pipe, state, 9)
    assert state.cache.resets == 0 and len(state.cache) > 0
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])
    pipe.update(state, dog, {"prompts"})
    assert state.cache.resets == 1 and len(state.cache) == 0
    text(pipe, state, 12, 9)
    cat = msgspec.structs.replace(cfg, transition=ws.Transition([ws.PromptItem("a cat")], 3))
    pipe.update(state, cat, {"transition"})
    pipe.update(state, msgspec.structs.replace(cat, prompts=[ws.PromptItem("a cow")]), {"prompts"})
    assert state.cache.resets == 1  # inside the transition: kept
    off = msgspec.structs.replace(cfg, manage_cache=False, prompts=[ws.PromptItem("a bird")])
    pipe.update(state, off, {"prompts", "manage_cache"})
    assert state.cache.resets == 1


def test_longlive_recaches_recent_frames_on_a_prompt_change(pipes: dict[str, Any]) -> None:
    pipe = pipes["longlive"]
    cfg = config("longlive")
    state = pipe.new_session("l", SIZE, SIZE, cfg)
    text(pipe, state, 9 + 12 + 12)  # three blocks
    kept = list(state.cache.frames)
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])
    pipe.update(state, dog, {"prompts"})
    text(pipe, state, 1, 33)
    assert state.recaches == 1 and state.cache.resets == 0
    assert kept == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # 3 sink frames + the window's recent frames
    text(pipe, state, 12, 34)
    assert state.recaches == 1  # once per change


def test_reset_cache_resets_once(pipes: dict[str, Any]) -> None:
    pipe = pipes["streamdiffusionv2"]
    cfg = config("streamdiffusionv2")
    state = pipe.new_session("r", SIZE, SIZE, cfg)
    text(pipe, state, 5)
    pipe.update(state, msgspec.structs.replace(cfg, reset_cache=True), {"reset_cache"})
    assert state.cache.resets == 1 and len(state.cache) == 0 and state.cache.next_frame == 0
    pipe.update(state, cfg, {"reset_cache"})
    text(pipe, state, 8, 5)
    assert state.cache.resets == 1 and len(state.cache) > 0


def test_kv_cache_attention_bias(pipes: dict[str, Any]) -> None:
    pipe = pipes["krea-realtime-video"]

    def run(bias: float) -> list[Any]:
        state = pipe.new_session(
            "b", SIZE, SIZE, config("krea-realtime-video", kv_cache_attention_bias=bias)
        )
        return [r.frame.numpy() for r in text(pipe, state, 21)]

    one, low = run(1.0), run(0.3)
    assert all(np.array_equal(a, b) for a, b in zip(one[:9], low[:9], strict=True))  # no past yet
    assert diff(one[-1], low[-1]) > 0.01
    unbiased = pipe.new_session("x", SIZE, SIZE, config("krea-realtime-video"))
    pipe.update(unbiased, config("krea-realtime-video", kv_cache_attention_bias=1.0), set())
    assert unbiased.cache.policy.bias(torch.zeros(1), torch.zeros(1)) is None


def test_noise_controller_lowers_noise_when_motion_rises(pipes: dict[str, Any]) -> None:
    pipe = pipes["streamdiffusionv2"]

    def levels(step: int, **params: Any) -> list[float]:
        state = pipe.new_session("n", SIZE, SIZE, config("streamdiffusionv2", **params))
        out = []
        for i, f in enumerate(moving_frames(9, step)):
            (r,) = pipe([Request(state, pipe.prepare(state, f), i)])
            if r.frame is not None:
                out.append(r.info["noise_scale"])
        return out

    still, moving = levels(0), levels(5)
    assert still[-1] == pytest.approx(0.7)
    assert moving[-1] < still[-1] - 0.1
    assert set(levels(5, noise_controller=False)) == {0.7}


def test_two_sessions_keep_separate_caches(pipes: dict[str, Any]) -> None:
    pipe = pipes["longlive"]
    cat = config("longlive", prompts=[{"text": "a cat", "weight": 1.0}])
    dog = config("longlive", prompts=[{"text": "a dog on the moon", "weight": 1.0}], seed=9)
    alone = pipe.new_session("alone", SIZE, SIZE, cat)
    solo = [r.frame.numpy() for r in text(pipe, alone, 21)]
    a = pipe.new_session("a", SIZE, SIZE, cat)
    b = pipe.new_session("b", SIZE, SIZE, dog)
    together_a, together_b = [], []
    for i in range(21):
        ra, rb = pipe([Request(a, None, ("a", i)), Request(b, None, ("b", i))])
        assert ra.tag == ("a", i) and rb.tag == ("b", i)
        together_a.append(ra.frame.numpy())
        together_b.append(rb.frame.numpy())
    assert all(np.array_equal(x, y) for x, y in zip(solo, together_a, strict=True))
    assert a.cache.layers[0][0].data_ptr() != b.cache.layers[0][0].data_ptr()
    assert diff(together_a[-1], together_b[-1]) > 0.1


def test_specs_load_without_models_fail_cleanly(tmp_path: Path) -> None:
    from services.models.downloads import ModelsNotDownloaded

    spec: PipelineSpec = SPECS["longlive"]
    with pytest.raises(ModelsNotDownloaded):
        spec.load(config("longlive"), tmp_path)


@torch.inference_mode()
def test_longlive_serves_its_base_with_the_built_in_lora_merged(
    pipes: dict[str, Any], models: Path
) -> None:
    from services.inference.wan.convert import load_transformer
    from services.models.store import repo_dir

    repo, filename = ws.CHECKPOINTS["longlive"]
    base = load_transformer(repo_dir(models, repo) / filename)
    lora = torch.load(repo_dir(models, repo) / ws.LORAS["longlive"][1])["generator_lora"]
    served = pipes["longlive"].transformer
    a = lora["base_model.model.blocks.0.self_attn.q.lora_A.weight"]
    b = lora["base_model.model.blocks.0.self_attn.q.lora_B.weight"]
    alpha = ws.LORAS["longlive"][2]
    expected = base.blocks[0].attn1.to_q.weight + alpha / a.shape[0] * (b @ a)
    assert torch.allclose(served.blocks[0].attn1.to_q.weight, expected, atol=1e-5)
    # The other two releases ship no LoRA: served as their checkpoints hold them.
    assert "streamdiffusionv2" not in ws.LORAS and "krea-realtime-video" not in ws.LORAS


def test_blocks_ahead_give_the_same_frames_while_the_next_block_is_made(
    pipes: dict[str, Any],
) -> None:
    pipe = pipes["longlive"]
    n = 4 * pipe.block_frames
    count = n - 3 + 2 * n
    plain = pipe.new_session("plain", SIZE, SIZE, config("longlive"))
    expected = text(pipe, plain, count)
    ahead = pipe.new_session("ahead", SIZE, SIZE, config("longlive"))
    pipe.prefetch = True
    try:
        (first,) = pipe([Request(ahead, None, 0)])
        # The first block was made for this call; the second is under way before it is asked for.
        assert first.info["block"] == 1 and ahead.ahead is not None
        pipe.settle(ahead)
        assert ahead.blocks == 2 and len(ahead.out) == (n - 3 - 1) + n
        got = [first, *text(pipe, ahead, count - 1, 1)]
        pipe.settle(ahead)
    finally:
        pipe.prefetch = False
    assert [r.tag for r in got] == [r.tag for r in expected]
    assert [r.info["block"] for r in got] == [r.info["block"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.frame, b.frame)
    # A parameter change waits for the block in flight, then applies from the next block.
    dog = msgspec.structs.replace(config("longlive"), prompts=[ws.PromptItem("a dog")])
    pipe.prefetch = True
    try:
        text(pipe, ahead, 1, count)
        pipe.update(ahead, dog, {"prompts"})
        assert ahead.ahead is None and ahead.pending_recache
    finally:
        pipe.prefetch = False
        pipe.settle(ahead)
    pipe.end_session(ahead)
    pipe.end_session(plain)


@pytest.mark.parametrize("pipeline_id", ["streamdiffusionv2", "longlive"])
def test_warm_up_generates_blocks_in_the_default_mode(
    pipes: dict[str, Any], pipeline_id: str
) -> None:
    from services.inference.core import warm_up

    pipe = pipes[pipeline_id]
    before = pipe.model_calls
    warm_up(pipe, SPECS[pipeline_id], config(pipeline_id))
    steps = len(config(pipeline_id).denoising_step_list)
    # At least two blocks, each its denoising passes plus the pass that writes the cache.
    assert pipe.model_calls - before >= 2 * (steps + 1)
