"""streamdiffusion and dream in one process, on tiny random models loaded by from_pretrained."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from services.inference import registry  # noqa: E402
from services.inference.pipeline import PromptItem, Request, Transition  # noqa: E402

pytestmark = [pytest.mark.timeout(180), pytest.mark.usefixtures("one_thread")]

SIZE = 64


def config(pipeline_id: str, **params: Any) -> Any:
    params = registry.validate_parameters(pipeline_id, params, load=True)
    return registry.full_config(
        registry.get(pipeline_id), {"height": SIZE, "width": SIZE, **params}
    )


@pytest.fixture(scope="module")
def sd(tiny_models: Path) -> Any:
    spec = registry.get("streamdiffusion")
    return spec.load(config("streamdiffusion"), tiny_models)


@pytest.fixture(scope="module")
def dream(tiny_models: Path) -> Any:
    spec = registry.get("dream")
    return spec.load(config("dream"), tiny_models)


def frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        f = base.copy()
        f[(i * 7) % SIZE :, : (i * 5) % SIZE + 8] = (i * 37) % 256
        out.append(f)
    return out


def step(pipe: Any, state: Any, rgb: np.ndarray | None, tag: Any) -> Any:
    inp = None if rgb is None else pipe.prepare(state, rgb)
    results = pipe([Request("s", state, inp, tag)])
    assert len(results) <= 1
    return results[0] if results else None


def run_video(
    pipe: Any, state: Any, inputs: list[np.ndarray]
) -> list[tuple[Any, np.ndarray | None]]:
    out = []
    for i, f in enumerate(inputs):
        r = step(pipe, state, f, i)
        out.append((r.tag, None if r.frame is None else r.frame.cpu().numpy()))
    return out


def diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# ---------------------------------------------------------------- streamdiffusion


def test_stream_batch_one_unet_call_per_frame_and_latency(sd: Any) -> None:
    for steps in ([700], [700, 400], [800, 600, 400, 200]):
        n = len(steps)
        state = sd.new_session(
            "s", SIZE, SIZE, config("streamdiffusion", denoising_step_list=steps)
        )
        before = sd.unet_calls
        out = run_video(sd, state, frames(n + 5))
        assert sd.unet_calls - before == n + 5  # one UNet call per input frame
        # The first n-1 calls are warm-up; then output k is input k-(n-1).
        assert all(frame is None for _, frame in out[: n - 1])
        for k, (tag, frame) in enumerate(out[n - 1 :], start=n - 1):
            assert tag == k - (n - 1)
            assert frame is not None and frame.shape == (SIZE, SIZE, 3) and frame.dtype == np.uint8
        # The batch in steady state holds all n stages.
        assert state.unet_rows == sum(min(i + 1, n) for i in range(n + 5))
        sd.end_session(state)


def test_output_depends_on_input_and_prompt_and_seed_reproduces(sd: Any) -> None:
    inputs = frames(3)
    other = [255 - f for f in inputs]

    def run(inp: list[np.ndarray], **params: Any) -> np.ndarray:
        state = sd.new_session("s", SIZE, SIZE, config("streamdiffusion", **params))
        out = run_video(sd, state, inp)
        assert out[-1][1] is not None
        return out[-1][1]

    cat = {"prompts": [{"text": "a cat", "weight": 1.0}]}
    dog = {"prompts": [{"text": "a dog on the moon", "weight": 1.0}]}
    a = run(inputs, **cat)
    assert diff(a, run(other, **cat)) > 1.0
    assert diff(a, run(inputs, **dog)) > 0.5
    assert np.array_equal(a, run(inputs, **cat))  # same seed, same frames: same output
    assert diff(a, run(inputs, seed=7, **cat)) > 0.5


def test_prompt_change_shows_on_the_next_frame(sd: Any) -> None:
    inputs = frames(6)
    cat = config("streamdiffusion", prompts=[{"text": "a cat", "weight": 1.0}])
    dog = config("streamdiffusion", prompts=[{"text": "a dog on the moon", "weight": 1.0}])
    ref = sd.new_session("r", SIZE, SIZE, cat)
    live = sd.new_session("l", SIZE, SIZE, cat)
    for i, f in enumerate(inputs):
        if i == 4:
            sd.update(live, dog, {"prompts"})
        a = step(sd, ref, f, i)
        b = step(sd, live, f, i)
        if a.frame is None:
            continue
        fa, fb = a.frame.cpu().numpy(), b.frame.cpu().numpy()
        if i < 4:
            assert np.array_equal(fa, fb)
        else:
            assert diff(fa, fb) > 0.05, i  # identical until the change


def test_transition_passes_through_intermediate_embeddings(sd: Any) -> None:
    state = sd.new_session("t", SIZE, SIZE, config("streamdiffusion"))
    start = state.prompt.current.clone()
    target = [PromptItem("a dog on the moon", 1.0)]
    end = sd.prompts.encode(target, "linear")
    encoded = sd.prompts.encoded
    cfg = config(
        "streamdiffusion",
        transition={"target_prompts": [{"text": "a dog on the moon"}], "num_steps": 4},
    )
    sd.update(state, cfg, {"transition"})
    seen = []
    for i, f in enumerate(frames(6)):
        step(sd, state, f, i)
        seen.append(state.prompt.current.clone())
    to_start = [float((e - start).norm()) for e in seen]
    to_end = [float((e - end).norm()) for e in seen]
    # Four steps: strictly towards the target, then there.
    assert to_start[0] > 0 and to_end[0] > 0
    assert to_start[:4] == sorted(to_start[:4]) and to_end[:4] == sorted(to_end[:4], reverse=True)
    assert all(d < 1e-4 for d in to_end[3:])
    assert to_end[1] > 1e-3 and to_start[1] > 1e-3
    assert state.prompt.prompts == target
    assert sd.prompts.encoded == encoded  # the target's embedding came from the cache


def test_slerp_and_linear_blends_differ_and_keep_the_norm(sd: Any) -> None:
    prompts = [PromptItem("a cat", 1.0), PromptItem("a dog on the moon", 1.0)]
    linear = sd.prompts.encode(prompts, "linear")
    spherical = sd.prompts.encode(prompts, "slerp")
    a = sd.prompts.encode_text("a cat")
    b = sd.prompts.encode_text("a dog on the moon")
    mean_norm = (a.norm(dim=-1) + b.norm(dim=-1)) / 2
    assert torch.allclose(linear.norm(dim=-1), mean_norm, rtol=1e-4)
    assert torch.allclose(spherical.norm(dim=-1), mean_norm, rtol=1e-4)
    assert not torch.allclose(linear, spherical)


def test_two_sessions_batched_never_see_each_other(sd: Any) -> None:
    inputs, other_inputs = frames(5, seed=1), frames(5, seed=2)
    cat = config("streamdiffusion", prompts=[{"text": "a cat", "weight": 1.0}])
    dog = config("streamdiffusion", prompts=[{"text": "a dog on the moon", "weight": 1.0}], seed=9)
    alone = sd.new_session("alone", SIZE, SIZE, cat)
    solo = [f for _, f in run_video(sd, alone, inputs)]
    a = sd.new_session("a", SIZE, SIZE, cat)
    b = sd.new_session("b", SIZE, SIZE, dog)
    before = sd.unet_calls
    together_a, together_b = [], []
    for i, (fa, fb) in enumerate(zip(inputs, other_inputs, strict=True)):
        res = sd(
            [
                Request("a", a, sd.prepare(a, fa), ("a", i)),
                Request("b", b, sd.prepare(b, fb), ("b", i)),
            ]
        )
        by_session = {r.session_id: r for r in res}
        ra, rb = by_session["a"], by_session["b"]
        together_a.append(None if ra.frame is None else ra.frame.cpu().numpy())
        together_b.append(None if rb.frame is None else rb.frame.cpu().numpy())
        if ra.frame is not None:
            assert ra.tag[0] == "a" and rb.tag[0] == "b"
    assert sd.unet_calls - before == len(inputs)  # both sessions in one call per frame
    for x, y in zip(solo, together_a, strict=True):
        if x is None:
            assert y is None
        else:
            assert y is not None and diff(x, y) < 0.5  # as if alone (float rounding aside)
    last_a, last_b = together_a[-1], together_b[-1]
    assert last_a is not None and last_b is not None and diff(last_a, last_b) > 1.0


def test_paused_and_similarity_filter_and_reset_cache(sd: Any) -> None:
    still = frames(1)[0]
    cfg = config(
        "streamdiffusion",
        denoising_step_list=[600],
        similar_image_filter=True,
        similar_image_filter_threshold=0.5,
        similar_image_filter_max_skip_frame=3,
    )
    state = sd.new_session("f", SIZE, SIZE, cfg)
    before = sd.unet_calls
    results = [step(sd, state, still, i) for i in range(9)]
    # Identical frames: at most 3 skipped in a row, and a skipped frame repeats the last output.
    calls = sd.unet_calls - before
    assert 9 // 4 <= calls < 9
    assert all(r.frame is not None for r in results)
    cfg2 = config("streamdiffusion", denoising_step_list=[600], reset_cache=True)
    sd.update(state, cfg2, {"reset_cache", "similar_image_filter"})
    assert state.buffer == [] and state.prev_output is None


def test_injected_out_of_memory_propagates_as_torch_error(
    sd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = sd.new_session("o", SIZE, SIZE, config("streamdiffusion"))

    def oom(*args: Any, **kwargs: Any) -> Any:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sd.c, "unet", oom)
    with pytest.raises(sd.oom_errors):
        step(sd, state, frames(1)[0], 0)


# ---------------------------------------------------------------- dream


def run_dream(pipe: Any, state: Any, n: int) -> list[Any]:
    return [step(pipe, state, None, i) for i in range(n)]


def test_dream_is_coherent_reports_keyframes_and_reproduces(dream: Any) -> None:
    cfg = config("dream", keyframe_interval=4, noise_walk_speed=0.25)
    state = dream.new_session("d", SIZE, SIZE, cfg)
    results = run_dream(dream, state, 10)
    imgs = [r.frame.cpu().numpy() for r in results]
    assert [r.tag for r in results] == list(range(10))
    assert [r.info["keyframe_number"] for r in results] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert all(r.info["generation_time_ms"] > 0 for r in results)
    steps = [diff(a, b) for a, b in itertools.pairwise(imgs)]
    assert max(steps) > 0  # it moves
    other_seed = dream.new_session("e", SIZE, SIZE, config("dream", seed=5, keyframe_interval=4))
    far = diff(imgs[0], run_dream(dream, other_seed, 1)[0].frame.cpu().numpy())
    assert max(steps) < far  # neighbouring frames are closer than another seed's
    again = dream.new_session("d2", SIZE, SIZE, cfg)
    assert all(
        np.array_equal(a, r.frame.cpu().numpy())
        for a, r in zip(imgs, run_dream(dream, again, 10), strict=True)
    )


def test_dream_prompt_change_shows_next_frame(dream: Any) -> None:
    cat = config("dream", prompts=[{"text": "a cat", "weight": 1.0}])
    dog = config("dream", prompts=[{"text": "a dog on the moon", "weight": 1.0}])
    ref = dream.new_session("r", SIZE, SIZE, cat)
    live = dream.new_session("l", SIZE, SIZE, cat)
    for i in range(5):
        if i == 3:
            dream.update(live, dog, {"prompts"})
        a = step(dream, ref, None, i).frame.cpu().numpy()
        b = step(dream, live, None, i).frame.cpu().numpy()
        if i < 3:
            assert np.array_equal(a, b)
        else:
            assert diff(a, b) > 0.1, i


def test_dream_transition_steps_once_per_frame(dream: Any) -> None:
    cfg = config("dream", refine_timestep=300)
    state = dream.new_session("t", SIZE, SIZE, cfg)
    run_dream(dream, state, 1)
    start = state.prompt.current.clone()
    dream.update(
        state,
        config(
            "dream",
            refine_timestep=300,
            transition=Transition([PromptItem("a dog on the moon")], num_steps=3),
        ),
        {"transition"},
    )
    seen = []
    for i in range(4):
        step(dream, state, None, i)
        seen.append(float((state.prompt.current - start).norm()))
    assert seen[0] < seen[1] < seen[2] == seen[3]


def test_text_encoder_files_of_either_layout_load_and_a_missing_weight_is_refused(
    tiny_models: Path, tmp_path: Path
) -> None:
    """The real sd-turbo names its CLIP weights ``text_model.…`` (the fixture writes that);
    transformers 5 saves them without the prefix. Both load to the same weights; a file that
    lacks one is an error, never a silently random text encoder."""
    import shutil

    from safetensors.torch import load_file, save_file

    from services.inference import diffusion as d
    from services.inference.specs import SD_TURBO, TAESD

    device = d.select_device()
    prefixed = d.load_components(tiny_models, SD_TURBO.repo_id, TAESD.repo_id, device)
    weights = "stabilityai/sd-turbo/text_encoder/model.fp16.safetensors"
    on_disk = load_file(str(tiny_models / weights))
    assert all(key.startswith("text_model.") for key in on_disk)
    loaded = prefixed.text_encoder.state_dict()
    for key, value in on_disk.items():
        assert torch.equal(loaded[key.removeprefix("text_model.")].half(), value), key

    other = tmp_path / "models"
    shutil.copytree(tiny_models, other)
    stripped = {k.removeprefix("text_model."): v for k, v in on_disk.items()}
    save_file(stripped, str(other / weights), metadata={"format": "pt"})
    unprefixed = d.load_components(other, SD_TURBO.repo_id, TAESD.repo_id, device)
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.inference_mode():
        assert torch.equal(prefixed.text_encoder(ids)[0], unprefixed.text_encoder(ids)[0])

    stripped.pop("encoder.layers.1.mlp.fc2.weight")
    save_file(stripped, str(other / weights), metadata={"format": "pt"})
    with pytest.raises(d.WeightsMissing, match=r"text_encoder: 1 weights missing.*fc2\.weight"):
        d.load_components(other, SD_TURBO.repo_id, TAESD.repo_id, device)
