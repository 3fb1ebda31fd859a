"""The causal Wan block loops against Scope's own outputs (``../shared/golden/wan``).

The weights are rebuilt from the golden recipe (every key's checksum checked), written in each
release's container, loaded by dreamwire's real loader and run through each pipeline's block
loop on the golden inputs: prompt rows in, latents out, no VAE and no text encoder. Every
block's latents, the timesteps the model received and their σ must match Scope's.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from shared_dir import shared_dir  # noqa: E402

from services.inference.wan.blocks import BlockLoop  # noqa: E402
from services.inference.wan.convert import load_transformer  # noqa: E402
from services.inference.wan.specs import GEOMETRY  # noqa: E402

GOLDEN = shared_dir() / "golden" / "wan"
TOLERANCE = 1e-4  # the README's: float32, outputs of magnitude ~4
TEXT_LEN = 512

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"no golden vectors at {GOLDEN}"),
]

CASES = [
    "streamdiffusionv2_video",
    "streamdiffusionv2_text",
    "longlive_text",
    "longlive_lora_text",
    "krea-realtime-video_text",
    "krea-realtime-video_text_bias1",
]


def recipe_weight(key: str, shape: list[int]) -> Any:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if "modulation" in key:
        return r * 0.2
    if len(shape) >= 2:
        return r * (1.0 / math.sqrt(math.prod(shape[1:])))
    if key.endswith(".weight"):
        return r * 0.1 + 1.0
    return r * 0.05


def rebuild(entries: list[dict[str, Any]], rule: Any) -> dict[str, Any]:
    """The recipe's tensors, each proved by the manifest's float64 sum and sum of squares."""
    out = {}
    for entry in sorted(entries, key=lambda e: e["key"]):
        w = rule(entry["key"], entry["shape"])
        w64 = w.double()
        for name, value in (("sum", float(w64.sum())), ("sumsq", float((w64 * w64).sum()))):
            assert math.isclose(value, entry[name], rel_tol=1e-9, abs_tol=1e-9), (entry, name)
        out[entry["key"]] = w
    return out


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return dict(json.loads((GOLDEN / "manifest.json").read_text()))


@pytest.fixture(scope="module")
def base(manifest: dict[str, Any]) -> dict[str, Any]:
    return rebuild(manifest["keys"], recipe_weight)


@pytest.fixture(scope="module")
def inputs() -> dict[str, Any]:
    return dict(load_file(str(GOLDEN / "inputs.safetensors")))


@pytest.fixture(scope="module")
def files(
    tmp_path_factory: pytest.TempPathFactory, manifest: dict[str, Any], base: dict[str, Any]
) -> dict[str, Path]:
    """The weights in each release's container (the golden README's "Containers")."""
    root = tmp_path_factory.mktemp("golden-wan")
    prefixed = {"model." + k: w for k, w in base.items()}
    paths = {
        "generator": root / "model.pt",
        "krea": root / "krea.safetensors",
        "lora": root / "lora.pt",
        "ema": root / "ema.pt",
    }
    torch.save({"generator": prefixed}, paths["generator"])
    save_file(prefixed, str(paths["krea"]))
    lora = rebuild(manifest["lora"]["keys"], lambda key, shape: recipe_weight_lora(key, shape))
    torch.save({"generator_lora": lora}, paths["lora"])
    ema = {k: w * 0.99 for k, w in prefixed.items()}
    torch.save({"generator": prefixed, "generator_ema": ema}, paths["ema"])
    return paths


def recipe_weight_lora(key: str, shape: list[int]) -> Any:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    return torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02


def expected(name: str) -> tuple[dict[str, Any], dict[str, str]]:
    path = GOLDEN / f"expected_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    return dict(load_file(str(path))), meta


def prompt_kv(transformer: Any, inputs: dict[str, Any]) -> Any:
    rows = inputs["prompt.a"]
    emb = torch.zeros(TEXT_LEN, rows.shape[1])
    emb[: rows.shape[0]] = rows
    return transformer.cross_kv(emb.unsqueeze(0))


def to_scope(latents: Any) -> Any:
    """``[1, C, F, H, W]`` -> the golden layout ``[F, C, H, W]``."""
    return latents[0].permute(1, 0, 2, 3)


def run_case(name: str, files: dict[str, Path], inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """Every block of one golden case through dreamwire: its diffs against the expected."""
    want, meta = expected(name)
    case = json.loads(meta["case"])
    pid = case["pipeline"]
    if pid == "krea-realtime-video":
        path, lora = files["krea"], None
    else:
        path, lora = files["generator"], (files["lora"] if case["lora"] else None)
    transformer = load_transformer(path, torch.float32, "cpu", lora=lora, lora_alpha=256.0)
    loop = BlockLoop(transformer, GEOMETRY[pid], torch.device("cpu"))
    stream = loop.new_stream()
    cross = prompt_kv(transformer, inputs)
    group = case["inputs"]
    outputs: list[Any] = []  # every output latent frame, in order
    report = []
    for b in range(case["blocks"]):
        z = None
        if case["mode"] == "video":
            z = inputs[f"{group}.b{b}.z"].permute(1, 0, 2, 3).unsqueeze(0)
        context = want.get(f"b{b}.context_frames")

        def first_context(context: Any = context) -> Any:
            # The VAE stand-in: a decoded frame re-encodes to the latent it was decoded from.
            return outputs[int(context[0])]

        bias = case.get("kv_cache_attention_bias")
        x0 = loop.block(
            stream,
            cross,
            seed=case["base_seed"],
            steps=case["denoising_step_list"],
            latent_hw=tuple(case["latent_hw"]),
            z=z,
            noise_scale=case["noise_scale"],
            attention_bias=0.3 if bias is None and pid == "krea-realtime-video" else bias or 1.0,
            first_context=first_context,
        )
        outputs.extend(x0[:, :, j : j + 1] for j in range(x0.shape[2]))
        assert json.loads(meta[f"b{b}.frames"]) == list(
            range(stream.next_frame - x0.shape[2], stream.next_frame)
        )
        report.append(
            {
                "block": b,
                "x0": float((to_scope(x0) - want[f"b{b}.x0"]).abs().max()),
                "timesteps": stream.timesteps,
                "want_timesteps": want[f"b{b}.timesteps"].tolist(),
                "sigma": max(
                    abs(a - e)
                    for a, e in zip(stream.sigmas, want[f"b{b}.sigmas"].tolist(), strict=True)
                ),
            }
        )
    return report


@pytest.mark.parametrize("name", CASES)
def test_every_block_matches_scope(
    name: str, files: dict[str, Path], inputs: dict[str, Any]
) -> None:
    report = run_case(name, files, inputs)
    for row in report:
        assert row["timesteps"] == row["want_timesteps"], row
        assert row["sigma"] < 1e-7, row
        assert row["x0"] <= TOLERANCE, row


def test_a_generator_and_ema_checkpoint_loads_the_generator(
    files: dict[str, Path], inputs: dict[str, Any]
) -> None:
    """Scope's longlive takes ``generator`` from ``{generator, generator_ema}``: the same
    block as Scope's from the generator, not what the EMA weights give."""
    want, meta = expected("checkpoint")
    case = json.loads(meta["case"])
    transformer = load_transformer(files["ema"], torch.float32, "cpu")
    loop = BlockLoop(transformer, GEOMETRY["longlive"], torch.device("cpu"))
    x0 = loop.block(
        loop.new_stream(),
        prompt_kv(transformer, inputs),
        seed=case["base_seed"],
        steps=case["denoising_step_list"],
        latent_hw=tuple(case["latent_hw"]),
    )
    assert float((to_scope(x0) - want["generator.b0.x0"]).abs().max()) <= TOLERANCE
    assert float((to_scope(x0) - want["generator_ema.b0.x0"]).abs().max()) > 1e-2


