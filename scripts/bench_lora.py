#!/usr/bin/env python3
"""What a LoRA costs per block (Wan) or frame (streamdiffusion), by merge mode, in one run.

For each pipeline, the same model loop (the pipeline object in-process, one session, as
``bench_wan.py``'s loop and ``bench_inference.py`` time it) loaded three ways: without a LoRA,
with one merged into the weights (``permanent_merge``) and with one as a run-time adapter
(``runtime_peft``). The LoRA covers every attention and feed-forward Linear (rank 4), written
for the tiny models (``make_tiny_wan.tiny_lora``, ``make_tiny_models.make_sd_lora``). The three
take turns, ``--rounds`` rounds; medians with min-max.

    python scripts/bench_lora.py --models DIR [--pipeline longlive] [--size 128] [--rounds 3]

``DIR`` gets the tiny models if it lacks them. A merged LoRA should cost nothing; a run-time
adapter costs two thin matmuls per Linear, which on a GPU's large layers is a few percent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from services.inference import registry  # noqa: E402
from services.inference.lora_files import lora_dir  # noqa: E402
from services.inference.pipeline import Request  # noqa: E402

MODES = ("none", "permanent_merge", "runtime_peft")
LORA_FILE = "bench-lora.safetensors"


def ensure(models: Path, pipeline_id: str) -> None:
    """The tiny models and a LoRA for the pipeline's model in ``models``."""
    from safetensors.torch import save_file

    target = lora_dir(models) / f"{pipeline_id}-{LORA_FILE}"
    if pipeline_id == "streamdiffusion":
        import make_tiny_models

        if not (models / make_tiny_models.SD_REPO).is_dir():
            make_tiny_models.make_all(models)
        if not target.exists():
            make_tiny_models.make_sd_lora(models, target.name)
        return
    import make_tiny_wan

    from services.inference.wan.specs import CHECKPOINTS
    from services.models.store import repo_dir

    repo, filename = CHECKPOINTS[pipeline_id]
    if not (repo_dir(models, repo) / filename).exists():
        make_tiny_wan.make_all(models)
    if not target.exists():
        state = make_tiny_wan.original_state_dict(make_tiny_wan.tiny_transformer(seed=3))
        lora = make_tiny_wan.tiny_lora(state, seed=4)["generator_lora"]
        target.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in lora.items()}, str(target))


def loop_ms(pipeline_id: str, models: Path, size: int, calls: int, mode: str) -> float:
    """Milliseconds a frame of the model loop (text for Wan, video for streamdiffusion)."""
    spec = registry.get(pipeline_id)
    params: dict[str, Any] = {"height": size, "width": size}
    if mode != "none":
        params["loras"] = [{"path": f"{pipeline_id}-{LORA_FILE}", "merge_mode": mode}]
    load = registry.full_config(spec, params)
    pipe = spec.load(load, models)
    config = registry.full_config(spec, {"height": size, "width": size})
    state = pipe.new_session("bench", size, size, config)
    video = "video" in spec.modes and "text" not in spec.modes
    if hasattr(pipe, "prefetch"):
        pipe.prefetch = False  # each block on the calling thread: the model's own time
    rng = np.random.default_rng(0)
    made = 0

    def call() -> None:
        nonlocal made
        frames = None
        if video:
            frames = pipe.prepare(state, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        results = pipe([Request("bench", state, frames, None)])
        made += sum(r.frame is not None for r in results) + len(pipe.ready(state))

    for _ in range(2 * spec.frames_per_call):
        call()  # warm up (a first block, the first frames' noise)
    made = 0
    start = time.perf_counter()
    while made < calls * spec.frames_per_call:
        call()
    total = time.perf_counter() - start
    pipe.end_session(state)
    return 1e3 * total / made


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--pipeline", action="append", help="default: longlive, streamdiffusion")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--calls", type=int, default=6, help="blocks (or frames) a round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.manual_seed(0)
    results: dict[str, dict[str, Any]] = {}
    for pipeline_id in args.pipeline or ["longlive", "streamdiffusion"]:
        ensure(args.models, pipeline_id)
        runs: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(loop_ms(pipeline_id, args.models, args.size, args.calls, mode))
        results[pipeline_id] = {
            mode: {
                "ms_per_frame": round(statistics.median(v), 2),
                "spread": [round(min(v), 2), round(max(v), 2)],
            }
            for mode, v in runs.items()
        }
    if args.json:
        print(json.dumps(results))
        return 0
    print(f"{args.size}×{args.size}, {args.rounds} rounds; ms a frame, median [min-max]")
    print("| pipeline | no LoRA | permanent_merge | runtime_peft | runtime / none |")
    print("|---|---:|---:|---:|---:|")
    for pid, r in results.items():
        cells = [f"{r[m]['ms_per_frame']} [{r[m]['spread'][0]}-{r[m]['spread'][1]}]" for m in MODES]
        ratio = r["runtime_peft"]["ms_per_frame"] / r["none"]["ms_per_frame"]
        print(f"| {pid} | {' | '.join(cells)} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
