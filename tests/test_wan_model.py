"""The causal Wan transformer: cached block-by-block generation equals one block-causal pass;
original-checkpoint conversion uses every key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from services.inference.wan.convert import (  # noqa: E402
    CheckpointMismatch,
    load_transformer,
)
from services.inference.wan.fp8 import quantize_linears  # noqa: E402
from services.inference.wan.model import (  # noqa: E402
    CacheWindow,
    CausalWanTransformer,
    KVCache,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("one_thread")]

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4


def small_model() -> CausalWanTransformer:
    """A fresh 2-layer model with random weights (seeded)."""
    torch.manual_seed(0)
    m = CausalWanTransformer(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=64,
    )
    with torch.no_grad():
        m.proj_out.weight.normal_(0.0, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def model() -> CausalWanTransformer:
    return small_model()


def inputs(frames: int, seed: int = 1) -> tuple[Any, Any, Any]:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, frames, 4, 6, generator=gen)
    timesteps = torch.rand(1, frames, generator=gen) * 1000
    context = torch.randn(1, 5, 8, generator=gen)
    return latents, timesteps, context


def blockwise(
    model: CausalWanTransformer, b: int, cache: KVCache, x: Any, t: Any, cross: Any
) -> Any:
    outs = [
        model.forward_causal(
            x[:, :, i : i + b], t[:, i : i + b], cross, cache=cache, rope_start=i, write=True
        )
        for i in range(0, x.shape[2], b)
    ]
    return torch.cat(outs, dim=2)


#: (block frames, window)
WINDOWS = {
    "global": (3, CacheWindow()),
    "window": (3, CacheWindow(6)),
    "window+sink": (3, CacheWindow(9, sinks=3)),
    "one-frame blocks": (1, CacheWindow(4, sinks=1)),
}


@pytest.mark.parametrize("name", list(WINDOWS))
@torch.inference_mode()
def test_cached_blocks_equal_one_block_causal_pass(model: CausalWanTransformer, name: str) -> None:
    b, window = WINDOWS[name]
    x, t, ctx = inputs(12)
    cross = model.cross_kv(ctx)
    full = model.forward_causal(x, t, cross, blocks=(b, window))
    cache = KVCache(window)
    cached = blockwise(model, b, cache, x, t, cross)
    assert torch.allclose(cached, full, atol=ATOL), (cached - full).abs().max()
    # The cache holds the window the last block saw: its sinks and the most recent frames.
    if window.frames > 0:
        assert len(cache) == window.frames
        recent = list(range(12 - (window.frames - window.sinks), 12))
        assert cache.positions == list(range(window.sinks)) + recent
    # The mask matters: without it (every frame sees every frame) the result differs.
    assert not torch.allclose(model.forward_causal(x, t, cross), full, atol=ATOL)


@torch.inference_mode()
def test_equivalence_holds_after_a_cache_reset(model: CausalWanTransformer) -> None:
    b, window = WINDOWS["window+sink"]
    x, t, ctx = inputs(12, seed=2)
    cross = model.cross_kv(ctx)
    cache = KVCache(window)
    before, _, _ = inputs(6, seed=3)
    blockwise(model, b, cache, before, t[:, :6], cross)
    assert len(cache) == 6
    cache.reset()
    assert len(cache) == 0 and cache.resets == 1
    cached = blockwise(model, b, cache, x, t, cross)
    assert torch.allclose(cached, model.forward_causal(x, t, cross, blocks=(b, window)), atol=ATOL)


@torch.inference_mode()
def test_rope_positions_are_the_callers(model: CausalWanTransformer) -> None:
    x, t, ctx = inputs(3)
    cross = model.cross_kv(ctx)
    at0 = model.forward_causal(x, t, cross, rope_start=0)
    at9 = model.forward_causal(x, t, cross, rope_start=9)
    # RoPE scores depend on position differences only: a lone block is the same anywhere.
    assert torch.allclose(at0, at9, atol=ATOL)
    # With a past, the distance matters: the same two blocks 3 vs 9 frames apart differ.
    y, _, _ = inputs(3, seed=9)
    near, far = KVCache(CacheWindow()), KVCache(CacheWindow())
    model.forward_causal(y, t, cross, cache=near, rope_start=0, write=True)
    model.forward_causal(y, t, cross, cache=far, rope_start=0, write=True)
    a = model.forward_causal(x, t, cross, cache=near, rope_start=3)
    c = model.forward_causal(x, t, cross, cache=far, rope_start=9)
    assert not torch.allclose(a, c, atol=1e-3)


@torch.inference_mode()
def test_attention_bias_spares_the_first_cached_frame_and_the_block(
    model: CausalWanTransformer,
) -> None:
    """Krea's bias: ``log(bias)`` on cached keys from the second cached frame up to the block."""
    x, t, ctx = inputs(9, seed=4)
    cross = model.cross_kv(ctx)

    def run(past_frames: int, bias: float) -> Any:
        cache = KVCache(CacheWindow())
        past = x[:, :, :past_frames]
        if past_frames:
            model.forward_causal(past, t[:, :past_frames], cross, cache=cache, write=True)
        block = x[:, :, 6:9]
        return model.forward_causal(
            block, t[:, 6:9], cross, cache=cache, rope_start=6, attention_bias=bias
        )

    # No past, or a past of one frame (slot 0, spared): the bias changes nothing.
    for past in (0, 1):
        assert torch.allclose(run(past, 0.3), run(past, 1.0), atol=1e-6)
    # With more past, the biased block leans less on it.
    assert not torch.allclose(run(3, 0.3), run(3, 1.0), atol=1e-3)
    # A bias this small all but removes the cached frames 1-2: the block then equals one
    # that saw frame 0's keys alone (the same keys, the same positions).
    tiny = run(3, 1e-30)
    cache = KVCache(CacheWindow())
    model.forward_causal(x[:, :, :3], t[:, :3], cross, cache=cache, write=True)
    cache.keep_first(1)
    alone = model.forward_causal(x[:, :, 6:9], t[:, 6:9], cross, cache=cache, rope_start=6)
    assert torch.allclose(tiny, alone, atol=1e-5)


