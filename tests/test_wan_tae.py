"""The light VAEs (``vae_type``): TAEHV's Wan 2.1 tiny autoencoder against the original
``taehv.py``'s outputs (``tests/data/taehv``) and LightVAE against Scope's code's
(``tests/data/lightvae``), streamed block by block, and the Wan pipelines running with each.

The golden weights are rebuilt from each README's recipe (every key's checksum checked), written
in the released files' format (a ``.pth`` state dict, the original's key names) and read by
dreamwire's real loaders.
"""

from __future__ import annotations

import itertools
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from safetensors.torch import load_file, save_file  # noqa: E402

from services.inference import registry  # noqa: E402
from services.inference.pipeline import Request  # noqa: E402
from services.inference.wan import specs as ws  # noqa: E402
from services.inference.wan.tae import (  # noqa: E402
    WAN_LATENTS_MEAN,
    WAN_LATENTS_STD,
    TaeStream,
    TinyAutoencoder,
)
from services.inference.wan.vae import LIGHTVAE_BASE_DIM, VaeStream, load_lightvae  # noqa: E402
from services.models.downloads import ModelsNotDownloaded  # noqa: E402

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

DATA = Path(__file__).resolve().parent / "data" / "taehv"
LIGHTVAE_DATA = DATA.parent / "lightvae"
TOLERANCE = 1e-4
CPU = torch.device("cpu")
SPECS = {s.id: s for s in (ws.STREAMDIFFUSIONV2, ws.LONGLIVE, ws.KREA_REALTIME_VIDEO)}


def recipe_weight(key: str, shape: list[int]) -> Any:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key == "decoder.22.bias":
        return r * 0.05 + 0.5
    if len(shape) >= 2:
        return r * (1.0 / math.sqrt(math.prod(shape[1:])))
    return r * 0.05


def lightvae_recipe_weight(key: str, shape: list[int]) -> Any:
    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith(".gamma"):
        return r * 0.1 + 1.0
    if len(shape) >= 2:
        return r * (1.0 / math.sqrt(math.prod(shape[1:])))
    return r * 0.05


def rebuild(data: Path, recipe: Any) -> dict[str, Any]:
    """The weights of ``data/manifest.json`` by ``recipe``, each key's checksums checked."""
    keys = json.loads((data / "manifest.json").read_text())["keys"]
    state = {}
    for key, entry in sorted(keys.items()):
        w = recipe(key, entry["shape"])
        assert float(w.double().sum()) == pytest.approx(entry["sum"], rel=1e-9, abs=1e-9), key
        assert float(w.double().pow(2).sum()) == pytest.approx(entry["sumsq"], rel=1e-9), key
        state[key] = w
    return state


@pytest.fixture(scope="module")
def golden_state() -> dict[str, Any]:
    return rebuild(DATA, recipe_weight)


@pytest.fixture(scope="module")
def model(golden_state: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("tae") / "taew2_1.pth"
    torch.save(golden_state, path)
    return TinyAutoencoder.load(path, torch.float32, CPU)


@pytest.fixture(scope="module")
def golden() -> dict[str, Any]:
    return {
        **load_file(str(DATA / "inputs.safetensors")),
        **load_file(DATA / "expected.safetensors"),
    }


def as_rgb01(video: Any) -> Any:
    """A stream's ``[B, 3, T, H, W]`` in [-1, 1] -> the original's ``[B, T, 3, H, W]`` in [0, 1]."""
    return video.add(1.0).div(2.0).transpose(1, 2)


def max_diff(a: Any, b: Any) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.float() - b.float()).abs().max())


def decode_blocks(stream: TaeStream, latents: Any, sizes: list[int]) -> Any:
    """``latents`` (the original's ``[B, F, C, h, w]``) decoded ``sizes`` latents at a time."""
    z = latents.transpose(1, 2)
    out, start = [], 0
    for n in sizes:
        out.append(stream.decode(z[:, :, start : start + n]))
        start += n
    assert start == z.shape[2]
    return as_rgb01(torch.cat(out, dim=2))


