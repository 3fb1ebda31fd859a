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
from services.inference.pipeline import PipelineSpec, Request, Transition  # noqa: E402
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
        (r,) = pipe([Request("s", state, None, i)])
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
    first = 4 * (pipe.geometry.first_block_frames - 1) + 1  # streamdiffusionv2: 2 latents
    later = 4 * pipe.block_frames
    state = pipe.new_session("t", SIZE, SIZE, config(pipeline_id))
    results = text(pipe, state, first + 2 * later)
    assert [r.tag for r in results] == list(range(first + 2 * later))
    for r in results:
        assert tuple(r.frame.shape) == (SIZE, SIZE, 3) and r.frame.dtype == torch.uint8
    blocks = [r.info["block"] for r in results]
    assert blocks == [1] * first + [2] * later + [3] * later  # one block per 4·n frames
    g = pipe.geometry
    assert state.stream.next_frame == g.first_block_frames + 2 * g.block_frames


def test_streamdiffusionv2_video_mode_keeps_tags_and_cadence(pipes: dict[str, Any]) -> None:
    pipe = pipes["streamdiffusionv2"]
    state = pipe.new_session("v", SIZE, SIZE, config("streamdiffusionv2"))
    results = []
    for i, f in enumerate(moving_frames(13, 2)):
        (r,) = pipe([Request("s", state, pipe.prepare(state, f), i)])
        results.append(r)
    # Block 1 is five frames (two latents, as Scope's), then four frames per block.
    assert all(r.frame is None for r in results[:4])
    assert results[4].tag == 0 and results[4].info["block"] == 1
    out = [r for r in results if r.frame is not None]
    assert [r.tag for r in out] == list(range(9))
    assert all(tuple(r.frame.shape) == (SIZE, SIZE, 3) for r in out)
    assert state.blocks == 3 and state.stream.next_frame == 4


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


def video(pipe: Any, state: Any, n: int, start: int = 0) -> list[Any]:
    out = []
    for i, f in enumerate(moving_frames(n, 1, seed=start), start):
        (r,) = pipe([Request("s", state, pipe.prepare(state, f), i)])
        out.append(r)
    return out


def test_manage_cache_cuts_on_a_prompt_change_in_video_mode_only(pipes: dict[str, Any]) -> None:
    """Scope's setup_caches: a new prompt outside a transition starts the stream afresh when
    video comes in and ``manage_cache`` is on; text mode keeps its cache."""
    pipe = pipes["streamdiffusionv2"]
    cfg = config("streamdiffusionv2")
    state = pipe.new_session("m", SIZE, SIZE, cfg)
    video(pipe, state, 9)
    cuts = state.stream.cuts
    assert state.stream.next_frame == 3 and len(state.stream.cache) == 3
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])
    pipe.update(state, dog, {"prompts"})
    video(pipe, state, 5, 9)
    assert state.stream.cuts == cuts + 1 and state.stream.next_frame == 2
    cat = msgspec.structs.replace(dog, transition=Transition([ws.PromptItem("a cat")], 3))
    pipe.update(state, cat, {"transition"})
    pipe.update(state, msgspec.structs.replace(cat, prompts=[ws.PromptItem("a cow")]), {"prompts"})
    video(pipe, state, 4, 14)
    assert state.stream.cuts == cuts + 1  # inside the transition: kept
    off = msgspec.structs.replace(cfg, manage_cache=False, prompts=[ws.PromptItem("a bird")])
    pipe.update(state, off, {"prompts", "manage_cache"})
    video(pipe, state, 4, 18)
    assert state.stream.cuts == cuts + 1 and state.stream.next_frame == 4

    texts = pipe.new_session("t", SIZE, SIZE, cfg)
    text(pipe, texts, 9)
    cuts = texts.stream.cuts
    pipe.update(texts, dog, {"prompts"})
    text(pipe, texts, 4, 9)
    assert texts.stream.cuts == cuts and texts.stream.next_frame == 4