def test_the_window_keeps_sinks_and_the_most_recent_frames() -> None:
    assert CacheWindow(12, sinks=3).keep(12) is None
    assert CacheWindow(12, sinks=3).keep(15) == [0, 1, 2, *range(6, 15)]
    assert CacheWindow(6, sinks=3).keep(7) == [0, 1, 2, 4, 5, 6]
    assert CacheWindow().keep(100) is None


# ---------------------------------------------------------------- conversion


@pytest.fixture(scope="module")
def tiny() -> Any:
    import make_tiny_wan

    return make_tiny_wan


@pytest.mark.parametrize("container", ["safetensors", "generator", "plain"])
@torch.inference_mode()
def test_original_checkpoint_loads_with_every_key_used(
    tiny: Any, tmp_path: Path, container: str
) -> None:
    source = tiny.tiny_transformer(seed=3).eval()
    state = tiny.original_state_dict(source)
    assert "blocks.0.self_attn.q.weight" in state and "head.head.weight" in state
    assert not any(k.startswith(("condition_embedder", "proj_out")) for k in state)
    path = tmp_path / ("model.safetensors" if container == "safetensors" else "model.pt")
    tiny.write_checkpoint(path, state, container)
    loaded = load_transformer(path)
    assert loaded.config.num_layers == 2 and loaded.config.num_attention_heads == 2
    for name, param in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], param), name
    x, t, ctx = (v.repeat(1, 4, 1, 1, 1) if v.ndim == 5 else v for v in inputs(3))
    ctx = torch.randn(1, 7, tiny.TEXT_DIM)
    a = source.forward_causal(x, t, source.cross_kv(ctx))
    b = loaded.forward_causal(x, t, loaded.cross_kv(ctx))
    assert torch.allclose(a, b, atol=1e-5)


def test_unused_or_missing_keys_are_refused(tiny: Any, tmp_path: Path) -> None:
    state = tiny.original_state_dict(tiny.tiny_transformer(seed=4))
    extra = dict(state, **{"blocks.0.self_attn.lora_A.weight": torch.zeros(2, 2)})
    tiny.write_checkpoint(tmp_path / "extra.safetensors", extra, "safetensors")
    with pytest.raises(CheckpointMismatch, match="unused") as info:
        load_transformer(tmp_path / "extra.safetensors")
    assert info.value.unused == ["blocks.0.attn1.lora_A.weight"]
    short = {k: v for k, v in state.items() if k != "blocks.1.ffn.2.bias"}
    tiny.write_checkpoint(tmp_path / "short.safetensors", short, "safetensors")
    with pytest.raises(CheckpointMismatch, match="missing") as info:
        load_transformer(tmp_path / "short.safetensors")
    assert info.value.missing == ["blocks.1.ffn.net.2.bias"]


@torch.inference_mode()
def test_fp8_through_torchao_keeps_fp8_weights_and_stays_close() -> None:
    pytest.importorskip("torchao")
    m = small_model()
    x, t, ctx = inputs(3)
    ref = m.forward_causal(x, t, m.cross_kv(ctx))
    kind = quantize_linears(m.blocks, torch.device("cpu"))
    assert "weights" in kind  # no fp8 tensor cores on a CPU: weight-only
    weight = m.blocks[0].attn1.to_q.weight
    assert weight.qdata.dtype == torch.float8_e4m3fn  # stored in fp8, not widened
    out = m.forward_causal(x, t, m.cross_kv(ctx))
    assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())
    assert not torch.equal(out, ref)