def encode_blocks(stream: TaeStream, video: Any, sizes: list[int]) -> Any:
    """``video`` (the original's ``[B, T, 3, H, W]`` in [0, 1]) encoded ``sizes`` frames at a
    time; latents back in the original's layout."""
    x = video.transpose(1, 2).mul(2.0).sub(1.0)
    out, start = [], 0
    for n in sizes:
        out.append(stream.encode(x[:, :, start : start + n]))
        start += n
    assert start == x.shape[2]
    return torch.cat(out, dim=2).transpose(1, 2)


# ---------------------------------------------------------------- against the original


def test_decode_in_one_call_matches_the_original(model: Any, golden: dict[str, Any]) -> None:
    out = decode_blocks(TaeStream(model), golden["latents"], [7])
    assert out.shape == (1, 25, 3, 24, 32)  # 4·7 frames less the three startup ones
    assert max_diff(out, golden["decoded"]) <= TOLERANCE


@pytest.mark.parametrize("sizes", [[2, 1, 1, 1, 1, 1], [3, 3, 1], [1, 2, 4]])
def test_decode_block_by_block_matches_the_original(
    model: Any, golden: dict[str, Any], sizes: list[int]
) -> None:
    """A stream's blocks (streamdiffusionv2's 2 then 1, longlive's 3) give the frames of the
    whole sequence decoded at once: 4·n − 3 for the first block, 4·n after."""
    stream = TaeStream(model)
    z = golden["latents"].transpose(1, 2)
    first = stream.decode(z[:, :, : sizes[0]])
    assert first.shape[2] == 4 * sizes[0] - 3
    stream.reset()
    out = decode_blocks(stream, golden["latents"], sizes)
    assert max_diff(out, golden["decoded"]) <= TOLERANCE


def test_encode_matches_the_original(model: Any, golden: dict[str, Any]) -> None:
    """17 frames in one call: padded at the end to 20 with the last frame, five latents."""
    out = encode_blocks(TaeStream(model), golden["video"], [17])
    assert max_diff(out, golden["encoded"]) <= TOLERANCE


def test_encode_block_by_block_matches_the_original(model: Any, golden: dict[str, Any]) -> None:
    """The pipeline's blocks: 1 + 4·2 frames first (padded to 12, as Scope's stream_encode
    does), then four at a time; the original encoding the same frames, padding included, in
    one call gives the same latents, and so do blocks of four of that padded sequence."""
    video = golden["video"]
    out = encode_blocks(TaeStream(model), video, [9, 4, 4])
    assert max_diff(out, golden["encoded_stream"]) <= TOLERANCE
    padded = torch.cat([video[:, :9], video[:, 8:9].expand(-1, 3, -1, -1, -1), video[:, 9:]], 1)
    out = encode_blocks(TaeStream(model), padded, [4] * 5)
    assert max_diff(out, golden["encoded_stream"]) <= TOLERANCE


def test_reset_starts_the_stream_afresh(model: Any, golden: dict[str, Any]) -> None:
    stream = TaeStream(model)
    decode_blocks(stream, golden["latents"], [3, 4])
    encode_blocks(stream, golden["video"], [9, 8])
    stream.reset()
    assert max_diff(decode_blocks(stream, golden["latents"], [7]), golden["decoded"]) <= TOLERANCE
    out = encode_blocks(stream, golden["video"], [17])
    assert max_diff(out, golden["encoded"]) <= TOLERANCE


