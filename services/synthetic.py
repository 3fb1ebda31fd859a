"""A synthetic source and a verifying sink: exercise a chain without WebRTC.

``testsrc`` writes frames whose every byte is derived from the frame number; ``testsink``
checks each frame it receives against its number and counts good and corrupt ones. They run on
the same runtime and rings as the real stages, so tests of restarts and drops use them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from services import protocol as p
from services.runtime import Outbox, ServiceSpec
from services.stage import FrameStage, StageSession
from shm.ring import N_STAMPS, FrameMeta, ReadFrame, Stage, WriteSlot

logger = logging.getLogger(__name__)

DEFAULT_FPS = 30.0


def fill_frame(rgb: np.ndarray, frame_number: int) -> None:
    """Every byte = frame_number mod 251, except the first 8 bytes: the number itself."""
    flat = rgb.reshape(-1)
    flat[:] = frame_number % 251
    flat[:8] = np.frombuffer(frame_number.to_bytes(8, "little"), dtype=np.uint8)


def check_frame(rgb: np.ndarray) -> int | None:
    """The frame number a frame carries, or None when any byte disagrees with it."""
    flat = rgb.reshape(-1)
    number = int.from_bytes(flat[:8].tobytes(), "little")
    if not np.all(flat[8:] == number % 251):
        return None
    return number


@dataclass(slots=True)
class SourceState:
    next_number: int = 0


class TestSourceCore(FrameStage[SourceState]):
    """Generates ``fps`` frames a second into every session's output ring."""

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        if reason := spec.options.get("fail_on_start"):
            raise RuntimeError(str(reason))
        self.fps = float(spec.options.get("fps", DEFAULT_FPS))
        self._next_due = time.monotonic()

    def new_state(
        self, session: StageSession[SourceState], previous: SourceState | None
    ) -> SourceState:
        return SourceState()

    def tick(self) -> float | None:
        now = time.monotonic()
        if now < self._next_due:
            return self._next_due - now
        self._next_due = max(self._next_due + 1.0 / self.fps, now)
        for session in self.sessions.values():
            if session.output is None:
                continue
            number = session.state.next_number
            session.state.next_number = number + 1
            stamps = np.zeros(N_STAMPS, dtype=np.int64)
            stamps[Stage.SOURCE] = time.monotonic_ns()
            slot = session.output.begin(session.width, session.height)
            fill_frame(slot.array, number)
            self.publish(session, slot, FrameMeta(number, number, stamps))
        return max(0.0, self._next_due - time.monotonic())


class TestSinkCore(FrameStage[None]):
    """Consumes and verifies frames; ``frames_done`` counts intact ones. With the option
    ``report_to`` (a service name; benchmarks) it tells that inbox each frame's number and
    stamps as it takes it (``StageOutput(kind="log")``), and counts every frame: a model's
    frames carry no number to verify."""

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        self.corrupt = 0
        self.report_to: str | None = spec.options.get("report_to")

    def new_state(self, session: StageSession[None], previous: None) -> None:
        return None

    def step(self, session: StageSession[None], frame: ReadFrame, out: WriteSlot | None) -> Checked:
        if self.report_to is not None:
            data = {
                "frame_number": frame.frame_number,
                "taken_ns": time.monotonic_ns(),
                "stamps": [int(v) for v in frame.stamps],
            }
            self.outbox.send(
                self.report_to, p.StageOutput(session.session_id, self.spec.name, "log", data)
            )
            return Checked(frame.frame_number, frame.frame_number)
        return Checked(frame.frame_number, check_frame(frame.array))

    def commit(self, session: StageSession[None], outcome: Checked, out: WriteSlot | None) -> None:
        if outcome.carried != outcome.frame_number:
            self.corrupt += 1
            logger.error("session %s: corrupt frame %d", session.session_id, outcome.frame_number)
            return
        self.count_done(session)


@dataclass(slots=True, frozen=True)
class Checked:
    frame_number: int
    #: The number the frame's bytes carry; None when they disagree with each other.
    carried: int | None
