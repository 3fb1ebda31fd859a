"""The decode service: encoded frames from signalling → RGB at the pipeline size → a ring.

Per session one PyAV decoder (:class:`services.decode.decoder.Decoder`, the session's state).
The scaler writes into a fresh frame that is copied once, straight into the session's output
ring slot. When a session cannot decode (a lost packet, no keyframe yet, a restart of this
process) signalling is asked for a keyframe, which it turns into an RTCP PLI upstream.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import numpy as np

from services import protocol as p
from services.decode.decoder import Decoder
from services.options import DecodeOptions
from services.runtime import Outbox, ServiceSpec
from services.stage import RingStage, StageSession
from shm.ring import N_STAMPS, FrameMeta, Stage

KEYFRAME_REQUEST_INTERVAL_S = 0.25


@dataclass(slots=True)
class DecodeState:
    decoder: Decoder
    frame_number: int = 0
    keyframe_asked: float = 0.0


class DecodeStage(RingStage[DecodeState, p.DecodeInbox]):
    inbox = p.DecodeInbox

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        options = msgspec.convert(spec.options, DecodeOptions)
        self.hardware = options.hardware
        self.keyframe_target = options.keyframe_target

    def new_state(
        self, session: StageSession[DecodeState], previous: DecodeState | None
    ) -> DecodeState:
        return DecodeState(Decoder(session.codec, session.width, session.height, self.hardware))

    def handle(self, msg: p.DecodeInbox) -> None:
        """Its only message: an encoded frame from signalling."""
        session = self.session(msg.session_id)
        state = session.state
        if msg.codec != state.decoder.codec:
            # The browser may switch between negotiated codecs: follow it.
            state.decoder = Decoder(msg.codec, session.width, session.height, self.hardware)
        assert session.output is not None
        stamps = np.zeros(N_STAMPS, dtype=np.int64)
        stamps[Stage.RTP_ARRIVAL] = msg.rtp_arrival_ns
        stamps[Stage.FRAME_COMPLETE] = msg.frame_complete_ns
        stamps[Stage.NODE_IN] = msg.node_in_ns
        stamps[Stage.DECODE_START] = time.monotonic_ns()
        slot = session.output.begin(session.width, session.height)
        decoded = state.decoder.decode(msg.data, msg.pts, out=lambda h, w: slot.array)
        stamps[Stage.DECODE_END] = time.monotonic_ns()
        if state.decoder.needs_keyframe():
            self._ask_keyframe(session)
        if not decoded:
            # A decoder error, or a delta before the first keyframe: lost here, so counted here
            # (signalling, which sent the frame, keeps the metrics).
            self.outbox.send(
                self.keyframe_target,
                p.FramesDropped(session_id=session.session_id, stage="decode", count=1),
            )
            return
        number = state.frame_number
        state.frame_number = number + 1
        pts = decoded[-1].pts if decoded[-1].pts is not None else msg.pts
        self.publish(session, slot, FrameMeta(number, pts, stamps))

    def _ask_keyframe(self, session: StageSession[DecodeState]) -> None:
        now = time.monotonic()
        if now - session.state.keyframe_asked < KEYFRAME_REQUEST_INTERVAL_S:
            return
        session.state.keyframe_asked = now
        self.outbox.send(self.keyframe_target, p.KeyframeNeeded(session_id=session.session_id))
