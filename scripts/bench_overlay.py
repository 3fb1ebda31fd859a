"""Benchmark the overlay: drawing cost per frame, and output fps with a slow model.

    python scripts/bench_overlay.py                  # both parts
    python scripts/bench_overlay.py --seconds 5 --model-delay-ms 200 --fps 30

1. **draw**: per feature and frame size, the cost of drawing a result on one frame (the per-frame
   work: alpha blends over the affected regions) and of laying out a new result (once per
   result: wrapping, text rendering).
2. **fps**: an :class:`OverlayCore` between two real rings, fed at ``--fps`` for ``--seconds``,
   with a model taking ``--model-delay-ms`` per call on every frame (``inference_interval =
   1``): the output fps should equal the input fps. Three stand-ins (``--models``): ``sleep``
   (waits, costs nothing), ``numpy`` (matrix products for that long: competes for the CPU and,
   like torch, releases the interpreter lock while it computes) and ``python`` (a pure-Python
   loop for that long: holds the interpreter lock, the worst case for the video thread), and
   ``moondream``: Moondream 2's own code with tiny random weights
   (``scripts/make_tiny_moondream.py``, built in a temporary directory unless
   ``--moondream-models DIR`` has one), detect on every frame.
3. **latency**: per feature and frame size, one call of the tiny real Moondream through
   ``run_feature`` (what the overlay's model thread does), median and p95.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from services import protocol as p
from services.overlay.config import MoondreamFeature
from services.overlay.core import OverlayCore
from services.overlay.draw import build_plan
from services.overlay.model import FeatureRequest, VisionModel, load_moondream, run_feature
from services.runtime import ServiceSpec
from services.topology import Kind
from shm.ring import N_STAMPS, FrameMeta, FrameRing, RingConsumer, RingProducer

SIZES = [(512, 512), (1280, 720)]
RESULTS: dict[MoondreamFeature, dict[str, Any]] = {
    MoondreamFeature.CAPTION: {
        "caption": "A person sitting at a desk working on a laptop, with a mug of coffee and a "
        "stack of notebooks beside them, in a room lit by a window on the left."
    },
    MoondreamFeature.QUERY: {
        "question": "How many people are there?",
        "answer": "There are three people in the image.",
    },
    MoondreamFeature.DETECT: {
        "objects": [
            {"x_min": 0.12, "y_min": 0.08, "x_max": 0.45, "y_max": 0.92},
            {"x_min": 0.55, "y_min": 0.15, "x_max": 0.78, "y_max": 0.85},
        ]
    },
    MoondreamFeature.POINT: {"points": [{"x": 0.28, "y": 0.50}, {"x": 0.66, "y": 0.48}]},
}


def ms(samples: list[float]) -> str:
    samples = sorted(samples)
    p95 = samples[int(len(samples) * 0.95) - 1]
    return f"median {statistics.median(samples) * 1e3:6.3f} ms  p95 {p95 * 1e3:6.3f} ms"


def bench_draw(repeats: int) -> None:
    print(f"draw + blend per frame (warm layout), {repeats} frames each; layout once per result")
    rng = np.random.default_rng(0)
    for width, height in SIZES:
        base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for feature, result in RESULTS.items():
            build_plan(feature, result, width, height, 0.8, 1.0)  # warm fonts and caches
            layouts = []
            for i in range(20):
                fresh = {k: (f"{v} {i}" if isinstance(v, str) else v) for k, v in result.items()}
                started = time.perf_counter()
                plan = build_plan(feature, fresh, width, height, 0.8, 1.0)
                layouts.append(time.perf_counter() - started)
            frame = base.copy()
            draws = []
            for _ in range(repeats):
                np.copyto(frame, base)
                started = time.perf_counter()
                plan.draw(frame)
                draws.append(time.perf_counter() - started)
            print(
                f"  {width:4d}x{height:<4d} {feature.value:8s} draw {ms(draws)}   "
                f"layout {ms(layouts)}"
            )


class StandInModel:
    """Moondream's four methods, each taking ``delay_s`` of the ``kind`` of work named."""

    def __init__(self, delay_s: float, kind: str = "sleep") -> None:
        self.delay_s = delay_s
        self.kind = kind
        self.calls = 0
        self._a = np.random.default_rng(0).standard_normal((256, 256), dtype=np.float32)

    def _wait(self) -> None:
        self.calls += 1
        end = time.perf_counter() + self.delay_s
        if self.kind == "sleep":
            time.sleep(self.delay_s)
        elif self.kind == "numpy":
            while time.perf_counter() < end:
                self._a = np.tanh(self._a @ self._a)
        else:
            x = 0
            while time.perf_counter() < end:
                for i in range(1000):
                    x += i * i

    def caption(self, image: Any, length: str = "normal", settings: Any = None) -> dict[str, Any]:
        self._wait()
        return {"caption": "a caption"}

    def query(self, image: Any, question: str, settings: Any = None) -> dict[str, Any]:
        self._wait()
        return {"answer": "an answer"}

    def detect(self, image: Any, object: str, settings: Any = None) -> dict[str, Any]:
        self._wait()
        return {"objects": RESULTS[MoondreamFeature.DETECT]["objects"]}

    def point(self, image: Any, object: str, settings: Any = None) -> dict[str, Any]:
        self._wait()
        return {"points": RESULTS[MoondreamFeature.POINT]["points"]}


