#!/usr/bin/env python3
"""Per-block latency and frames/s of the causal Wan pipelines: the pipeline object in-process
(the model loop) against the whole system (``supervisor start``, the inference process, rings),
in one run.

    python scripts/bench_wan.py --models /tmp/wan --size 64 [--pipeline ID] [--json]
    python scripts/bench_inference.py --pipeline longlive --models /tmp/wan   # the same

``--models DIR`` without the checkpoints gets the tiny random ones (``make_tiny_wan.py``).

``--split [--sessions 1 --sessions 2]`` measures the block loop in one process against the
loop split into stages (VAE encode and decode in processes of their own): frames per second of
one stream and of two, each stage's ms per block, interleaved rounds, medians.

``--vae-type wan --vae-type tae …`` measures the VAEs side by side instead: the model loop of
each pipeline and mode loaded with each ``vae_type``, and the median time of the session's VAE
encode and decode calls, one call per block (Krea's text mode encodes too: its re-encoded context
frame). The tiny models' Wan VAE is tiny too; ``make_tiny_wan.py DIR --wan-vae full`` writes it at
its real size (the light VAEs always are), which is what a comparison needs.

With the real checkpoints on a GPU, compare with the published figures (StreamDiffusionV2
~17-22 fps at 512x512 on one high-end GPU, LongLive ~20 fps on an H100, Krea ~11 fps on a B200).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services import protocol as p  # noqa: E402
from services.inference import registry  # noqa: E402
from services.inference.pipeline import Request  # noqa: E402
from supervisor.client import AdminClient, find_run_dirs  # noqa: E402

PIPELINES = ("streamdiffusionv2", "longlive", "krea-realtime-video")


class TimedVae:
    """A session's VAE stream that records how long each encode and decode call takes (ms)."""

    def __init__(self, inner: Any, times: dict[str, list[float]]) -> None:
        self.inner, self.times = inner, times

    def _timed(self, what: str, call: Any, x: Any) -> Any:
        start = time.perf_counter()
        out = call(x)
        if out.is_cuda:
            import torch

            torch.cuda.synchronize(out.device)
        self.times[what].append(1e3 * (time.perf_counter() - start))
        return out

    def reset(self) -> None:
        self.inner.reset()

    def encode(self, video: Any) -> Any:
        return self._timed("encode", self.inner.encode, video)

    def decode(self, latents: Any) -> Any:
        return self._timed("decode", self.inner.decode, latents)


