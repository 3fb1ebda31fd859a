"""Inference throughput: raw model calls, the pipeline object, the whole system, 4 sessions.

    python scripts/bench_inference.py --pipeline streamdiffusion --models DIR --size 256 \\
        --steps 1,2,4 [--json]
    python scripts/bench_inference.py --pipeline longlive --models DIR [--size 64 --blocks 6]

streamdiffusionv2, longlive and krea-realtime-video run ``bench_wan.py`` (per-block latency and
frames/s of the model loop against the whole system); the rest of this text is streamdiffusion.

Per step count (len(denoising_step_list)):

Each in-process figure is the median of ``--repeats`` interleaved rounds, with its min-max
spread (``*_fps_spread``): two figures whose spreads overlap are not different.

* ``raw_fps``: the model calls alone in a loop, stream batch (VAE encode of one frame, one UNet
  call on the n in-flight latents, VAE decode of one): the ceiling;
* ``sequential_fps``: the same work with the n steps run one after another (n UNet calls of
  one latent per frame), what stream batch is compared with;
* ``stream_batch_fps``: = raw_fps (named as in the issue);
* ``pipeline_fps``: the pipeline object in-process (prompt track, noise, uint8 conversion);
* ``system_fps``: ``supervisor start`` with testsrc → inference → passthrough, one session,
  frames leaving inference per second (testsrc offers a 30 fps camera's frames, more than the
  model can take; a source much faster than that would only compete for the CPU);
* ``system_4_sessions_fps``: the same with 4 sessions (frames of all sessions per second).

``--models DIR`` with no models in it gets the tiny random models (``make_tiny_models.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_wan import PIPELINES as WAN_PIPELINES  # noqa: E402


def _timed(fn: Any, frames: int, warmup: int) -> tuple[float, float]:
    """(frames per second, mean ms per frame) of ``fn(i)`` over ``frames`` calls."""
    for i in range(warmup):
        fn(i)
    start = time.perf_counter()
    for i in range(frames):
        fn(warmup + i)
    elapsed = time.perf_counter() - start
    return frames / elapsed, elapsed / frames * 1000


def bench_in_process(
    pipe: Any, size: int, steps: list[int], frames: int, repeats: int
) -> dict[str, Any]:
    import numpy as np
    import torch

    from services.inference import diffusion as d
    from services.inference import registry
    from services.inference.pipeline import Request

    c = pipe.c
    n = len(steps)
    dev = pipe.device.device
    rgb = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (1, size, size, 3), dtype=np.uint8)
    ).to(dev)
    emb = pipe.prompts.encode_text("a watercolor painting")
    shape = d.latent_shape(c, size, size)
    noise = torch.randn(n, *shape, device=dev)
    t_all = torch.tensor(steps, device=dev)

    def raw(_: int) -> None:
        x0 = d.encode_images(c, rgb)
        x_t = torch.cat([d.add_noise(c, x0, noise[:1], t_all[:1]), noise[1:]])
        out = d.run_unet(c, x_t, t_all, emb.expand(n, -1, -1))
        pred = d.predict_x0(c, x_t, t_all, out)
        d.decode_latents(c, pred[-1:]).cpu()

    def sequential(_: int) -> None:
        x0 = d.encode_images(c, rgb)
        for i in range(n):
            t = t_all[i : i + 1]
            x_t = d.add_noise(c, x0, noise[i : i + 1], t)
            x0 = d.predict_x0(c, x_t, t, d.run_unet(c, x_t, t, emb[None]))
        d.decode_latents(c, x0).cpu()

    spec = registry.get("streamdiffusion")
    config = registry.full_config(
        spec, {"height": size, "width": size, "denoising_step_list": steps}
    )
    state = pipe.new_session("bench", size, size, config)
    frame = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)

    def pipeline(i: int) -> None:
        for r in pipe([Request("bench", state, pipe.prepare(state, frame), i)]):
            if r.frame is not None:
                r.frame.cpu()

    # The three loops take turns, ``repeats`` rounds: a drift of the machine (another process,
    # clocks) then falls on all three alike, and the spread says how far one run can be trusted.
    warm = n + 2
    loops = {"raw": raw, "sequential": sequential, "pipeline": pipeline}
    rates: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(repeats):
        for name, fn in loops.items():
            rates[name].append(_timed(fn, frames, warm)[0])
    out: dict[str, Any] = {}
    for name, values in rates.items():
        median = statistics.median(values)
        out[f"{name}_fps"] = median
        out[f"{name}_ms"] = 1000 / median
        out[f"{name}_fps_spread"] = [round(min(values), 2), round(max(values), 2)]
    out["stream_batch_fps"] = out["raw_fps"]
    return out


def bench_system(models: Path, size: int, steps: list[int], sessions: int, seconds: float) -> float:
    """Frames a second out of inference/streamdiffusion under ``supervisor start``."""
    from services import protocol as p
    from supervisor.client import AdminClient, find_run_dirs

    base = Path(tempfile.mkdtemp(prefix="dwb", dir="/tmp"))
    config = base / "bench.toml"
    config.write_text(
        f"""signalling = false