def test_the_noise_is_scopes_draw(inputs: dict[str, Any]) -> None:
    """The block loop's noise for seed 42 is Scope's: a CPU generator seeded with the
    seed plus the block's first frame, re-noise draws after it (the golden inputs)."""
    from services.inference.wan.model import CausalWanTransformer

    tiny = CausalWanTransformer(
        patch_size=(1, 2, 2),
        num_attention_heads=1,
        attention_head_dim=16,
        in_channels=16,
        out_channels=16,
        text_dim=8,
        freq_dim=16,
        ffn_dim=16,
        num_layers=1,
    )
    draws: list[Any] = []

    class Recorder(BlockLoop):
        def _run(self, stream: Any, cross: Any, x: Any, t: float, rope: int, **kw: Any) -> Any:
            draws.append(x.clone())
            return torch.zeros_like(x)  # flow 0: x0 = x, so the next input is the next draw

    loop = Recorder(tiny, GEOMETRY["longlive"], torch.device("cpu"))
    stream = loop.new_stream()
    stream.next_frame = 3
    loop.block(stream, [], seed=42, steps=[1000, 750, 500, 250], latent_hw=(8, 12))
    first = draws[0][0].permute(1, 0, 2, 3)
    assert torch.equal(first, inputs["longlive_text.b1.noise"])
    # After step 0 (σ' = σ(750)), x = (1 − σ')·x0 + σ'·ε with ε the first re-noise draw.
    sigma = loop.schedule.sigma(750)
    eps = (draws[1][0].permute(1, 0, 2, 3) - (1 - sigma) * first) / sigma
    assert torch.allclose(eps, inputs["longlive_text.b1.renoise1"], atol=1e-4)