def bench_model_loop(
    pipeline_id: str,
    models: Path,
    size: int,
    blocks: int,
    mode: p.Mode = "text",
    vae_type: str = "wan",
) -> dict[str, float]:
    """The pipeline object alone: one session, called until ``blocks`` blocks of frames came
    back (a block's other frames taken with ``ready``, as the service does). Text: a call while
    the next block is still being made (ahead, off the calling thread) yields nothing, and the
    loop waits a millisecond. Video: every call brings a new input frame, as fast as the model
    takes them. The VAE's calls are timed (medians over the measured blocks)."""
    spec = registry.get(pipeline_id)
    load = registry.full_config(spec, {"height": size, "width": size, "vae_type": vae_type})
    pipe = spec.load(load, models)
    config = registry.full_config(spec, {"height": size, "width": size})
    from services.inference.wan.pipeline import WanPipeline

    assert isinstance(pipe, WanPipeline)
    times: dict[str, list[float]] = {"encode": [], "decode": []}
    streams = pipe.vae_stream
    pipe.vae_stream = lambda: TimedVae(streams(), times)
    state = pipe.new_session("bench", size, size, config)
    if mode == "video":
        pipe.prefetch = False  # the model's own pace: each block on the calling thread
    rng = np.random.default_rng(0)
    made = 0

    def call() -> None:
        nonlocal made
        frames = None
        if mode == "video":
            frames = pipe.prepare(state, rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        results = pipe([Request("bench", state, frames, None)])
        made += sum(r.frame is not None for r in results) + len(pipe.ready(state))
        if not made and mode == "text":
            time.sleep(0.001)

    while made < 2 * spec.frames_per_call:  # the first block (and one made ahead)
        call()
    made = 0
    for calls in times.values():
        calls.clear()
    frames = blocks * spec.frames_per_call
    start = time.perf_counter()
    while made < frames:
        before = made
        call()
        if made == before and mode == "text":
            time.sleep(0.001)
    total = time.perf_counter() - start
    pipe.end_session(state)
    pipe.close()

    def median(calls: list[float]) -> float:
        return round(statistics.median(calls), 1) if calls else 0.0

    return {
        "block_ms": round(1e3 * total / blocks, 1),
        "fps": round(made / total, 2),
        "encode_ms": median(times["encode"]),
        "decode_ms": median(times["decode"]),
    }


def bench_system(
    pipeline_id: str,
    models: Path,
    size: int,
    seconds: float,
    warmup: float,
    mode: p.Mode = "text",
) -> dict[str, float]:
    """The pipeline in its inference process under ``supervisor start``: a session (text, or
    video fed by ``testsrc`` at 30 fps) into a ring read by ``testsink``, which tells this
    process (its ``bench`` inbox) each frame it takes with its stamps. Over the last
    ``seconds`` (after ``warmup``): delivered fps, the intervals between frames leaving the
    inference stage (p50, p99, max), and the time frames were held to pace them (``pacing``)."""
    import msgspec
    import zmq

    from services.runtime import inbox_endpoint
    from shm.ring import Stage

    base = Path(tempfile.mkdtemp(prefix="dwbw", dir="/tmp"))
    name = f"inference/{pipeline_id}"
    (base / "bench.toml").write_text(
        "signalling = false\nmedia = false\npipelines = []\n"
        f'[[services]]\nname = "{name}"\nkind = "inference"\n'
        f'[services.options]\npipeline = "{pipeline_id}"\nmodels_dir = "{models}"\n'
        'notify = "bench"\n'
        f"[services.options.load_params]\nheight = {size}\nwidth = {size}\n"
        '[[services]]\nname = "testsink"\nkind = "testsink"\n'
        '[services.options]\nreport_to = "bench"\n'
        '[[services]]\nname = "testsrc"\nkind = "testsrc"\n'
    )
    env = {**os.environ, "DREAMWIRE_RUN_DIR": str(base / "run")}
    with open(base / "log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.cli", "start", "--config", str(base / "bench.toml")],
            env=env,
            stdout=log,
            stderr=log,
            cwd=ROOT,
        )
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.setsockopt(zmq.LINGER, 0)
    decoder = msgspec.msgpack.Decoder(p.StageOutput)
    try:
        admin = _wait_running(base, proc)
        inbox.bind(inbox_endpoint(str(find_run_dirs(base / "run")[0]), "bench"))
        stages = [name, "testsink"] if mode == "text" else ["testsrc", name, "testsink"]
        opened = admin.request(
            p.OpenSession(session_id="bench", stages=stages, width=size, height=size, modes=[mode])
        )
        assert isinstance(opened, p.SessionOpened), opened
        start = time.monotonic()
        left: list[int] = []  # when each frame left the inference stage (ns)
        held: list[int] = []  # how long it was held there to pace the output (ns)
        blocks: list[tuple[int, int]] = []
        while time.monotonic() - start < warmup + seconds:
            if not inbox.poll(100):
                continue
            message = decoder.decode(inbox.recv())
            if time.monotonic() - start < warmup:
                continue
            data = message.data
            if message.kind == "log":
                stamps = data["stamps"]
                left.append(stamps[Stage.INFERENCE_END])
                if stamps[Stage.PACED]:
                    held.append(stamps[Stage.PACED] - stamps[Stage.MODEL_END])
            elif message.kind == "fetch_output" and "block" in data:
                blocks.append((time.monotonic_ns(), int(data["block"])))
        intervals = sorted(b - a for a, b in itertools.pairwise(sorted(left)))
        if not intervals:
            raise RuntimeError(f"no frames in {seconds} s: {(base / 'log').read_text()[-3000:]}")

        def pct(q: float) -> float:
            return intervals[min(len(intervals) - 1, int(q * len(intervals)))] / 1e6

        block_gaps = [
            (t1 - t0) / (b1 - b0) / 1e6
            for (t0, b0), (t1, b1) in itertools.pairwise(blocks)
            if b1 > b0
        ]
        return {
            "fps": round((len(left) - 1) / ((max(left) - min(left)) / 1e9), 2),
            "block_ms": round(statistics.median(block_gaps), 1) if block_gaps else 0.0,
            "interval_p50_ms": round(pct(0.5), 1),
            "interval_p99_ms": round(pct(0.99), 1),
            "interval_max_ms": round(intervals[-1] / 1e6, 1),
            "pacing_p50_ms": round(statistics.median(held) / 1e6, 1) if held else 0.0,
        }
    finally:
        inbox.close()
        ctx.term()
        proc.terminate()
        proc.wait(30)
        if os.environ.get("BENCH_KEEP_LOG"):
            shutil.copy(base / "log", os.environ["BENCH_KEEP_LOG"])
        shutil.rmtree(base, ignore_errors=True)


def _service(admin: AdminClient, name: str) -> Any:
    return next((s for s in admin.status().services if s.name == name), None)