def test_longlive_recaches_recent_frames_on_a_prompt_change(pipes: dict[str, Any]) -> None:
    """Scope's recache_frames: past a full window the sinks keep their keys and the nine
    frames after them are recomputed with the new prompt; the cache keeps its positions."""
    pipe = pipes["longlive"]
    cfg = config("longlive")
    state = pipe.new_session("l", SIZE, SIZE, cfg)
    text(pipe, state, 9 + 4 * 12)  # five blocks: 15 latent frames
    cache = state.stream.cache
    assert cache.positions == [0, 1, 2, *range(6, 15)]  # 3 sinks + the 9 most recent
    # The last layer's keys (the first layer's come before any cross-attention); 2x2 latent
    # tokens per frame.
    sinks = cache.layers[-1][0][:, : 3 * 4].clone()
    rest = cache.layers[-1][0][:, 3 * 4 :].clone()
    cuts = state.stream.cuts
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])
    pipe.update(state, dog, {"prompts"})
    pipe.loop.recache(state.stream, pipe._cross(state, state.prompt.step()))
    assert state.stream.recaches == 1 and state.stream.cuts == cuts
    assert cache.positions == [0, 1, 2, *range(6, 15)]
    assert torch.equal(cache.layers[-1][0][:, : 3 * 4], sinks)
    assert not torch.allclose(cache.layers[-1][0][:, 3 * 4 :], rest, atol=1e-4)
    # Through the pipeline: once per change of the embedding.
    fresh = pipe.new_session("f", SIZE, SIZE, cfg)
    text(pipe, fresh, 9)
    pipe.update(fresh, dog, {"prompts"})
    text(pipe, fresh, 1, 9)
    assert fresh.stream.recaches == 1
    text(pipe, fresh, 24, 10)
    assert fresh.stream.recaches == 1


def test_reset_cache_is_a_hard_cut_once(pipes: dict[str, Any]) -> None:
    pipe = pipes["streamdiffusionv2"]
    cfg = config("streamdiffusionv2")
    state = pipe.new_session("r", SIZE, SIZE, cfg)
    text(pipe, state, 5)
    cuts = state.stream.cuts
    pipe.update(state, msgspec.structs.replace(cfg, reset_cache=True), {"reset_cache"})
    pipe.update(state, cfg, {"reset_cache"})
    text(pipe, state, 5, 5)
    # Frame 0 again: the first block of two latents, its five frames.
    assert state.stream.cuts == cuts + 1 and state.stream.next_frame == 2
    text(pipe, state, 8, 10)
    assert state.stream.cuts == cuts + 1 and state.stream.next_frame == 4


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


def test_noise_controller_lowers_noise_when_motion_rises(pipes: dict[str, Any]) -> None:
    pipe = pipes["streamdiffusionv2"]

    def levels(step: int, **params: Any) -> list[float]:
        state = pipe.new_session("n", SIZE, SIZE, config("streamdiffusionv2", **params))
        out = []
        for i, f in enumerate(moving_frames(9, step)):
            (r,) = pipe([Request("s", state, pipe.prepare(state, f), i)])
            if r.frame is not None:
                out.append(r.info["noise_scale"])
        return out

    still, moving = levels(0), levels(5)
    # Scope's controller: 0.9·(0.8 − 0.2·motion) + 0.1·noise_scale.
    assert still[-1] == pytest.approx(0.9 * 0.8 + 0.1 * 0.7)
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
        ra, rb = pipe([Request("a", a, None, ("a", i)), Request("b", b, None, ("b", i))])
        assert ra.tag == ("a", i) and rb.tag == ("b", i)
        together_a.append(ra.frame.numpy())
        together_b.append(rb.frame.numpy())
    assert all(np.array_equal(x, y) for x, y in zip(solo, together_a, strict=True))
    assert a.stream.cache.layers[0][0].data_ptr() != b.stream.cache.layers[0][0].data_ptr()
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