#: Text cases through a split pipeline (Krea: its first two blocks; from the third its context
#: is a real VAE's re-encoding, which the golden run replaced with a stand-in).
SPLIT_CASES = {
    "streamdiffusionv2_text": None,
    "streamdiffusionv2_video": None,
    "longlive_text": None,
    "krea-realtime-video_text": 2,
}


@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_a_split_pipeline_posts_scopes_latents_to_its_decoder(
    name: str,
    files: dict[str, Path],
    inputs: dict[str, Any],
    tiny_wan: Path,
    tmp_path: Path,
) -> None:
    """The whole pipeline with ``split`` (the VAE ends in processes of their own, the
    transformer's blocks overlapping their decodes): the latents it sends its decode stage are
    Scope's. Only the prompt's embedding is given (the golden rows) instead of encoded, and in
    video mode the encoder's answers are the golden inputs' latents (the golden run has no VAE;
    the encode stage itself is held to the one-process path in ``test_wan_split.py``)."""
    from services.inference import registry
    from services.inference.pipeline import Request
    from services.inference.wan import specs as ws
    from services.models.store import COMPLETE_MARKER

    want, meta = expected(name)
    case = json.loads(meta["case"])
    pid = case["pipeline"]
    spec = {s.id: s for s in (ws.STREAMDIFFUSIONV2, ws.LONGLIVE, ws.KREA_REALTIME_VIDEO)}[pid]
    # A models directory as download_models leaves it: the tiny base (text encoder, VAE) and
    # the golden transformer in the pipeline's own file; longlive's built-in LoRA as zeros
    # (the golden case has none).
    models = tmp_path / "models"
    (models / "Wan-AI").mkdir(parents=True)
    base = ws.WAN_BASE.repo_id
    (models / base).symlink_to(tiny_wan / base, target_is_directory=True)
    repo, filename = ws.CHECKPOINTS[pid]
    target = models / repo / filename
    target.parent.mkdir(parents=True)
    source = files["krea"] if pid == "krea-realtime-video" else files["generator"]
    target.symlink_to(source)
    (models / repo / COMPLETE_MARKER).touch()
    if pid in ws.LORAS:
        lora_repo, lora_file, _ = ws.LORAS[pid]
        zero = {k: v * 0 for k, v in torch.load(files["lora"])["generator_lora"].items()}
        torch.save({"generator_lora": zero}, models / lora_repo / lora_file)
    h, w = (8 * n for n in case["latent_hw"])
    params: dict[str, Any] = {
        "height": h,
        "width": w,
        "seed": case["base_seed"],
        "denoising_step_list": case["denoising_step_list"],
        "split": {"threads": 1},
    }
    if case["kv_cache_attention_bias"] is not None:
        params["kv_cache_attention_bias"] = case["kv_cache_attention_bias"]
    video = case["mode"] == "video"
    if video:
        params.update(noise_scale=case["noise_scale"], noise_controller=False)
    pipe: Any = spec.load(registry.full_config(spec, params), models)
    try:
        rows = inputs["prompt.a"]
        emb = torch.zeros(TEXT_LEN, rows.shape[1])
        emb[: rows.shape[0]] = rows
        pipe.prompts.encode_text = lambda text: emb
        posted: list[Any] = []
        decoder = pipe.stages[1]
        real = decoder.submit

        def spy(job: Any, arrays: list[Any]) -> Any:
            posted.append(arrays[0].copy())
            return real(job, arrays)

        decoder.submit = spy
        if video:
            from concurrent.futures import Future

            from services.inference.wan.stages import Answer

            def golden_z(job: Any, arrays: list[Any]) -> Any:
                z = inputs[f"{case['inputs']}.b{job.block - 1}.z"].permute(1, 0, 2, 3)
                answer: Future[Answer] = Future()
                answer.set_result(Answer([z.unsqueeze(0).numpy()], 0.0, case["noise_scale"]))
                return answer

            pipe.stages[0].submit = golden_z
        blocks = SPLIT_CASES[name] or case["blocks"]
        state = pipe.new_session("golden", w, h, registry.full_config(spec, params))
        frame = np.zeros((h, w, 3), np.uint8)
        while len(posted) < blocks:
            pipe([Request("golden", state, pipe.prepare(state, frame) if video else None, 0)])
            pipe.ready(state)
            pipe.settle(state)  # the block posted by this call is in the decoder's queue
        pipe.end_session(state)
    finally:
        pipe.close()
    for b in range(blocks):
        diff = float((to_scope(torch.from_numpy(posted[b])) - want[f"b{b}.x0"]).abs().max())
        assert diff <= TOLERANCE, (b, diff)