def _wait(predicate: Any, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        time.sleep(0.2)


def _wait_running(base: Path, proc: subprocess.Popen[bytes]) -> AdminClient:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((base / "log").read_text())
        runs = find_run_dirs(base / "run")
        if runs:
            client = AdminClient(runs[0])
            try:
                if client.status().phase == "running":
                    return client
            except Exception:
                pass
            client.close()
        time.sleep(0.2)
    raise RuntimeError("the supervisor did not come up")


def ensure_models(models: Path, pipeline_ids: list[str]) -> None:
    """No checkpoints in ``models``: write the tiny random ones (``make_tiny_wan.py``)."""
    from services.models.downloads import is_downloaded

    if not all(is_downloaded(pid, models) for pid in pipeline_ids):
        sys.path.insert(0, str(ROOT / "scripts"))
        import make_tiny_wan

        make_tiny_wan.make_all(models)


def load_for_split_bench(
    pipeline_id: str,
    models: Path,
    width: int,
    height: int,
    split: bool | dict[str, Any],
    threads: int,
) -> Any:
    """The pipeline in one process (torch on ``threads`` threads) or split (this process's
    transformer and each VAE stage process on one thread: the same cores; ``split`` may name
    the stages' devices)."""
    import torch

    torch.set_num_threads(1 if split else threads)
    spec = registry.get(pipeline_id)
    params: dict[str, Any] = {"height": height, "width": width}
    if split:
        params["split"] = {"threads": 1, **(split if isinstance(split, dict) else {})}
    pipe: Any = spec.load(registry.full_config(spec, params), models)
    pipe.bench_size = (width, height)
    return pipe


def measure_stream(pipe: Any, mode: p.Mode, sessions: int, blocks: int) -> dict[str, Any]:
    """Frames per second of ``sessions`` streams through a loaded pipeline object, blocks ahead
    on as the service runs it; video input comes as fast as the pipeline takes it (a faster
    camera: what it cannot take is dropped), the feeding loop idling a millisecond between calls
    that gave nothing. Each session's first two blocks are left out. Per-stage ms: the split's
    own figures; in one process, the VAE calls timed."""
    spec = registry.get(pipe.spec.id)
    width, height = pipe.bench_size
    config = registry.full_config(spec, {"height": height, "width": width})
    times: dict[str, list[float]] = {"encode": [], "decode": []}
    from services.inference.wan.split import SplitWanPipeline

    split = isinstance(pipe, SplitWanPipeline)
    if not split:
        streams = pipe.vae_stream
        pipe.vae_stream = lambda: TimedVae(streams(), times)
    states = [pipe.new_session(f"s{i}", width, height, config) for i in range(sessions)]
    if not split:
        pipe.vae_stream = streams
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(16)]
    per_block = 4 * pipe.block_frames
    warm = (4 * pipe.geometry.first_block_frames - 3) + per_block
    figures = pipe.figures if split else times
    made = [0] * sessions
    start: float | None = None
    calls = 0
    while start is None or min(made) < blocks * per_block:
        requests = []
        for state in states:
            frames = pipe.prepare(state, pool[calls % len(pool)]) if mode == "video" else None
            requests.append(Request(state.session_id, state, frames, None))
        calls += 1
        results = pipe(requests)
        got = [
            sum(r.frame is not None for r in results if r.session_id == s.session_id)
            + len(pipe.ready(s))
            for s in states
        ]
        made = [m + g for m, g in zip(made, got, strict=True)]
        if start is None and min(made) >= warm:
            start, made = time.perf_counter(), [0] * sessions
            for recent in figures.values():
                recent.clear()
        if not any(got):
            time.sleep(0.001)
    total = time.perf_counter() - (start or 0.0)
    for state in states:
        pipe.end_session(state)

    def median(calls: list[float]) -> float | None:
        return round(statistics.median(calls), 1) if calls else None

    ms = (
        pipe.stage_ms()
        if split
        else {
            "encode": median(times["encode"]),
            "transformer": None,
            "decode": median(times["decode"]),
        }
    )
    return {"fps": round(sum(made) / total, 2), "stage_ms": ms}


