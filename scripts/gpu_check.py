#!/usr/bin/env python3
"""One-command check of dreamwire's GPU paths, with speed figures, in at most ``--budget-s``.

    python scripts/gpu_check.py --out gpu-check            # on a CUDA box (full-size models)
    python scripts/gpu_check.py --cpu --out /tmp/check     # the same script, tiny models, CPU

Writes ``check.json`` and ``check.md`` under ``--out``. Every check says pass, fail or skip
with its reason; a failing check never stops the others. No download: the models are built
from their real configs with random weights on the device.

Checks (the CUDA paths dreamwire takes):

* ``dtypes``: bf16 and fp16 matmuls run and agree with float32;
* ``pinned``: pinned host buffers and non-blocking copies round-trip a frame;
* ``channels_last``: the SD-Turbo UNet in channels-last gives what it gives contiguous;
* ``stream_handoff``: a Wan block made on a side CUDA stream (blocks ahead) and handed over on
  the CPU equals the same block on the default stream;
* ``compile``: ``torch.compile`` of the causal Wan layer step: first (compiling) and steady
  block times, and the compiled block equals the eager one;
* ``fp8``: torchao fp8 on the causal Wan transformer (fp8 matmuls where the GPU has them) stays
  close to bf16, with its speed;
* ``oom``: an impossible allocation is the out-of-memory error dreamwire's services report as
  ``ServiceFailed`` (``is_out_of_memory``), and a smaller allocation works after it;
* ``vram_returned``: unloading a model gives its memory back;
* ``vae``: the session VAEs a causal Wan block passes (``vae_type`` ``wan``, ``lightvae``,
  ``tae``; ``lighttae`` is ``tae``'s network), streamed as the pipelines stream them: ms to
  encode a longlive video block (12 frames) and to decode one (3 latents) at 576×320 and 512²,
  beside the Wan VAE's;
* ``split``: the causal Wan block loop in one process against split into stages (``split``:
  VAE encode and decode in processes of their own), one stream's frames/s and each stage's ms,
  Wan 1.3B-sized random transformer and real-size Wan VAE, streamdiffusionv2 video at 512² and
  longlive text and video at 576×320; with two GPUs or more, the stages on the others too;
* ``moondream``: Moondream 2's own model code (``--moondream-code``, default the copy in
  ``../shared/artifacts/moondream2-torch``) built full size by dreamwire's loader with random
  weights: each feature's latency at 512² (caption and query to 32 tokens), bf16.

Speed (ms per block and frames/s of the model loop), next to the published figures:
causal Wan 1.3B as streamdiffusionv2 (512², 2 steps) and longlive (576×320, 4 steps), Krea 14B
fp8 (576×320, 4 steps) when it fits; SD-Turbo UNet + TAESD at 512², 1 and 4 steps.
Not measured here (say so in the figures): the whole system (supervisor, rings) at full size
needs the real text encoder and VAE on disk; ``scripts/bench_wan.py`` measures the system
against the model loop with tiny checkpoints.

On the lent H200 (Python 3.12, torch preinstalled, no network), carry diffusers, torchao and
their missing needs as wheels (``.whl``, see the device tool's README) and run this script
first thing; ``tests/test_gpu_check.py`` runs ``--cpu`` so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from services.inference.session import is_out_of_memory  # noqa: E402
from services.inference.wan.blocks import BlockLoop  # noqa: E402
from services.inference.wan.model import CausalWanTransformer  # noqa: E402
from services.inference.wan.specs import GEOMETRY  # noqa: E402
from services.protocol import Mode  # noqa: E402

#: Published model-loop figures the speeds are read against.
PUBLISHED = {
    "streamdiffusionv2": "17-22 fps at 512² on one GPU (StreamDiffusionV2)",
    "longlive": "20.7 fps on an H100 (LongLive)",
    "krea-realtime-video": "11 fps on a B200 (Krea)",
    "sd-turbo": "94 fps, 1 step, RTX 4090 (StreamDiffusion)",
}

#: Wan2.1 configs (diffusers names); the tiny one keeps head size 128 like the real ones.
WAN_1_3B = dict(num_attention_heads=12, num_layers=30, ffn_dim=8960)
WAN_14B = dict(num_attention_heads=40, num_layers=40, ffn_dim=13824)
WAN_TINY = dict(num_attention_heads=2, num_layers=2, ffn_dim=256)


class Check:
    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.results: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any] | None], need_s: float = 10) -> None:
        left = self.deadline - time.monotonic()
        if left < need_s:
            self.results.append({"check": name, "status": "skip", "why": f"{left:.0f} s left"})
            return
        start = time.monotonic()
        try:
            figures = fn() or {}
            status = figures.pop("status", "pass")
            row = {"check": name, "status": status, **figures}
        except Skip as e:
            row = {"check": name, "status": "skip", "why": str(e)}
        except Exception as e:  # a failed check is a result, not the end of the run
            row = {"check": name, "status": "fail", "why": f"{type(e).__name__}: {e}"}
            row["trace"] = traceback.format_exc(limit=4)
        row["seconds"] = round(time.monotonic() - start, 1)
        self.results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
        free()


class Skip(Exception):
    pass


def free() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wan(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> CausalWanTransformer:
    """A causal Wan transformer of ``config`` with random weights, built on ``device``."""
    torch.manual_seed(0)
    heads = config["num_attention_heads"]
    with torch.device(device):
        model = CausalWanTransformer(
            patch_size=(1, 2, 2),
            num_attention_heads=heads,
            attention_head_dim=128,
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            freq_dim=256,
            ffn_dim=config["ffn_dim"],
            num_layers=config["num_layers"],
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            torch.nn.init.normal_(param, std=1.0 / math.sqrt(param.shape[-1]))
        elif "norm" in name:
            torch.nn.init.ones_(param)
    return model.to(dtype).eval().requires_grad_(False)


def time_blocks(
    loop: BlockLoop, cross: Any, hw: tuple[int, int], steps: list[int], blocks: int
) -> dict[str, Any]:
    """Model-loop time per block (warm: after two blocks), and the video frames/s it gives."""
    stream = loop.new_stream()
    for _ in range(2):
        loop.block(stream, cross, seed=42, steps=steps, latent_hw=hw)
    sync(loop.device)
    start = time.perf_counter()
    for _ in range(blocks):
        loop.block(stream, cross, seed=42, steps=steps, latent_hw=hw)
    sync(loop.device)
    ms = (time.perf_counter() - start) * 1000 / blocks
    frames = 4 * loop.geometry.block_frames
    return {"ms_per_block": round(ms, 1), "fps": round(frames * 1000 / ms, 1)}


def prompt(model: CausalWanTransformer, device: torch.device) -> Any:
    """Prompt keys/values of one fixed (seeded) embedding: seven rows, zero padding."""
    emb = torch.zeros(1, 512, 4096)
    emb[:, :7] = torch.randn(1, 7, 4096, generator=torch.Generator().manual_seed(7))
    return model.cross_kv(emb.to(device))


def one_block(
    model: CausalWanTransformer, pid: str, hw: tuple[int, int], steps: list[int], seed: int
) -> Any:
    """A stream's first block of ``pid`` on ``model``: the reference a changed model (compiled,
    quantized, on another stream) is compared with."""
    loop = BlockLoop(model, GEOMETRY[pid], next(model.parameters()).device)
    return loop.block(
        loop.new_stream(), prompt(model, loop.device), seed=seed, steps=steps, latent_hw=hw
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny models on the CPU (a dry run)")
    ap.add_argument("--out", type=Path, default=Path("gpu-check"))
    ap.add_argument("--budget-s", type=float, default=480.0)
    ap.add_argument(
        "--moondream-code",
        type=Path,
        default=ROOT.parent / "shared" / "artifacts" / "moondream2-torch",
        help="a folder with Moondream 2's model code (hf_moondream.py, …)",
    )
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        print("no CUDA device: run with --cpu for the dry run", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    small = WAN_TINY if args.cpu else WAN_1_3B
    #: Latent sizes (pixels / 8): Scope's defaults on a GPU, 64x64 pixels in the dry run.
    sizes = (
        {"sdv2": (64, 64), "longlive": (40, 72)} if cuda else {"sdv2": (8, 8), "longlive": (8, 8)}
    )
    blocks = 6 if cuda else 2
    check = Check(args.budget_s)
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "memory_gb": round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
        if cuda
        else None,
        "mode": "cuda" if cuda else "cpu dry run (tiny models)",
    }
    print(json.dumps(env), flush=True)

    def dtypes() -> dict[str, Any]:
        a = torch.randn(256, 256, device=device)
        b = torch.randn(256, 256, device=device)
        ref = a @ b
        out: dict[str, Any] = {}
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            if not cuda and dt is torch.float16:
                continue
            err = float(((a.to(dt) @ b.to(dt)).float() - ref).abs().max() / ref.abs().max())
            out[f"{name}_rel_err"] = round(err, 4)
            if err > 0.05:
                out["status"] = "fail"
        return out

    def pinned() -> dict[str, Any]:
        if not cuda:
            raise Skip("no CUDA: nothing to pin for")
        frame = torch.randint(0, 256, (720, 1280, 3), dtype=torch.uint8).pin_memory()
        assert frame.is_pinned()
        on_gpu = frame.to(device, non_blocking=True)
        back = torch.empty_like(frame).pin_memory()
        back.copy_(on_gpu, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
        assert torch.equal(back, frame)
        return {}

    def sd_turbo(steps_list: tuple[int, ...] = (1, 4)) -> dict[str, Any]:
        from diffusers import AutoencoderTiny, UNet2DConditionModel

        size = 64 if cuda else 8  # latents
        unet_kw: dict[str, Any] = dict(
            sample_size=size,
            cross_attention_dim=1024,
            attention_head_dim=[5, 10, 20, 20],
            use_linear_projection=True,
        )
        if args.cpu:
            unet_kw.update(
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                attention_head_dim=[2, 4],
                layers_per_block=1,
            )
        half = torch.float16 if cuda else torch.float32
        unet: Any = UNet2DConditionModel(**unet_kw)
        vae: Any = AutoencoderTiny()
        unet = unet.to(device, half).eval()
        vae = vae.to(device, half).eval()
        x = torch.randn(1, 4, size, size, device=device, dtype=half)
        ctx = torch.randn(1, 77, 1024, device=device, dtype=half)
        t = torch.tensor([999], device=device)
        out: dict[str, Any] = {}
        with torch.inference_mode():
            plain = unet(x, t, ctx).sample
            if cuda:
                unet_cl = unet.to(memory_format=torch.channels_last)
                cl = unet_cl(x.to(memory_format=torch.channels_last), t, ctx).sample
                out["channels_last_max_diff"] = round(float((cl - plain).abs().max()), 4)
            for steps in steps_list:
                for _ in range(2):
                    vae.decode(unet(x, t, ctx).sample)
                sync(device)
                start = time.perf_counter()
                n = 10 if cuda else 2
                for _ in range(n):
                    lat = x
                    for _ in range(steps):
                        lat = unet(lat, t, ctx).sample
                    vae.decode(lat)
                sync(device)
                ms = (time.perf_counter() - start) * 1000 / n
                out[f"{steps}_step_fps"] = round(1000 / ms, 1)
        out["published"] = PUBLISHED["sd-turbo"]
        del unet, vae
        return out

    def wan_speed(pid: str, hw: tuple[int, int], steps: list[int]) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            model = wan(small, device, dtype)
            loop = BlockLoop(model, GEOMETRY[pid], device)
            with torch.inference_mode():
                figures = time_blocks(loop, prompt(model, device), hw, steps, blocks)
            figures["published"] = PUBLISHED[pid]
            figures["latent_hw"] = list(hw)
            return figures

        return run

    def stream_handoff() -> dict[str, Any]:
        if not cuda:
            raise Skip("no CUDA streams on the CPU")
        model = wan(small, device, dtype)
        hw = sizes["sdv2"]
        with torch.inference_mode():
            ref = one_block(model, "streamdiffusionv2", hw, [750, 250], seed=1)
            side = torch.cuda.Stream(device)
            with torch.cuda.stream(side):
                got = one_block(model, "streamdiffusionv2", hw, [750, 250], seed=1).cpu()
            side.synchronize()
        return {"max_diff": float((got - ref.cpu()).abs().max())}

    def compile_check() -> dict[str, Any]:
        if args.cpu:
            raise Skip("compiling on the CPU takes minutes; tests/test_wan_model.py covers it")
        model = wan(small, device, dtype)
        hw = sizes["longlive"]
        steps = [1000, 750, 500, 250]
        with torch.inference_mode():
            eager = one_block(model, "longlive", hw, steps, seed=3)
            model.compile_blocks()
            start = time.perf_counter()
            compiled = one_block(model, "longlive", hw, steps, seed=3)
            sync(device)
            first_s = time.perf_counter() - start
            loop = BlockLoop(model, GEOMETRY["longlive"], device)
            steady = time_blocks(loop, prompt(model, device), hw, steps, blocks)
        return {
            "first_block_s": round(first_s, 1),
            **steady,
            "max_diff_vs_eager": round(float((compiled - eager).abs().max()), 4),
        }

    def fp8(config: dict[str, Any], label: str) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            from services.inference.wan.fp8 import quantize_linears

            if config is WAN_14B:
                need = 14e9 * 2 / 2**30 + 20  # bf16 before quantizing, plus activations
                have = torch.cuda.mem_get_info(device)[0] / 2**30
                if have < need:
                    raise Skip(f"{label}: {have:.0f} GB free, {need:.0f} GB needed")
            model = wan(config, device, dtype)
            hw = sizes["longlive"]
            steps = [1000, 750, 500, 250]
            with torch.inference_mode():
                ref = one_block(model, "krea-realtime-video", hw, steps, seed=5)
                kind = quantize_linears(model.blocks, device)
                got = one_block(model, "krea-realtime-video", hw, steps, seed=5)
                rel = float((got - ref).abs().max() / ref.abs().max())
                loop = BlockLoop(model, GEOMETRY["krea-realtime-video"], device)
                figures = time_blocks(loop, prompt(model, device), hw, steps, blocks)
            figures.update(kind=kind, rel_diff_vs_bf16=round(rel, 3))
            figures["published"] = PUBLISHED["krea-realtime-video"]
            if config is WAN_14B:
                figures["memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
            return figures

        return run

    def oom() -> dict[str, Any]:
        if not cuda:
            raise Skip("no device memory to exhaust on the CPU")
        free_bytes, total = torch.cuda.mem_get_info(device)
        try:
            torch.empty(int(total * 2), dtype=torch.uint8, device=device)
        except Exception as e:
            assert is_out_of_memory(e), f"not recognised as out of memory: {e!r}"
        else:
            raise AssertionError("an allocation of twice the memory succeeded")
        free()
        small_t = torch.empty(int(free_bytes // 4), dtype=torch.uint8, device=device)
        del small_t
        return {}

    def vram_returned() -> dict[str, Any]:
        if not cuda:
            raise Skip("no device memory on the CPU")
        free()
        before = torch.cuda.memory_allocated(device)
        model = wan(small, device, dtype)
        loaded = torch.cuda.memory_allocated(device)
        del model
        free()
        after = torch.cuda.memory_allocated(device)
        return {
            "loaded_gb": round((loaded - before) / 2**30, 2),
            "left_gb": round((after - before) / 2**30, 3),
            "status": "pass" if after - before < 64 * 2**20 else "fail",
        }

    def video_codecs() -> dict[str, Any]:
        """H.264 through the encoder and decoder as the services run them: NVENC/NVDEC
        where they open, else the CPU codecs (the status says which ran)."""
        from services import hwcodec
        from services.decode.decoder import Decoder
        from services.encode.encoder import Encoder

        encoder = hwcodec.encoder("H264", "auto")
        decoder = hwcodec.decoder("H264", "auto")
        width, height, frames = 1280, 720, 60
        enc, dec = Encoder("H264", width, height), Decoder("H264", width, height)
        rgb = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8).numpy()
        enc_s = dec_s = 0.0
        decoded = 0
        for i in range(frames):
            t0 = time.perf_counter()
            packets = enc.encode(rgb, i * 3000)
            t1 = time.perf_counter()
            for packet in packets:
                decoded += len(dec.decode(packet.data, packet.pts))
            enc_s += t1 - t0
            dec_s += time.perf_counter() - t1
        out: dict[str, Any] = {
            "encoder": encoder or "libx264 (CPU)",
            "decoder": decoder or "h264 (CPU)",
            "encode_ms_per_frame_1280x720": round(1e3 * enc_s / frames, 2),
            "decode_ms_per_frame_1280x720": round(1e3 * dec_s / frames, 2),
            "frames_decoded": decoded,
        }
        if decoded < frames - 2:
            out["status"] = "fail"
        return out

    def moondream() -> dict[str, Any]:
        import tempfile

        import numpy as np

        sys.path.insert(0, str(ROOT / "scripts"))
        import make_tiny_moondream as tiny

        from services.overlay import moondream as md
        from services.overlay.config import MoondreamFeature
        from services.overlay.model import FeatureRequest, run_feature

        if not (args.moondream_code / f"{md.ENTRY_MODULE}.py").is_file():
            raise Skip(f"no Moondream model code at {args.moondream_code} (--moondream-code)")
        with tempfile.TemporaryDirectory(prefix="moondream-") as tmp:
            # Full size: the release's config.json has an empty "config" (its defaults).
            sizes: dict[str, Any] = {} if cuda else tiny.TINY_SIZES
            repo = tiny.write_repository(Path(tmp), args.moondream_code, sizes)
            started = time.perf_counter()
            model = md.build_model(repo, tiny.tokenizer_path(Path(tmp)), device.type, "random")
        with torch.no_grad():
            for key, tensor in model.state_dict().items():
                tensor.copy_(tiny.recipe_weight(key, tuple(tensor.shape)).to(tensor.dtype))
        sync(device)
        out: dict[str, Any] = {
            "build_s": round(time.perf_counter() - started, 1),
            "parameters_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 2),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        }
        rgb = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
        for feature in MoondreamFeature:
            request = FeatureRequest(feature, "normal", "What is this?", "person", 0.0, 5, 32)
            run_feature(model, request, rgb)  # warm
            sync(device)
            t0 = time.perf_counter()
            n = 3
            for _ in range(n):
                run_feature(model, request, rgb)
            sync(device)
            out[f"{feature.value}_ms"] = round((time.perf_counter() - t0) * 1e3 / n, 1)
        del model
        free()
        return out

    def vae() -> dict[str, Any]:
        """Streamed encode and decode of a block, each VAE at full size with random weights
        (the dry run: a narrow Wan VAE and 8×8 latents)."""
        from diffusers import AutoencoderKLWan

        from services.inference.wan.tae import TaeStream, TinyAutoencoder
        from services.inference.wan.vae import LIGHTVAE_BASE_DIM, VaeStream

        def wan_vae(base_dim: int) -> VaeStream:
            model: Any = AutoencoderKLWan(base_dim=base_dim if cuda else 8)
            return VaeStream(model.to(device, dtype).eval())

        makers: dict[str, Callable[[], Any]] = {
            "wan": lambda: wan_vae(96),  # the Wan 2.1 VAE's width
            "lightvae": lambda: wan_vae(LIGHTVAE_BASE_DIM),
            "tae": lambda: TaeStream(TinyAutoencoder().to(device, dtype).eval()),
        }
        out: dict[str, Any] = {}
        for h, w in (sizes["longlive"], sizes["sdv2"]):
            label = f"{8 * w}x{8 * h}"  # 576x320 and 512x512 on a GPU
            for name, make in makers.items():
                stream = make()
                first = torch.rand(1, 3, 9, 8 * h, 8 * w, device=device, dtype=dtype) * 2 - 1
                block = torch.rand(1, 3, 12, 8 * h, 8 * w, device=device, dtype=dtype) * 2 - 1
                stream.decode(stream.encode(first))  # the stream's start: 9 frames, 3 latents
                enc, dec = [], []
                for _ in range(blocks):
                    sync(device)
                    t0 = time.perf_counter()
                    latents = stream.encode(block)
                    sync(device)
                    t1 = time.perf_counter()
                    frames = stream.decode(latents)
                    sync(device)
                    enc.append(t1 - t0)
                    dec.append(time.perf_counter() - t1)
                assert frames.shape[2] == 12, frames.shape
                out[f"{name} {label} encode_ms"] = round(1e3 * sorted(enc)[len(enc) // 2], 1)
                out[f"{name} {label} decode_ms"] = round(1e3 * sorted(dec)[len(dec) // 2], 1)
                del stream
                free()
            for name in ("lightvae", "tae"):
                wan_ms = out[f"wan {label} encode_ms"] + out[f"wan {label} decode_ms"]
                ms = out[f"{name} {label} encode_ms"] + out[f"{name} {label} decode_ms"]
                out[f"{name} {label} speedup"] = round(wan_ms / ms, 1) if ms else None
        return out

    def split_loop() -> dict[str, Any]:
        """One stream of the causal Wan block loop in one process against split into stages
        (VAE encode and decode processes beside the transformer's): Wan 1.3B-sized random
        transformer, the real-size Wan VAE, through the real pipeline objects
        (``bench_wan.measure_stream``); on one GPU, and with two or more a GPU for the stages."""
        import shutil
        import tempfile

        sys.path.insert(0, str(ROOT / "scripts"))
        import make_tiny_wan
        from bench_wan import load_for_split_bench, measure_stream

        threads = torch.get_num_threads()  # the one-process runs' (a split run sets 1)
        models = Path(tempfile.mkdtemp(prefix="dreamwire-split-"))
        size = "full" if cuda else "tiny"
        pipelines = ("streamdiffusionv2", "longlive") if cuda else ("longlive",)
        make_tiny_wan.make_all(models, wan_vae=size, transformer=size, pipelines=pipelines)
        gpus = torch.cuda.device_count() if cuda else 0
        placements: dict[str, bool | dict[str, str]] = {"one process": False, "split": True}
        if gpus >= 3:
            placements["split, a GPU per stage"] = {"encode": "cuda:1", "decode": "cuda:2"}
        elif gpus == 2:
            placements["split, the VAE on GPU 1"] = {"encode": "cuda:1", "decode": "cuda:1"}
        cases: list[tuple[str, int, int, tuple[Mode, ...]]] = (
            [("streamdiffusionv2", 512, 512, ("video",)), ("longlive", 576, 320, ("text", "video"))]
            if cuda
            else [("longlive", 32, 32, ("text", "video"))]
        )
        out: dict[str, Any] = {"gpus": gpus}
        try:
            for pid, w, h, modes in cases:
                for label, split in placements.items():
                    pipe = load_for_split_bench(pid, models, w, h, split, threads)
                    try:
                        for mode in modes:
                            r = measure_stream(pipe, mode, 1, blocks)
                            out[f"{pid} {mode} {w}x{h} {label} fps"] = r["fps"]
                            out[f"{pid} {mode} {w}x{h} {label} stage_ms"] = r["stage_ms"]
                    finally:
                        pipe.close()
                        free()
                for mode in modes:
                    one = out[f"{pid} {mode} {w}x{h} one process fps"]
                    for label in list(placements)[1:]:
                        two = out[f"{pid} {mode} {w}x{h} {label} fps"]
                        out[f"{pid} {mode} {w}x{h} {label} / one"] = round(two / one, 2)
        finally:
            shutil.rmtree(models, ignore_errors=True)
        return out

    check.run("dtypes", dtypes, 5)
    check.run("moondream (its own code, random weights)", moondream, 60)
    check.run("video codecs (NVENC/NVDEC)", video_codecs, 30)
    check.run("pinned", pinned, 5)
    check.run("vram_returned", vram_returned, 30)
    check.run("oom", oom, 10)
    check.run(
        "streamdiffusionv2 (2 steps)", wan_speed("streamdiffusionv2", sizes["sdv2"], [750, 250]), 60
    )
    check.run(
        "longlive (4 steps)",
        wan_speed("longlive", sizes["longlive"], [1000, 750, 500, 250]),
        60,
    )
    check.run("split block loop (VAE stages in processes)", split_loop, 150)
    check.run("stream_handoff", stream_handoff, 30)
    check.run("vae (wan, lightvae, tae: a block streamed)", vae, 60)
    check.run("sd-turbo unet + taesd (channels_last)", sd_turbo, 60)
    check.run("fp8 (1.3B)", fp8(small, "1.3B"), 60)
    check.run("compile (longlive)", compile_check, 180)
    if cuda:
        check.run("krea 14B fp8", fp8(WAN_14B, "14B"), 150)
    write(args.out, env, check.results)
    failed = [r["check"] for r in check.results if r["status"] == "fail"]
    return 1 if failed else 0


def write(out: Path, env: dict[str, Any], results: list[dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps({"env": env, "checks": results}, indent=1))
    lines = [
        f"GPU check on {env['device']} (torch {env['torch']}, {env['mode']})",
        "",
        "| check | status | figures |",
        "|---|---|---|",
    ]
    for r in results:
        figures = ", ".join(
            f"{k} {v}" for k, v in r.items() if k not in ("check", "status", "trace")
        )
        lines.append(f"| {r['check']} | {r['status']} | {figures} |")
    (out / "check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
