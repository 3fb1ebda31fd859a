"""Ring plumbing shared by every stage: per-session rings, latest-frame-wins processing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services import protocol as p
from services.runtime import Outbox, ServiceCore, ServiceSpec
from shm.ring import FrameMeta, FrameRing, RingConsumer, RingProducer, WriteSlot

logger = logging.getLogger(__name__)


@dataclass
class StageSession:
    """One session as a stage sees it: where frames come from and go to."""

    session_id: str
    width: int
    height: int
    params: dict[str, Any]
    downstream: str | None
    mode: str = "video"
    codec: str = "VP8"
    input: RingConsumer | None = None
    output: RingProducer | None = None
    frames_done: int = 0
    state: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.input is not None:
            self.input.ring.close()
        if self.output is not None:
            self.output.ring.close()


class RingStage(ServiceCore):
    """A stage that keeps per-session rings; subclasses say what to do with a frame."""

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        self.sessions: dict[str, StageSession] = {}

    def start_session(self, msg: p.StartSession) -> None:
        old = self.sessions.pop(msg.session_id, None)
        if old is not None:
            old.close()
        session = StageSession(
            session_id=msg.session_id,
            width=msg.width,
            height=msg.height,
            params=dict(msg.params),
            downstream=msg.downstream,
            mode=msg.mode,
            codec=msg.codec,
        )
        try:
            if msg.input_ring:
                session.input = RingConsumer(FrameRing.attach(msg.input_ring))
            if msg.output_ring:
                session.output = RingProducer(FrameRing.attach(msg.output_ring))
        except Exception:
            session.close()
            raise
        self.sessions[msg.session_id] = session
        self.on_session_started(session)
        logger.info("session %s started (%dx%d)", msg.session_id, msg.width, msg.height)

    def on_session_started(self, session: StageSession) -> None:
        """Hook for per-session state (codec contexts, caches)."""

    def end_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.on_session_ended(session)
            session.close()
            logger.info("session %s ended", session_id)

    def on_session_ended(self, session: StageSession) -> None:
        """Hook to free per-session state."""

    def session_count(self) -> int:
        return len(self.sessions)

    def frames_waiting(self) -> int:
        return sum(1 for s in self.sessions.values() if s.input is not None and s.input.has_new())

    def handle(self, msg: p.InboxMessage) -> None:
        match msg:
            case p.FrameReady(session_id=session_id):
                session = self._session(session_id)
                if session.input is None:  # a source stage, or a session of text mode
                    raise ValueError(f"session {session_id!r} has no input ring here")
                self.drain(session)
            case p.UpdateParameters(session_id=session_id, params=params):
                session = self._session(session_id)
                session.params.update(params)
                self.on_parameters(session, params)
            case _:
                self.handle_other(msg)

    def _session(self, session_id: str) -> StageSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise KeyError(f"unknown session {session_id!r}")
        return session

    def on_parameters(self, session: StageSession, changed: dict[str, Any]) -> None:
        """Hook: some runtime parameters changed (already merged into ``session.params``)."""

    def handle_other(self, msg: p.InboxMessage) -> None:
        raise ValueError(f"{self.spec.name} does not take {type(msg).__name__}")

    def drain(self, session: StageSession) -> None:
        """Process the newest waiting frame (older ones are skipped by the ring).

        The output slot is filled before the input slot is released, and published only if
        the input was intact, so a torn input never leaves the stage.
        """
        assert session.input is not None
        frame = session.input.acquire_latest()
        if frame is None:
            return
        try:
            out = self.process(session, frame.array, frame.frame_number, frame.pts, frame.stamps)
        except BaseException:
            session.input.release(frame)
            raise
        if out is None:
            session.input.release(frame)
            return
        rgb, frame_number, pts, stamps = out
        assert session.output is not None
        slot = session.output.begin(rgb.shape[1], rgb.shape[0])
        np.copyto(slot.array, rgb, casting="no")
        if not session.input.release(frame):
            logger.debug("session %s: frame %d torn, discarded", session.session_id, frame.seq)
            return
        self.publish(session, slot, FrameMeta(frame_number, pts, stamps))

    def process(
        self,
        session: StageSession,
        rgb: np.ndarray,
        frame_number: int,
        pts: int,
        stamps: np.ndarray,
    ) -> tuple[np.ndarray, int, int, np.ndarray] | None:
        """Turn one input frame into (output rgb, frame_number, pts, stamps), or None."""
        raise NotImplementedError

    def publish(self, session: StageSession, slot: WriteSlot, meta: FrameMeta) -> None:
        """Publish a filled output slot and notify downstream."""
        assert session.output is not None
        seq = session.output.publish(slot, meta)
        session.frames_done += 1
        self.frames_done += 1
        if session.downstream:
            self.outbox.send(
                session.downstream,
                p.FrameReady(session_id=session.session_id, ring=session.output.ring.name, seq=seq),
            )