def test_safetensors_file_and_a_foreign_checkpoint(
    golden_state: dict[str, Any], golden: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "taew2_1.safetensors"
    save_file(golden_state, str(path))
    loaded = TinyAutoencoder.load(path, torch.float32, CPU)
    out = decode_blocks(TaeStream(loaded), golden["latents"], [7])
    assert max_diff(out, golden["decoded"]) <= TOLERANCE
    wrong = dict(golden_state)
    wrong["decoder.99.weight"] = wrong.pop("decoder.22.weight")
    torch.save(wrong, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth is not a Wan 2\.1 TAEHV checkpoint"):
        TinyAutoencoder.load(tmp_path / "other.pth", torch.float32, CPU)


def test_lighttae_works_on_raw_wan_latents(model: Any, golden: dict[str, Any]) -> None:
    """``lighttae``'s weights take the Wan VAE's raw latents: its stream turns the model's
    normalised latents into raw ones before decoding and back after encoding."""
    mean = torch.tensor(WAN_LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN_LATENTS_STD).view(1, -1, 1, 1, 1)
    z = golden["latents"].transpose(1, 2)
    light, plain = TaeStream(model, raw_latents=True), TaeStream(model)
    assert max_diff(light.decode((z - mean) / std), plain.decode(z)) <= TOLERANCE
    video = golden["video"].transpose(1, 2).mul(2.0).sub(1.0)
    assert max_diff(light.encode(video) * std + mean, plain.encode(video)) <= TOLERANCE


# ---------------------------------------------------------------- LightVAE against Scope's


@pytest.fixture(scope="module")
def lightvae(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("lightvae") / "lightvaew2_1.pth"
    torch.save(rebuild(LIGHTVAE_DATA, lightvae_recipe_weight), path)
    return load_lightvae(path, torch.float32, CPU)


@pytest.fixture(scope="module")
def lightvae_golden() -> dict[str, Any]:
    files = ("inputs.safetensors", "expected.safetensors")
    return {k: v for f in files for k, v in load_file(str(LIGHTVAE_DATA / f)).items()}


@pytest.mark.parametrize("sizes", [[5], [2, 3], [2, 1, 1, 1]])
def test_lightvae_decode_matches_scope(
    lightvae: Any, lightvae_golden: dict[str, Any], sizes: list[int]
) -> None:
    stream, latents = VaeStream(lightvae), lightvae_golden["latents"]
    bounds = np.cumsum([0, *sizes])
    out = [stream.decode(latents[:, :, a:b]) for a, b in itertools.pairwise(bounds)]
    assert out[0].shape[2] == 4 * sizes[0] - 3
    assert max_diff(torch.cat(out, dim=2), lightvae_golden["decoded"]) <= TOLERANCE


@pytest.mark.parametrize("sizes", [[9], [5, 4], [1, 4, 4]])
def test_lightvae_encode_matches_scope(
    lightvae: Any, lightvae_golden: dict[str, Any], sizes: list[int]
) -> None:
    stream, video = VaeStream(lightvae), lightvae_golden["video"]
    bounds = np.cumsum([0, *sizes])
    out = [stream.encode(video[:, :, a:b]) for a, b in itertools.pairwise(bounds)]
    assert max_diff(torch.cat(out, dim=2), lightvae_golden["encoded"]) <= TOLERANCE


def test_tiny_lightvae_file_has_the_original_names(
    golden_state: dict[str, Any], tmp_path: Path
) -> None:
    """``make_tiny_wan`` writes LightVAE under the names Scope's file has (the inverse of
    diffusers' converter), and a file of another model is refused naming it."""
    import make_tiny_wan
    from diffusers import AutoencoderKLWan

    names = set(json.loads((LIGHTVAE_DATA / "manifest.json").read_text())["keys"])
    vae: Any = AutoencoderKLWan(base_dim=LIGHTVAE_BASE_DIM)
    own = vae.state_dict()
    assert {make_tiny_wan.to_original_vae_key(k) for k in own} == names
    torch.save(golden_state, tmp_path / "taew2_1.pth")
    with pytest.raises(ValueError, match=r"taew2_1\.pth is not a LightVAE"):
        load_lightvae(tmp_path / "taew2_1.pth", torch.float32, CPU)


# ---------------------------------------------------------------- in the pipelines

SIZE = 32


def config(pipeline_id: str, **params: Any) -> Any:
    return registry.full_config(SPECS[pipeline_id], {"height": SIZE, "width": SIZE, **params})


def moving_frames(n: int) -> list[np.ndarray]:
    base = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return [np.roll(base, i, axis=1) for i in range(n)]


@pytest.mark.parametrize(
    ("pipeline_id", "vae_type"),
    [
        ("streamdiffusionv2", "tae"),
        ("longlive", "tae"),
        ("krea-realtime-video", "tae"),
        ("longlive", "lighttae"),
        ("longlive", "lightvae"),
    ],
)
def test_pipeline_frames_with_the_tiny_autoencoder(
    tiny_wan: Path, pipeline_id: str, vae_type: str
) -> None:
    """Text and video mode make the Wan VAE's frame counts: ``4·n − 3`` for a stream's first
    block of ``n`` latents, ``4·n`` after (Krea's fourth block re-encodes an output frame)."""
    cfg = config(pipeline_id, vae_type=vae_type)
    pipe: Any = SPECS[pipeline_id].load(cfg, tiny_wan)
    pipe.prefetch = False
    g = pipe.geometry
    first, later = 4 * g.first_block_frames - 3, 4 * g.block_frames

    state = pipe.new_session("t", SIZE, SIZE, cfg)
    n = first + 3 * later
    results = [pipe([Request("t", state, None, i)])[0] for i in range(n)]
    blocks = [r.info["block"] for r in results]
    assert blocks == [1] * first + [2] * later + [3] * later + [4] * later
    for r in results:
        assert tuple(r.frame.shape) == (SIZE, SIZE, 3) and r.frame.dtype == torch.uint8
    assert len({r.frame.numpy().tobytes() for r in results}) > 1

    state = pipe.new_session("v", SIZE, SIZE, cfg)
    out = []
    for i, frame in enumerate(moving_frames(first + later)):
        (r,) = pipe([Request("v", state, pipe.prepare(state, frame), i)])
        out += [r] if r.frame is not None else []
    out += pipe.ready(state)
    # Each block waits for its inputs (1 + 4·(n − 1) first); its frames keep their tags.
    assert [r.tag for r in out] == list(range(first + later))
    assert [r.info["block"] for r in out] == [1] * first + [2] * later
    assert all(tuple(r.frame.shape) == (SIZE, SIZE, 3) for r in out)
    pipe.close()


def test_wan_vae_loads_without_the_light_autoencoders(tiny_wan: Path, tmp_path: Path) -> None:
    """A models directory downloaded before ``vae_type`` existed still loads ``wan``; a light
    one asks for the download."""
    for repo in (ws.WAN_BASE, ws.LONGLIVE_WEIGHTS):
        target = tmp_path / repo.repo_id
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(tiny_wan / repo.repo_id)
    pipe: Any = ws.LONGLIVE.load(config("longlive"), tmp_path)
    assert pipe.vae_type == "wan"
    pipe.close()
    with pytest.raises(ModelsNotDownloaded, match="longlive"):
        ws.LONGLIVE.load(config("longlive", vae_type="tae"), tmp_path)


# ---------------------------------------------------------------- the declaration


@pytest.mark.parametrize("pipeline_id", list(SPECS))
def test_schema_offers_vae_type_as_scope(pipeline_id: str) -> None:
    """Scope's field: an enum of its four values, ``wan`` by default, a load parameter its UI
    draws as a dropdown labelled "VAE"; the light autoencoders are part of the download."""
    s = registry.schema(SPECS[pipeline_id])
    prop = s["config_schema"]["properties"]["vae_type"]
    # msgspec lists a Literal's values sorted (Scope's pydantic enum keeps its own order).
    assert prop["enum"] == sorted(["wan", "lightvae", "tae", "lighttae"])
    assert prop["default"] == "wan"
    assert prop["ui"]["is_load_param"] is True and prop["ui"]["label"] == "VAE"
    assert "vae_type" in s["load_params"]
    light = ["lightvaew2_1.pth", "taew2_1.pth", "lighttaew2_1.pth"]
    assert {"repo_id": "daydreamlive/Autoencoders", "files": light, "revision": "main"} in s[
        "artifacts"
    ]


def test_a_bad_vae_type_is_an_error_naming_the_key() -> None:
    with pytest.raises(registry.ParameterError, match=r"^vae_type: Invalid enum value 'vqgan'"):
        registry.validate_load_params("longlive", {"vae_type": "vqgan"})
    with pytest.raises(registry.ParameterError, match=r"^vae_type: "):
        registry.full_config(ws.KREA_REALTIME_VIDEO, {"vae_type": 3})
    with pytest.raises(registry.ParameterError, match="vae_type: can only be set when"):
        registry.validate_parameters("streamdiffusionv2", {"vae_type": "tae"})
    assert registry.validate_load_params("streamdiffusionv2", {"vae_type": "tae"}) == {
        "vae_type": "tae"
    }
