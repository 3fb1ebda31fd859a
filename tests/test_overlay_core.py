"""OverlayCore in one process: real rings, a fake outbox, the stand-in model."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from overlay_stand_in import StandInMoondream, frame_number_of

from services import protocol as p
from services.overlay.core import CLIENT_SERVICE, OverlayCore
from services.runtime import ServiceSpec
from services.synthetic import fill_frame
from services.topology import Kind
from shm.ring import (
    N_STAMPS,
    FrameMeta,
    FrameRing,
    RingConsumer,
    RingProducer,
    Stage,
    segments_of_run,
)

pytestmark = pytest.mark.timeout(30)

W, H = 128, 96
SESSION = "s1"
IDLE_TIMEOUT_S = 10.0


class FakeOutbox:
    """Captures what the core sends, per destination."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, p.InboxMessage]] = []
        self.dropped = 0

    def send(self, service: str, message: p.InboxMessage) -> bool:
        self.sent.append((service, message))
        return True

    def outputs(self, kind: str) -> list[p.StageOutput]:
        return [
            m
            for service, m in self.sent
            if service == CLIENT_SERVICE and isinstance(m, p.StageOutput) and m.kind == kind
        ]

    def frame_ready(self) -> list[p.FrameReady]:
        return [m for _, m in self.sent if isinstance(m, p.FrameReady)]


class Harness:
    """testsrc → overlay → a consumer, driven by hand."""

    def __init__(self, run_id: str, model: StandInMoondream, **options: Any) -> None:
        self.model = model
        self.outbox = FakeOutbox()
        spec = ServiceSpec(
            name="overlay", kind=Kind.OVERLAY, run_dir="/nonexistent", run_id=run_id,
            supervisor_pid=0, options=options,
        )  # fmt: skip
        self.core = OverlayCore(spec, self.outbox, model=model)
        self.in_ring = FrameRing.create(run_id, "in", 4, W * H * 3)
        self.out_ring = FrameRing.create(run_id, "out", 4, W * H * 3)
        self.producer = RingProducer(self.in_ring)
        self.consumer = RingConsumer(self.out_ring)
        self.number = 0

    def start(self, **params: Any) -> None:
        self.core.start_session(
            p.StartSession(
                session_id=SESSION, width=W, height=H, input_ring=self.in_ring.name,
                output_ring=self.out_ring.name, downstream="encode", params=params,
            )
        )  # fmt: skip

    def push(self, rgb: np.ndarray | None = None) -> int:
        """Publish the next frame and let the core handle it; returns its number."""
        number = self.number
        self.number += 1
        if rgb is None:
            rgb = np.empty((H, W, 3), np.uint8)
            fill_frame(rgb, number)
        else:
            rgb = rgb.copy()
            rgb.reshape(-1)[:8] = np.frombuffer(number.to_bytes(8, "little"), np.uint8)
        stamps = np.zeros(N_STAMPS, np.int64)
        seq = self.producer.write(rgb, FrameMeta(number, number, stamps))
        self.core.handle(p.FrameReady(session_id=SESSION, ring=self.in_ring.name, seq=seq))
        return number

    def settle(self) -> None:
        """Wait for the model to finish what it was given, then let the core collect it."""
        assert self.core.runner.wait_idle(IDLE_TIMEOUT_S)
        self.core.tick()

    def latest_output(self) -> tuple[int, np.ndarray, np.ndarray]:
        frame = self.consumer.acquire_latest()
        assert frame is not None, "no output frame"
        out = (frame.frame_number, frame.array.copy(), frame.stamps.copy())
        assert self.consumer.release(frame)
        return out

    def update(self, **params: Any) -> None:
        self.core.handle(p.UpdateParameters(session_id=SESSION, params=params))

    def close(self) -> None:
        if self.model.gate is not None:
            self.model.gate.set()
        self.core.end_session(SESSION)
        self.core.close()
        for ring in (self.in_ring, self.out_ring):
            ring.close()
            ring.unlink()


@pytest.fixture
def run_id() -> Iterator[str]:
    rid = "t" + secrets.token_hex(4)
    yield rid
    for seg in segments_of_run(rid):
        seg.unlink()