media = false
pipelines = ["passthrough", "streamdiffusion"]
models_dir = "{models}"
[[services]]
name = "testsrc"
kind = "testsrc"
options = {{ fps = 30 }}
"""
    )
    env = {**os.environ, "DREAMWIRE_RUN_DIR": str(base / "run")}
    log = open(base / "log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "supervisor.cli", "start", "--config", str(config)],
        env=env,
        stdout=log,
        stderr=log,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 120
        admin = None
        while admin is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((base / "log").read_text())
            runs = find_run_dirs(base / "run")
            if runs:
                try:
                    client = AdminClient(runs[0])
                    report = client.status()
                    if report.phase == "running" and all(
                        s.state == "ready" for s in report.services
                    ):
                        admin = client
                    else:
                        client.close()
                except Exception:
                    pass
            time.sleep(0.2)
        stages = ["testsrc", "inference/streamdiffusion", "inference/passthrough"]
        for i in range(sessions):
            params = {"denoising_step_list": steps}
            opened = admin.request(
                p.OpenSession(
                    session_id=f"b{i}", stages=stages, width=size, height=size, params=params
                )
            )
            assert isinstance(opened, p.SessionOpened), opened

        def done() -> int:
            report = admin.status()
            return next(
                s.frames_done for s in report.services if s.name == "inference/streamdiffusion"
            )

        time.sleep(max(2.0, seconds / 3))  # warm-up
        first, t0 = done(), time.monotonic()
        time.sleep(seconds)
        last, t1 = done(), time.monotonic()
        admin.close()
        return (last - first) / (t1 - t0)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--pipeline", default="streamdiffusion", choices=["streamdiffusion", *WAN_PIPELINES]
    )
    parser.add_argument("--models", type=Path, required=True, help="models directory")
    parser.add_argument("--size", type=int, help="frame size (256; causal Wan: 64)")
    parser.add_argument("--steps", default="1,2,4", help="step counts to measure")
    parser.add_argument("--frames", type=int, default=30, help="frames per in-process run")
    parser.add_argument(
        "--repeats", type=int, default=5, help="in-process rounds (median and min-max reported)"
    )
    parser.add_argument(
        "--seconds", type=float, help="measured seconds per system run (6; causal Wan: 10)"
    )
    parser.add_argument("--no-system", action="store_true", help="skip the multi-process runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, wan_args = parser.parse_known_args(argv)
    if args.pipeline in WAN_PIPELINES:
        # The causal Wan pipelines generate blocks, not frames: their own benchmark.
        import bench_wan

        extra = ["--json"] if args.json else []
        extra += ["--size", str(args.size)] if args.size else []
        extra += ["--seconds", str(args.seconds)] if args.seconds else []
        return bench_wan.main(
            ["--pipeline", args.pipeline, "--models", str(args.models), *extra, *wan_args]
        )
    if wan_args:
        parser.error(f"unrecognized arguments: {' '.join(wan_args)}")
    args.size = args.size or 256
    args.seconds = args.seconds or 6.0

    from services.inference import registry
    from services.models.downloads import is_downloaded

    if not is_downloaded(args.pipeline, args.models):
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "mtm", ROOT / "scripts" / "make_tiny_models.py"
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.make_all(args.models)
    pspec = registry.get(args.pipeline)
    pipe: Any = pspec.load(registry.full_config(pspec, {}), args.models)
    results: dict[str, Any] = {"device": pipe.device_description, "size": args.size}
    for count in [int(x) for x in args.steps.split(",")]:
        steps = [int(999 - (i + 1) * 900 / (count + 1)) for i in range(count)]
        row: dict[str, Any] = bench_in_process(pipe, args.size, steps, args.frames, args.repeats)
        if not args.no_system:
            row["system_fps"] = bench_system(args.models, args.size, steps, 1, args.seconds)
            row["system_4_sessions_fps"] = bench_system(
                args.models, args.size, steps, 4, args.seconds
            )
        row["steps"] = steps
        results[str(count)] = {
            k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()
        }
        if not args.json:
            print(count, "steps:", json.dumps(results[str(count)]))
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