def text_ahead(pipe: Any, state: Any, n: int, start: int = 0) -> list[Any]:
    """``text`` with blocks ahead: a tick that finds the block still being made gets no frame;
    then wait for that block (its future) and ask again."""
    out = []
    for i in range(start, start + n):
        while True:
            in_flight = state.ahead
            (r,) = pipe([Request("s", state, None, i)])
            if r.frame is not None:
                break
            assert in_flight is not None and r.info == {"warming_up": True}
            in_flight.result()
        out.append(r)
    return out


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
        (first,) = pipe([Request("s", ahead, None, 0)])
        # The first block was made for this call; the second is under way before it is asked for.
        assert first.info["block"] == 1 and ahead.ahead is not None
        pipe.settle(ahead)
        assert ahead.blocks == 2 and len(ahead.out) == (n - 3 - 1) + n
        got = [first, *text_ahead(pipe, ahead, count - 1, 1)]
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
        text_ahead(pipe, ahead, 1, count)
        pipe.update(ahead, dog, {"prompts"})
        assert ahead.ahead is None
    finally:
        pipe.prefetch = False
        pipe.settle(ahead)
    pipe.end_session(ahead)
    pipe.end_session(plain)


def test_a_tick_does_not_wait_for_the_block_in_flight(pipes: dict[str, Any]) -> None:
    """The service loop must stay free (heartbeats, other sessions) while a block is made."""
    import threading

    pipe = pipes["longlive"]
    state = pipe.new_session("busy", SIZE, SIZE, config("longlive"))
    release = threading.Event()
    real = pipe._text_block

    def held(s: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():
            assert release.wait(60), "never released"
        return real(s)

    pipe._text_block = held
    pipe.prefetch = True
    try:
        first = text(pipe, state, 9)  # block 1 on the call; block 2 submitted, held
        assert all(r.frame is not None for r in first) and state.ahead is not None
        (r,) = pipe([Request("s", state, None, 9)])
        assert r.frame is None and r.info == {"warming_up": True}
        assert not state.ahead.done()  # returned while the block is still held
        release.set()
        state.ahead.result()
        (r,) = pipe([Request("s", state, None, 10)])
        assert r.frame is not None and r.info["block"] == 2
    finally:
        release.set()
        del pipe._text_block
        pipe.prefetch = False
        pipe.end_session(state)


def test_a_video_block_whose_inputs_are_there_follows_the_last_at_once(
    pipes: dict[str, Any],
) -> None:
    """A model slower than the camera: the next block's frames arrived while one was made, so
    the worker goes on without waiting for another call (the next frame's arrival); a settle
    stops that chain after the block in hand."""
    import threading

    pipe = pipes["longlive"]
    release = threading.Event()
    real = pipe._video_frames

    def held(*args: Any) -> Any:
        assert release.wait(60), "never released"
        return real(*args)

    state = pipe.new_session("chain", SIZE, SIZE, config("longlive"))
    pipe._video_frames = held
    pipe.prefetch = True
    try:
        video(pipe, state, 9 + 12)  # block 1 under way (held) while 12 more arrive
        assert state.ahead is not None and not state.ahead.done()
        release.set()
        state.ahead.result(timeout=60)
        assert state.blocks == 2  # block 2 followed without a call
        assert [tag for _, tag, _ in state.out][-12:] == list(range(9, 21))
        release.clear()
        video(pipe, state, 12, start=21)  # block 3 held, block 4's inputs arriving meanwhile
        video(pipe, state, 12, start=33)
        waiter = threading.Thread(target=pipe.settle, args=(state,))
        waiter.start()
        release.set()
        waiter.join(60)
        assert state.blocks == 3 and len(state.inputs) == 12  # stopped after the block in hand
    finally:
        release.set()
        del pipe._video_frames
        pipe.prefetch = False
        pipe.settle(state)
        pipe.end_session(state)


@pytest.mark.parametrize("pipeline_id", ["streamdiffusionv2", "longlive"])
def test_warm_up_generates_blocks_in_the_default_mode(
    pipes: dict[str, Any], pipeline_id: str
) -> None:
    from services.inference.session import warm_up

    pipe = pipes[pipeline_id]
    before = pipe.model_calls
    warm_up(pipe, SPECS[pipeline_id], config(pipeline_id))
    steps = len(config(pipeline_id).denoising_step_list)
    # At least two blocks, each its denoising passes plus the pass that writes the cache.
    assert pipe.model_calls - before >= 2 * (steps + 1)


def test_krea_rebuilds_from_a_re_encoded_older_frame_past_the_first_blocks(
    pipes: dict[str, Any],
) -> None:
    """Scope's recompute_kv_cache: block 1's first context latent is the stream's first latent;
    from block 2 on it is the oldest of the last nine output frames, encoded on its own."""
    pipe = pipes["krea-realtime-video"]
    state = pipe.new_session("k", SIZE, SIZE, config("krea-realtime-video"))
    encoded: list[tuple[int, Any]] = []
    real = pipe._reencode

    def spy(s: Any) -> Any:
        encoded.append((s.stream.next_frame, s.output.decoded[0].clone()))
        return real(s)

    pipe._reencode = spy
    try:
        out = [r.frame for r in text(pipe, state, 9 + 3 * 12)]  # four blocks
    finally:
        del pipe._reencode
    assert [frame for frame, _ in encoded] == [6, 9]  # blocks 2 and 3, not block 1
    # Before block 2 the output holds 9 + 12 frames: the oldest of the last nine is frame 12.
    for (_, source), index in zip(encoded, (12, 12 + 12), strict=True):
        pixels = source[0, :, 0, :SIZE, :SIZE].permute(1, 2, 0).add(1).mul(127.5)
        assert float((pixels - out[index].float()).abs().max()) <= 0.5 + 1e-3


@pytest.mark.parametrize("pipeline_id", list(SPECS))
def test_a_prompt_change_mid_stream_applies_from_the_next_block(
    pipes: dict[str, Any], pipeline_id: str
) -> None:
    pipe = pipes[pipeline_id]
    g = pipe.geometry
    first = 4 * (g.first_block_frames - 1) + 1
    later = 4 * g.block_frames
    cfg = config(pipeline_id)
    dog = msgspec.structs.replace(cfg, prompts=[ws.PromptItem("a dog on the moon")])
    kept = pipe.new_session("kept", SIZE, SIZE, cfg)
    same = [r.frame for r in text(pipe, kept, first + 2 * later)]
    changed = pipe.new_session("changed", SIZE, SIZE, cfg)
    before = [r.frame for r in text(pipe, changed, first + later)]
    pipe.update(changed, dog, {"prompts"})
    after = [r.frame for r in text(pipe, changed, later, first + later)]
    assert all(torch.equal(a, b) for a, b in zip(before, same, strict=False))
    assert not torch.equal(after[-1], same[-1])  # the tiny model: a small change, but one
    # Text mode: the stream goes on (no hard cut), at the next frame.
    assert changed.stream.next_frame == g.first_block_frames + 2 * g.block_frames
    assert changed.stream.cuts == kept.stream.cuts


def test_the_rope_table_end_is_a_hard_cut_before_the_input_is_encoded(
    pipes: dict[str, Any],
) -> None:
    """At the RoPE table's end the stream starts afresh, VAE included: the next block gathers a
    first block's frames (5 for streamdiffusionv2) and encodes them from a fresh cache."""
    pipe = pipes["streamdiffusionv2"]
    state = pipe.new_session("end", SIZE, SIZE, config("streamdiffusionv2"))
    video(pipe, state, 9)
    cuts = state.stream.cuts
    state.stream.next_frame = pipe.loop.rope_frames  # as if the table had run out
    assert pipe._frames_needed(state) == 5
    out = video(pipe, state, 5, 9)
    assert out[-1].frame is not None
    assert state.stream.cuts == cuts + 1 and state.stream.next_frame == 2