class TimedModel:
    """A model whose calls are counted and timed (the real Moondream, here)."""

    def __init__(self, model: VisionModel) -> None:
        self.model = model
        self.calls = 0
        self.seconds = 0.0

    def _timed(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            result: dict[str, Any] = getattr(self.model, method)(*args, **kwargs)
            return result
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - started

    def caption(self, image: Any, length: str = "normal", settings: Any = None) -> dict[str, Any]:
        return self._timed("caption", image, length=length, settings=settings)

    def query(self, image: Any, question: str, settings: Any = None) -> dict[str, Any]:
        return self._timed("query", image, question=question, settings=settings)

    def detect(self, image: Any, object: str, settings: Any = None) -> dict[str, Any]:
        return self._timed("detect", image, object=object, settings=settings)

    def point(self, image: Any, object: str, settings: Any = None) -> dict[str, Any]:
        return self._timed("point", image, object=object, settings=settings)


def tiny_moondream(models_dir: Path | None) -> VisionModel:
    if models_dir is None:
        import make_tiny_moondream

        models_dir = Path(tempfile.mkdtemp(prefix="tiny-moondream-"))
        make_tiny_moondream.make_moondream(models_dir, make_tiny_moondream.DEFAULT_CODE)
    return load_moondream(models_dir)


def bench_latency(model: VisionModel, repeats: int, max_tokens: int) -> None:
    print(
        f"\ntiny real Moondream, one call per feature ({repeats} calls each, max_tokens "
        f"{max_tokens}, max_objects 10, torch threads {torch_threads()})\n"
    )
    print("| feature | size | median ms | p95 ms |")
    print("|---|---|---:|---:|")
    rng = np.random.default_rng(2)
    for width, height in SIZES:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        for feature in MoondreamFeature:
            request = FeatureRequest(
                feature, "normal", "What is this?", "person", 0.5, 10, max_tokens
            )
            run_feature(model, request, rgb)  # warm
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                run_feature(model, request, rgb)
                times.append(time.perf_counter() - started)
            times.sort()
            print(
                f"| {feature.value} | {width}x{height} | {statistics.median(times) * 1e3:.0f} | "
                f"{times[int(len(times) * 0.95) - 1] * 1e3:.0f} |"
            )


def torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


class CountingOutbox:
    def __init__(self) -> None:
        self.frames = 0
        self.results = 0

    def send(self, service: str, message: p.InboxMessage) -> bool:
        if isinstance(message, p.FrameReady):
            self.frames += 1
        elif isinstance(message, p.StageOutput) and message.kind == "fetch_output":
            self.results += 1
        return True


def bench_fps(
    seconds: float,
    fps: float,
    delay_s: float,
    width: int,
    height: int,
    kind: str,
    real: VisionModel | None = None,
) -> None:
    run_id = "bench" + secrets.token_hex(3)
    rings = [FrameRing.create(run_id, name, 4, width * height * 3) for name in ("in", "out")]
    model: StandInModel | TimedModel = (
        TimedModel(real) if real is not None else StandInModel(delay_s, kind)
    )
    cpu_started = time.process_time()
    outbox = CountingOutbox()
    spec = ServiceSpec("overlay", Kind.OVERLAY, "/nonexistent", run_id, 0)
    core = OverlayCore(spec, outbox, model=model)
    try:
        core.start_session(
            p.StartSession(
                session_id="bench", width=width, height=height, input_ring=rings[0].name,
                output_ring=rings[1].name, downstream="encode",
                params={"feature": "detect", "inference_interval": 1},
            )
        )  # fmt: skip
        producer, consumer = RingProducer(rings[0]), RingConsumer(rings[1])
        frame = np.random.default_rng(1).integers(0, 256, (height, width, 3), dtype=np.uint8)
        stamps = np.zeros(N_STAMPS, np.int64)
        period = 1.0 / fps
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < seconds:
            seq = producer.write(frame, FrameMeta(n, n, stamps))
            core.handle(p.FrameReady(session_id="bench", ring=rings[0].name, seq=seq))
            while consumer.acquire_latest() is not None:
                pass
            n += 1
            core.tick()
            time.sleep(max(0.0, started + n * period - time.monotonic()))
        elapsed = time.monotonic() - started
        core.runner.wait_idle(5 * delay_s + 5)
        core.tick()
        cpu = (time.process_time() - cpu_started) / elapsed * 100
        if isinstance(model, TimedModel):
            delay_s = model.seconds / max(1, model.calls)  # measured
        print(
            f"| {kind} | {delay_s * 1e3:.0f} | {width}x{height} | {n / elapsed:.1f} | "
            f"{outbox.frames / elapsed:.1f} | {model.calls} | {outbox.results} | "
            f"{core.runner.replaced} | {cpu:.0f} |"
        )
    finally:
        core.end_session("bench")
        core.close()
        for ring in rings:
            ring.close()
            ring.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["draw", "fps", "latency", "all"], default="all")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--model-delay-ms", type=float, default=200.0)
    parser.add_argument(
        "--models",
        default="sleep,numpy,python,moondream",
        help="models for the fps part: the stand-ins sleep, numpy, python; moondream (tiny, real)",
    )
    parser.add_argument("--moondream-models", type=Path, help="a models dir with tiny Moondream")
    parser.add_argument("--max-tokens", type=int, default=32, help="caption/query budget")
    args = parser.parse_args()
    real: VisionModel | None = None
    if args.part in ("latency", "all") or "moondream" in args.models.split(","):
        real = tiny_moondream(args.moondream_models)
    if args.part in ("draw", "all"):
        bench_draw(args.repeats)
    if args.part in ("fps", "all"):
        print(
            "| model | ms/call | size | input fps | output fps | model calls | results sent "
            "| frames replaced | CPU % (this process) |"
        )
        print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
        for kind in args.models.split(","):
            bench_fps(
                args.seconds,
                args.fps,
                args.model_delay_ms / 1e3,
                512,
                512,
                kind,
                real if kind == "moondream" else None,
            )
    if args.part in ("latency", "all") and real is not None:
        bench_latency(real, args.repeats // 30 or 1, args.max_tokens)
    return 0


if __name__ == "__main__":
    sys.exit(main())
