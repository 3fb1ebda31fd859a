"""The stage template: per-session rings and typed per-session state, latest frame wins.

A :class:`RingStage` owns the rule that keeps a torn frame from leaving a stage: take the
newest input frame, let :meth:`RingStage.step` fill the output slot from it, release the input,
and only if the input was intact :meth:`RingStage.commit` (publish the slot, send the packets).
Subclasses say what one frame becomes (``step``) and what a session keeps (``S``, made by
:meth:`RingStage.new_state`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, assert_never

from services import protocol as p
from services.runtime import M, Outbox, ServiceCore, ServiceSpec
from shm.ring import FrameMeta, FrameRing, ReadFrame, RingConsumer, RingProducer, WriteSlot

logger = logging.getLogger(__name__)

S = TypeVar("S")


@dataclass(eq=False)
class StageSession(Generic[S]):
    """One session as a stage sees it: where frames come from and go to, and ``state``, what
    this kind of stage keeps for it."""

    session_id: str
    width: int
    height: int
    params: dict[str, Any]
    downstream: str | None
    mode: p.Mode = "video"
    codec: p.VideoCodec = "VP8"
    input: RingConsumer | None = None
    output: RingProducer | None = None
    frames_done: int = 0
    state: S = field(init=False)

    def close(self) -> None:
        if self.input is not None:
            self.input.ring.close()
        if self.output is not None:
            self.output.ring.close()


class RingStage(ServiceCore[M], Generic[S, M]):
    """A stage that keeps per-session rings and a typed state ``S`` per session; it takes the
    inbox messages ``M``, each kind of stage matching them in its :meth:`handle`."""

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        self.sessions: dict[str, StageSession[S]] = {}

    # ------------------------------------------------------------ sessions

    def start_session(self, msg: p.StartSession) -> None:
        """Attach the session's rings and make its state; a StartSession for a session this
        stage has (a restart elsewhere in the chain) replaces it, handing over its state."""
        old = self.sessions.pop(msg.session_id, None)
        previous: S | None = None
        if old is not None:
            previous = old.state
            self.end_state(old)
            old.close()
        session: StageSession[S] = StageSession(
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
            session.state = self.new_state(session, previous)
        except Exception:
            session.close()
            raise
        self.sessions[msg.session_id] = session
        logger.info("session %s started (%dx%d)", msg.session_id, msg.width, msg.height)

    def new_state(self, session: StageSession[S], previous: S | None) -> S:
        """What this stage keeps for a new session (its rings are attached); ``previous`` is
        the state of the session it replaces, if any. Raising fails the session."""
        raise NotImplementedError

    def end_state(self, session: StageSession[S]) -> None:
        """Free what the session's state holds (codec contexts, caches)."""

    def end_session(self, session_id: str) -> None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.end_state(session)
            session.close()
            logger.info("session %s ended", session_id)

    def session_count(self) -> int:
        return len(self.sessions)

    def frames_waiting(self) -> int:
        return sum(1 for s in self.sessions.values() if s.input is not None and s.input.has_new())

    def session(self, session_id: str) -> StageSession[S]:
        session = self.sessions.get(session_id)
        if session is None:
            raise KeyError(f"unknown session {session_id!r}")
        return session

    # ------------------------------------------------------------ messages

    def frame_ready(self, msg: p.FrameReady) -> None:
        session = self.session(msg.session_id)
        if session.input is None:  # a source stage, or a session of text mode
            raise ValueError(f"session {msg.session_id!r} has no input ring here")
        self.drain(session)

    def update_parameters(self, msg: p.UpdateParameters) -> None:
        session = self.session(msg.session_id)
        session.params.update(msg.params)
        self.on_parameters(session, msg.params)

    def on_parameters(self, session: StageSession[S], changed: dict[str, Any]) -> None:
        """Some runtime parameters changed (already merged into ``session.params``)."""

    # ------------------------------------------------------------ frames

    def drain(self, session: StageSession[S]) -> None:
        """Turn the newest waiting frame (older ones are skipped by the ring) into output:
        the slot is filled before the input is released, and committed only if the input was
        intact, so a torn input never leaves the stage."""
        assert session.input is not None
        with session.input.latest() as frame:
            if frame is None:
                return
            slot = None
            if session.output is not None:
                slot = session.output.begin(session.width, session.height)
            outcome = self.step(session, frame, slot)
        if not frame.intact:
            self._torn(session, frame)
            self.on_torn(session, outcome)
        elif outcome is not None:
            self.commit(session, outcome, slot)

    def drain_batch(self, sessions: Sequence[StageSession[S]]) -> None:
        """:meth:`drain` for several sessions in one :meth:`step_batch` (a model's batch),
        under the same rule: each output is committed only if its input stayed intact. A stage
        that ``copies_input`` (in :meth:`take`) lets the frame go before the step, and a frame
        torn while it was copied never reaches the step."""
        taken: list[tuple[StageSession[S], ReadFrame, Any]] = []
        with contextlib.ExitStack() as held:
            for session in sessions:
                assert session.input is not None
                frame = held.enter_context(session.input.latest())
                if frame is None or (item := self.take(session, frame)) is None:
                    continue
                if self.copies_input and not self.release(session, frame):
                    continue
                taken.append((session, frame, item))
            outcomes = self.step_batch([(s, item) for s, _, item in taken]) if taken else []
        frames = {s.session_id: frame for s, frame, _ in taken}
        for session, outcome in outcomes:
            frame = frames.get(session.session_id)
            if frame is not None and not frame.intact:
                self._torn(session, frame)
                self.on_torn(session, outcome)
            else:
                self.commit(session, outcome, None)

    #: :meth:`take` copies what it needs of the frame (the slot is released before the step).
    copies_input: bool = False

    def take(self, session: StageSession[S], frame: ReadFrame) -> Any:
        """What :meth:`step_batch` needs of a session's frame (valid until released); None:
        the session sits this batch out."""
        raise NotImplementedError

    def step_batch(
        self, batch: list[tuple[StageSession[S], Any]]
    ) -> list[tuple[StageSession[S], Any]]:
        """The :meth:`take` items of several sessions → an outcome per session to commit
        (``commit(session, outcome, None)``): sessions may be missing (failed) or added."""
        raise NotImplementedError

    def step(self, session: StageSession[S], frame: ReadFrame, out: WriteSlot | None) -> Any:
        """One input frame (valid until released) → ``out`` filled (None when the session has
        no output ring here), and what :meth:`commit` needs; None: nothing to commit."""
        raise NotImplementedError

    def commit(self, session: StageSession[S], outcome: Any, out: WriteSlot | None) -> None:
        """The input was intact: by default ``outcome`` is the output's FrameMeta, published."""
        assert out is not None
        self.publish(session, out, outcome)

    def on_torn(self, session: StageSession[S], outcome: Any) -> None:
        """The input was overwritten while in use: ``outcome`` is discarded."""

    def release(self, session: StageSession[S], frame: ReadFrame) -> bool:
        """Release an input frame; False (logged) when it was torn while held."""
        assert session.input is not None
        if session.input.release(frame):
            return True
        self._torn(session, frame)
        return False

    def _torn(self, session: StageSession[S], frame: ReadFrame) -> None:
        logger.debug("session %s: frame %d torn, discarded", session.session_id, frame.seq)

    def count_done(self, session: StageSession[S]) -> None:
        """One of the session's frames left this stage (the heartbeat's progress counters)."""
        session.frames_done += 1
        self.frames_done += 1

    def publish(self, session: StageSession[S], slot: WriteSlot, meta: FrameMeta) -> None:
        """Publish a filled output slot and notify downstream."""
        assert session.output is not None
        seq = session.output.publish(slot, meta)
        self.count_done(session)
        if session.downstream:
            self.outbox.send(
                session.downstream,
                p.FrameReady(session_id=session.session_id, ring=session.output.ring.name, seq=seq),
            )


class FrameStage(RingStage[S, p.StageInbox]):
    """A stage of frames from the ring and the session's parameters (inference, overlay, the
    synthetic source and sink)."""

    inbox = p.StageInbox

    def handle(self, msg: p.StageInbox) -> None:
        match msg:
            case p.FrameReady():
                self.frame_ready(msg)
            case p.UpdateParameters():
                self.update_parameters(msg)
            case _:
                assert_never(msg)