@torch.inference_mode()
def test_longlive_lora_is_merged_with_every_key_used(tiny: Any, tmp_path: Path) -> None:
    source = tiny.tiny_transformer(seed=5).eval()
    state = tiny.original_state_dict(source)
    tiny.write_checkpoint(tmp_path / "base.pt", state, "plain")
    lora = tiny.tiny_lora(state, rank=4, seed=6)
    torch.save(lora, tmp_path / "lora.pt")
    alpha = 8.0
    merged = load_transformer(tmp_path / "base.pt", lora=tmp_path / "lora.pt", lora_alpha=alpha)
    plain = load_transformer(tmp_path / "base.pt")
    pairs = lora["generator_lora"]
    # 2 layers x (4 self-attention + 4 cross-attention + 2 feed-forward) Linears.
    assert len(pairs) == 2 * 10 * 2
    a = pairs["base_model.model.blocks.1.cross_attn.k.lora_A.weight"]
    b = pairs["base_model.model.blocks.1.cross_attn.k.lora_B.weight"]
    expected = state["blocks.1.cross_attn.k.weight"] + (alpha / 4) * (b @ a)
    assert torch.allclose(merged.blocks[1].attn2.to_k.weight, expected, atol=1e-6)
    assert torch.equal(merged.blocks[0].norm2.weight, plain.blocks[0].norm2.weight)
    x, t, _ = (v.repeat(1, 4, 1, 1, 1) if v.ndim == 5 else v for v in inputs(3))
    ctx = torch.randn(1, 7, tiny.TEXT_DIM)
    out_merged = merged.forward_causal(x, t, merged.cross_kv(ctx))
    out_plain = plain.forward_causal(x, t, plain.cross_kv(ctx))
    assert not torch.allclose(out_merged, out_plain, atol=1e-4)


def test_a_lora_that_does_not_fit_is_refused(tiny: Any, tmp_path: Path) -> None:
    state = tiny.original_state_dict(tiny.tiny_transformer(seed=5))
    tiny.write_checkpoint(tmp_path / "base.pt", state, "plain")
    pairs = tiny.tiny_lora(state)["generator_lora"]
    cases = {
        "unknown module": dict(
            pairs,
            **{
                "base_model.model.blocks.9.ffn.0.lora_A.weight": pairs[
                    "base_model.model.blocks.0.ffn.0.lora_A.weight"
                ]
            },
        ),
        "lone A": {
            k: v for k, v in pairs.items() if k != "base_model.model.blocks.0.ffn.2.lora_B.weight"
        },
    }
    for case, lora in cases.items():
        torch.save({"generator_lora": lora}, tmp_path / "lora.pt")
        with pytest.raises(CheckpointMismatch) as info:
            load_transformer(tmp_path / "base.pt", lora=tmp_path / "lora.pt")
        if case == "unknown module":
            assert info.value.unused == ["blocks.9.ffn.0.lora_A.weight"]
        else:
            assert info.value.missing == ["blocks.0.ffn.2.lora_B.weight"]


@pytest.mark.timeout(180)
def test_compiled_blocks_equal_eager_and_compile_once_for_all_layers() -> None:
    from torch._dynamo.testing import CompileCounter

    m = small_model()  # its own: compiling must not touch the shared fixture
    b, window = WINDOWS["window+sink"]
    x, t, ctx = inputs(15)

    def generate() -> Any:
        with torch.inference_mode():
            return blockwise(m, b, KVCache(window), x, t, m.cross_kv(ctx))

    eager = generate()
    counter = CompileCounter()
    m.compile_blocks(backend=counter)
    try:
        compiled = generate()
    finally:
        m._compiled_block = None
        torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-6)
    # 5 blocks x 2 layers = 10 layer steps; graphs differ only by cache/mask presence.
    assert 1 <= counter.frame_count <= 4


def test_a_checkpoint_with_ema_weights_loads_the_generator(tmp_path: Path) -> None:
    """Scope loads ``generator`` from a ``{generator, generator_ema}`` file (its model.yaml's
    ``generator_ckpt`` entry), not the EMA copy."""
    from services.inference.wan.convert import read_checkpoint

    w = torch.randn(4, 4)
    path = tmp_path / "model.pt"
    torch.save({"generator_ema": {"model.w": w * 0.99}, "generator": {"model.w": w}}, path)
    assert torch.equal(read_checkpoint(path)["model.w"], w)
