#!/usr/bin/env python3
"""Per-block latency and frames/s of the causal Wan pipelines: the pipeline object in-process
(the model loop) against the whole system (``supervisor start``, the inference process, rings),
in one run.

    python scripts/bench_wan.py --models /tmp/wan --size 64 [--pipeline ID] [--json]
    python scripts/bench_inference.py --pipeline longlive --models /tmp/wan   # the same

``--models DIR`` without the checkpoints gets the tiny random ones (``make_tiny_wan.py``).

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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services import protocol as p  # noqa: E402
from services.inference import registry  # noqa: E402
from services.inference.pipeline import Request  # noqa: E402
from supervisor.client import AdminClient, find_run_dirs  # noqa: E402

PIPELINES = ("streamdiffusionv2", "longlive", "krea-realtime-video")


def bench_model_loop(pipeline_id: str, models: Path, size: int, blocks: int) -> dict[str, float]:
    """The pipeline object alone: one text session, called until ``blocks`` blocks of frames
    came back. A call while the next block is still being made (ahead, off the calling thread)
    yields no frame; the loop then waits a millisecond, as a host with nothing else to do."""
    spec = registry.get(pipeline_id)
    load = registry.full_config(spec, {"height": size, "width": size})
    pipe = spec.load(load, models)
    config = registry.full_config(spec, {"height": size, "width": size})
    state = pipe.new_session("bench", size, size, config)

    def next_frame() -> None:
        while not any(r.frame is not None for r in pipe([Request("bench", state, None, None)])):
            time.sleep(0.001)

    for _ in range(2 * spec.frames_per_call + 1):  # the first block (and one made ahead)
        next_frame()
    frames = blocks * spec.frames_per_call
    start = time.perf_counter()
    for _ in range(frames):
        next_frame()
    total = time.perf_counter() - start
    pipe.end_session(state)
    return {"block_ms": round(1e3 * total / blocks, 1), "fps": round(frames / total, 2)}


def bench_system(pipeline_id: str, models: Path, size: int, seconds: float) -> dict[str, float]:
    """The pipeline in its inference process under ``supervisor start``, a text session into a
    ring read by ``testsink``. ms/block is measured: the service tells this process (its
    ``notify`` inbox) each block's first frame as it publishes it, and the intervals between
    those arrivals are the blocks' time in the system."""
    import msgspec
    import zmq

    from services.runtime import inbox_endpoint

    base = Path(tempfile.mkdtemp(prefix="dwbw", dir="/tmp"))
    name = f"inference/{pipeline_id}"
    (base / "bench.toml").write_text(
        "signalling = false\nmedia = false\npipelines = []\n"
        f'[[services]]\nname = "{name}"\nkind = "inference"\n'
        f'[services.options]\npipeline = "{pipeline_id}"\nmodels_dir = "{models}"\n'
        'notify = "bench"\n'
        f"[services.options.load_params]\nheight = {size}\nwidth = {size}\n"
        '[[services]]\nname = "testsink"\nkind = "testsink"\n'
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
        opened = admin.request(
            p.OpenSession(
                session_id="bench", stages=[name, "testsink"], width=size, height=size, mode="text"
            )
        )
        assert isinstance(opened, p.SessionOpened), opened
        _wait(lambda: _service(admin, name).frames_done > 0, 300)
        first = _service(admin, name).frames_done
        start = time.monotonic()
        arrivals: list[tuple[float, int]] = []
        while (now := time.monotonic()) - start < seconds:
            if inbox.poll(100):
                message = decoder.decode(inbox.recv())
                if message.kind == "fetch_output" and "block" in message.data:
                    arrivals.append((now, int(message.data["block"])))
        done = _service(admin, name).frames_done - first
        elapsed = time.monotonic() - start
        fps = done / elapsed
        gaps = [
            (t1 - t0) / (b1 - b0) for (t0, b0), (t1, b1) in itertools.pairwise(arrivals) if b1 > b0
        ]
        block_ms = 1e3 * statistics.median(gaps) if gaps else 0.0
        return {"fps": round(fps, 2), "block_ms": round(block_ms, 1), "blocks": len(gaps)}
    finally:
        inbox.close()
        ctx.term()
        proc.terminate()
        proc.wait(30)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--pipeline", choices=PIPELINES, action="append")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    pipeline_ids = args.pipeline or list(PIPELINES)
    ensure_models(args.models, pipeline_ids)
    results = {}
    for pipeline_id in pipeline_ids:
        results[pipeline_id] = {
            "model_loop": bench_model_loop(pipeline_id, args.models, args.size, args.blocks),
            "system": bench_system(pipeline_id, args.models, args.size, args.seconds),
        }
    if args.json:
        print(json.dumps(results))
        return 0
    print(
        f"{'pipeline':<22} {'loop ms/block':>14} {'loop fps':>9} {'system ms/block':>16} "
        f"{'system fps':>11}"
    )
    for pid, r in results.items():
        loop, system = r["model_loop"], r["system"]
        print(
            f"{pid:<22} {loop['block_ms']:>14} {loop['fps']:>9} {system['block_ms']:>16} "
            f"{system['fps']:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
