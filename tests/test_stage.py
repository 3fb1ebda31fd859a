"""The stage template: fill → release → commit only if the input was intact; typed state."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from services import protocol as p
from services.runtime import ServiceSpec
from services.stage import FrameStage, StageSession
from services.topology import Kind
from shm.ring import (
    N_STAMPS,
    FrameMeta,
    FrameRing,
    ReadFrame,
    RingConsumer,
    RingProducer,
    WriteSlot,
    segments_of_run,
)

pytestmark = pytest.mark.timeout(60)

W, H = 16, 8


class RecordingOutbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, p.InboxMessage]] = []

    def send(self, service: str, message: p.InboxMessage) -> bool:
        self.sent.append((service, message))
        return True


@dataclass
class Counter:
    generation: int
    steps: int = 0
    ended: bool = False


class Invert(FrameStage[Counter]):
    """out = 255 - in; ``tear`` makes a rogue producer overwrite the held input mid-step."""

    def __init__(self, spec: ServiceSpec, outbox: Any) -> None:
        super().__init__(spec, outbox)
        self.tear: RingProducer | None = None
        self.fail = False
        self.torn: list[Any] = []
        self.rings = ("", "")

    def new_state(self, session: StageSession[Counter], previous: Counter | None) -> Counter:
        if session.params.get("refuse"):
            raise ValueError("refuse: this session is refused")
        return Counter(generation=0 if previous is None else previous.generation + 1)

    def end_state(self, session: StageSession[Counter]) -> None:
        session.state.ended = True

    def step(self, session: StageSession[Counter], frame: ReadFrame, out: WriteSlot | None) -> Any:
        assert out is not None
        session.state.steps += 1
        if self.fail:
            raise RuntimeError("model failed")
        np.subtract(255, frame.array, out=out.array)
        if self.tear is not None:  # a producer that ignores the consumer's hold
            ring = self.tear.ring
            ring.header[16] = -1
            self.tear._next = frame.index
            self.tear.write(np.zeros((H, W, 3), np.uint8), FrameMeta(999))
        return FrameMeta(frame.frame_number, frame.pts, frame.stamps)

    def on_torn(self, session: StageSession[Counter], outcome: Any) -> None:
        self.torn.append(outcome)


@pytest.fixture
def chain() -> Iterator[tuple[Invert, RingProducer, RingConsumer, RecordingOutbox]]:
    run_id = "st" + secrets.token_hex(4)
    src = FrameRing.create(run_id, "in", 3, W * H * 3)
    dst = FrameRing.create(run_id, "out", 3, W * H * 3)
    outbox = RecordingOutbox()
    spec = ServiceSpec(
        name="invert", kind=Kind.TESTSINK, run_dir="/nonexistent", run_id=run_id, supervisor_pid=0
    )
    stage = Invert(spec, outbox)
    stage.rings = (src.name, dst.name)
    stage.start_session(start(stage))
    yield stage, RingProducer(src), RingConsumer(dst), outbox
    stage.close()
    for name in list(stage.sessions):
        stage.end_session(name)
    for seg in segments_of_run(run_id):
        seg.unlink()


def start(stage: Invert, **params: Any) -> p.StartSession:
    return p.StartSession(
        session_id="s", width=W, height=H, params=params, downstream="next",
        input_ring=stage.rings[0], output_ring=stage.rings[1],
    )  # fmt: skip


def push(stage: Invert, producer: RingProducer, value: int, number: int) -> None:
    stamps = np.zeros(N_STAMPS, np.int64)
    seq = producer.write(np.full((H, W, 3), value, np.uint8), FrameMeta(number, number, stamps))
    stage.handle(p.FrameReady(session_id="s", ring=producer.ring.name, seq=seq))


def test_intact_frames_are_published_with_their_metadata(chain: Any) -> None:
    stage, producer, consumer, outbox = chain
    push(stage, producer, 10, number=7)
    frame = consumer.acquire_latest()
    assert frame is not None
    assert frame.frame_number == 7 and frame.pts == 7
    assert np.all(frame.array == 245)
    assert consumer.release(frame)
    (notice,) = [m for _, m in outbox.sent if isinstance(m, p.FrameReady)]
    assert notice.ring == consumer.ring.name and outbox.sent[0][0] == "next"


def test_a_torn_input_never_leaves_the_stage(chain: Any) -> None:
    stage, producer, consumer, outbox = chain
    stage.tear = RingProducer(FrameRing.attach(producer.ring.name))
    push(stage, producer, 10, number=1)
    assert consumer.acquire_latest() is None
    assert outbox.sent == []
    assert [m.frame_number for m in stage.torn] == [1]
    assert producer.ring.stats().torn == 1
    stage.tear.ring.close()
    stage.tear = None
    push(stage, producer, 20, number=2)  # the next intact frame goes through
    frame = consumer.acquire_latest()
    assert frame is not None and frame.frame_number == 2 and np.all(frame.array == 235)


def test_a_failing_step_releases_its_input(chain: Any) -> None:
    stage, producer, consumer, outbox = chain
    stage.fail = True
    with pytest.raises(RuntimeError, match="model failed"):
        push(stage, producer, 10, number=1)
    assert consumer.acquire_latest() is None and outbox.sent == []
    stage.fail = False
    for number in range(2, 6):  # the slot it held is free again: the ring keeps turning
        push(stage, producer, number, number=number)
    frame = consumer.acquire_latest()
    assert frame is not None and frame.frame_number == 5


def test_start_again_hands_over_the_state_and_a_refused_start_keeps_nothing(chain: Any) -> None:
    stage, _, _, _ = chain
    first = stage.sessions["s"].state
    stage.start_session(start(stage))
    assert first.ended and stage.sessions["s"].state.generation == 1
    stage.end_session("s")
    with pytest.raises(ValueError, match="refuse"):
        stage.start_session(start(stage, refuse=True))
    assert "s" not in stage.sessions


def test_each_service_decodes_only_its_own_inbox_messages() -> None:
    sender = p.inbox_codec()
    frame = sender.encode(p.FrameReady(session_id="s", ring="r", seq=1))
    packet = sender.encode(p.EncodedFrame("s", "VP8", b"\x00", 0, True, 0, 0))
    assert p.inbox_codec(p.EncodeInbox).decode(frame) == p.FrameReady("s", "r", 1)
    with pytest.raises(p.MessageRejected):
        p.inbox_codec(p.DecodeInbox).decode(frame)  # decode takes encoded frames only
    with pytest.raises(p.MessageRejected):
        p.inbox_codec(p.StageInbox).decode(packet)
    with pytest.raises(p.MessageRejected):
        p.inbox_codec(p.SignallingInbox).decode(frame)