@pytest.fixture
def make(run_id: str) -> Iterator[Any]:
    harnesses: list[Harness] = []

    def make(model: StandInMoondream | None = None, **options: Any) -> Harness:
        h = Harness(run_id, model or StandInMoondream(), **options)
        harnesses.append(h)
        return h

    yield make
    for h in harnesses:
        h.close()


def gray(value: int = 128) -> np.ndarray:
    return np.full((H, W, 3), value, np.uint8)


def test_interval_schedule_and_feature_change_forces_a_call(make: Any) -> None:
    h = make()
    h.start(feature="detect", inference_interval=3)
    for _ in range(10):
        h.push()
        h.settle()
    assert h.model.frames == [0, 3, 6, 9]
    h.update(feature="caption")
    h.push()  # frame 10: forced by the feature change
    h.settle()
    h.push()  # 11: cached
    h.settle()
    h.push()  # 12: on schedule
    h.settle()
    assert h.model.frames == [0, 3, 6, 9, 10, 12]
    assert [m for m, _, _ in h.model.calls][-2:] == ["caption", "caption"]
    h.update(detect_object="cat")  # not used by caption: no forced call
    h.push()
    h.settle()
    assert h.model.frames[-1] == 12
    h.update(feature="point")
    h.push()  # 14: forced
    h.settle()
    h.update(detect_object="dog")
    h.push()  # 15: forced by the object change (and on schedule anyway)
    h.update(question="what?", temperature=0.9)  # point ignores both
    h.push()
    h.settle()
    assert h.model.frames[-2:] == [14, 15]


def test_settings_reach_the_model_as_in_the_reference(make: Any) -> None:
    h = make()
    h.start(
        feature="caption", temperature=0.25, max_objects=1, caption_length="short", max_tokens=20
    )
    h.push()
    h.settle()
    h.update(feature="detect")
    h.push()
    h.settle()
    caption, detect = h.model.calls
    # Every key Moondream's code reads, "variant" included (it reads that one unguarded).
    assert caption[0] == "caption"
    assert caption[2] == {"temperature": 0.25, "top_p": 0.3, "max_tokens": 20, "variant": None}
    assert detect[0] == "detect" and detect[2] == {"max_objects": 1, "variant": None}
    (fetch,) = h.outbox.outputs("fetch_output")[-1:]
    assert fetch.data["result"]["objects"] == [
        {"x_min": 0.25, "y_min": 0.25, "x_max": 0.75, "y_max": 0.75}
    ]


def test_every_frame_goes_out_at_once_while_the_model_is_busy(make: Any) -> None:
    model = StandInMoondream()
    model.gate = threading.Event()  # the model takes as long as the test wants
    h = make(model)
    h.start(feature="detect", inference_interval=1)
    for _ in range(60):
        h.push()
        if h.number == 1:
            assert model.started.wait(IDLE_TIMEOUT_S)  # frame 0 is in the model
        number, _, stamps = h.latest_output()
        assert number == h.number - 1  # this very frame was published
        assert stamps[Stage.OVERLAY_END] >= stamps[Stage.OVERLAY_START] > 0
    assert len(h.outbox.frame_ready()) == 60
    assert h.core.frames_done == 60
    # One call in flight, the newest frame waiting (59 replaced the ones before it).
    assert model.frames == [0]
    assert h.core.runner.replaced == 58
    model.gate.set()
    h.settle()
    assert model.frames == [0, 59]
    results = h.outbox.outputs("fetch_output")
    assert [m.data["frame"] for m in results] == [0, 59]