def compare_split(args: argparse.Namespace, pipeline_ids: list[str], modes: list[p.Mode]) -> int:
    """One process against split, interleaved rounds, medians (``--split``)."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for _ in range(args.rounds):
        for pipeline_id in pipeline_ids:
            for split in (False, True):
                pipe = load_for_split_bench(
                    pipeline_id, args.models, args.size, args.size, split, args.threads
                )
                for mode, sessions in itertools.product(modes, args.sessions):
                    key = f"{pipeline_id} {mode} {sessions}"
                    r = measure_stream(pipe, mode, sessions, args.blocks)
                    rows.setdefault(key, {}).setdefault("split" if split else "one", []).append(r)
                    print(key, "split" if split else "one process", r, file=sys.stderr, flush=True)
                pipe.close()
    if args.json:
        print(json.dumps(rows))
        return 0
    print(
        f"{args.size}x{args.size}, {os.cpu_count()} cores; one process: torch on {args.threads} "
        f"threads; split: 1 thread in each of 3 processes; median of {args.rounds} rounds"
    )
    print(
        "| pipeline, mode, sessions | one process fps | split fps | split / one "
        "| one: VAE encode, decode ms | split: encode, transformer, decode ms |"
    )
    print("|---|---:|---:|---:|---|---|")
    for key, r in rows.items():
        one = statistics.median(x["fps"] for x in r["one"])
        two = statistics.median(x["fps"] for x in r["split"])
        a, b = r["one"][-1]["stage_ms"], r["split"][-1]["stage_ms"]
        print(
            f"| {key} | {one:.2f} | {two:.2f} | {two / one:.2f} | "
            f"{a.get('encode') or '–'}, {a.get('decode')} | "
            f"{b.get('encode') or '–'}, {b.get('transformer')}, {b.get('decode')} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--pipeline", choices=PIPELINES, action="append")
    parser.add_argument("--mode", choices=["text", "video"], action="append")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--vae-type",
        choices=["wan", "lightvae", "tae", "lighttae"],
        action="append",
        help="measure the model loop and its VAE with each of these (no system run)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="one process against the block loop split into stages (no system run)",
    )
    parser.add_argument("--sessions", type=int, action="append", help="with --split: 1, 2, …")
    parser.add_argument("--rounds", type=int, default=2, help="with --split")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="one process")
    args = parser.parse_args(argv)
    pipeline_ids = args.pipeline or list(PIPELINES)
    modes: list[p.Mode] = args.mode or ["text"]
    ensure_models(args.models, pipeline_ids)
    if args.vae_type:
        return compare_vaes(args, pipeline_ids, modes)
    if args.split:
        args.sessions = args.sessions or [1, 2]
        return compare_split(args, pipeline_ids, modes)
    results: dict[str, dict[str, Any]] = {}
    for pipeline_id, mode in itertools.product(pipeline_ids, modes):
        results[f"{pipeline_id} {mode}"] = {
            "model_loop": bench_model_loop(pipeline_id, args.models, args.size, args.blocks, mode),
            "system": bench_system(
                pipeline_id, args.models, args.size, args.seconds, args.warmup, mode
            ),
        }
    if args.json:
        print(json.dumps(results))
        return 0
    print(
        "| pipeline, mode | loop ms/block | loop fps | system ms/block | system fps "
        "| fps / loop | interval p50 ms | p99 ms | max ms | p99 / p50 | pacing p50 ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        loop, system = r["model_loop"], r["system"]
        ratio = system["interval_p99_ms"] / max(system["interval_p50_ms"], 1e-9)
        print(
            f"| {key} | {loop['block_ms']} | {loop['fps']} | {system['block_ms']} | "
            f"{system['fps']} | {system['fps'] / loop['fps']:.2f} | "
            f"{system['interval_p50_ms']} | {system['interval_p99_ms']} | "
            f"{system['interval_max_ms']} | {ratio:.2f} | {system['pacing_p50_ms']} |"
        )
    return 0


def compare_vaes(args: argparse.Namespace, pipeline_ids: list[str], modes: list[p.Mode]) -> int:
    """The model loop with each ``--vae-type``, one after the other for each pipeline and mode."""
    results: dict[str, dict[str, Any]] = {}
    for pipeline_id, mode in itertools.product(pipeline_ids, modes):
        for vae_type in args.vae_type:
            loop = bench_model_loop(
                pipeline_id, args.models, args.size, args.blocks, mode, vae_type
            )
            results[f"{pipeline_id} {mode} {vae_type}"] = loop
    if args.json:
        print(json.dumps(results))
        return 0
    config = args.models / "Wan-AI/Wan2.1-T2V-1.3B-Diffusers/vae/config.json"
    base_dim = json.loads(config.read_text()).get("base_dim") if config.is_file() else None
    print(
        f"Wan VAE of {args.models}: base_dim {base_dim} (Wan 2.1's is 96); {args.size}x{args.size}"
    )
    print(
        "| pipeline, mode | VAE | loop ms/block | loop fps | VAE encode ms/block "
        "| VAE decode ms/block | VAE share of the block |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        pipeline_id, name, vae_type = key.split()
        share = (r["encode_ms"] + r["decode_ms"]) / max(r["block_ms"], 1e-9)
        print(
            f"| {pipeline_id} {name} | {vae_type} | {r['block_ms']} | {r['fps']} | "
            f"{r['encode_ms'] or '–'} | {r['decode_ms']} | {100 * share:.0f} % |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