def test_fetch_output_messages(make: Any) -> None:
    h = make()
    h.start(feature="query", question="How many people are there?")
    h.push()
    h.settle()
    h.update(feature="point", max_objects=1)
    h.push()
    h.settle()
    first, second = h.outbox.outputs("fetch_output")
    assert first == p.StageOutput(
        session_id=SESSION,
        service="overlay",
        kind="fetch_output",
        data={
            "feature": "query",
            "frame": 0,
            "result": {
                "question": "How many people are there?",
                "answer": "Frame 0 answers: How many people are there?",
            },
        },
    )
    assert second.data == {
        "feature": "point",
        "frame": 1,
        "result": {"object": "person", "points": [{"x": 0.5, "y": 0.5}]},
    }
    # The message survives the inbox codec (msgpack) unchanged.
    codec = p.inbox_codec()
    assert codec.decode(codec.encode(second)) == second


def test_result_of_another_feature_is_never_drawn_or_sent(make: Any) -> None:
    model = StandInMoondream()
    model.gate = threading.Event()
    h = make(model)
    h.start(feature="detect")
    h.push(gray())
    assert model.started.wait(IDLE_TIMEOUT_S)
    h.update(feature="caption")  # while detect runs
    model.gate.set()
    h.settle()
    assert h.outbox.outputs("fetch_output") == []  # the detect result was discarded
    _, out, _ = h.latest_output()
    assert not (out[H // 4, W // 4 : 3 * W // 4] == (0, 220, 0)).all(axis=-1).any()
    h.push(gray())  # caption was forced on this frame
    h.settle()
    (fetch,) = h.outbox.outputs("fetch_output")
    assert fetch.data["feature"] == "caption"


def test_model_error_goes_to_the_client_and_video_continues_unannotated(make: Any) -> None:
    model = StandInMoondream()
    h = make(model)
    h.start(feature="detect", inference_interval=2)
    h.push(gray())
    h.settle()
    h.push(gray())
    _, annotated, _ = h.latest_output()
    assert (annotated != 128).any()
    model.fail = "CUDA out of memory"
    h.push(gray())  # frame 2 goes to the model (and is drawn with frame 0's result)
    h.settle()
    for _ in range(5):
        h.push(gray())
        h.settle()
        _, out, _ = h.latest_output()
        assert (out.reshape(-1)[8:] == 128).all()  # unannotated, still flowing
    errors = h.outbox.outputs("error")
    assert len(errors) == 1  # the same failure is reported once
    assert errors[0].session_id == SESSION
    assert errors[0].data == "moondream detect failed: RuntimeError: CUDA out of memory"
    assert h.core.frames_done == 8
    model.fail = None
    h.push(gray())
    h.settle()
    h.push(gray())
    _, out, _ = h.latest_output()
    assert (out != 128).any()  # annotated again


def test_results_older_than_the_bound_are_dropped(make: Any) -> None:
    h = make(max_result_age_s=2.0)
    now = [1000.0]
    h.core.clock = lambda: now[0]
    h.start(feature="detect", inference_interval=30)
    h.push(gray())
    h.settle()
    now[0] += 1.9
    h.push(gray())
    _, out, _ = h.latest_output()
    assert (out != 128).any()  # 1.9 s old: drawn
    now[0] += 0.2
    h.push(gray())
    _, out, _ = h.latest_output()
    assert (out.reshape(-1)[8:] == 128).all()  # 2.1 s old: dropped
    assert h.core.sessions[SESSION].state.stale_dropped == 1


def test_bad_parameter_update_changes_nothing_and_says_why(make: Any) -> None:
    h = make()
    h.start(feature="detect")
    h.update(temperature=7, feature="caption")
    (error,) = h.outbox.outputs("error")
    assert "temperature" in error.data
    assert h.core.sessions[SESSION].state.config.feature.value == "detect"
    h.update(prompts=[{"text": "x"}], overlay_opacity=0.5)  # other pipelines' keys ignored
    assert h.core.sessions[SESSION].state.config.overlay_opacity == 0.5


def test_stage_output_frame_is_the_frame_the_model_saw(make: Any) -> None:
    model = StandInMoondream()
    h = make(model)
    h.start(feature="caption", caption_length="long")
    h.push()
    h.push()
    h.settle()
    results = h.outbox.outputs("fetch_output")
    for message in results:
        number = message.data["frame"]
        assert message.data["result"]["caption"] == f"A long caption of frame {number}."
    assert frame_number_of(np.zeros(8, np.uint8)) == 0
