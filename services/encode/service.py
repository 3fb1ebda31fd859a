"""The encode service: a ring of RGB frames → VP8/H264 packets → signalling.

The encoder reads the frame straight from the shared-memory slot (no copy before libswscale).
Keyframe requests (PLI/FIR from the viewer) and bitrate estimates (REMB) arrive from signalling.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import assert_never

import msgspec
import numpy as np

from services import protocol as p
from services.encode.core import EncodeCore, EncodedPacket
from services.options import EncodeOptions
from services.runtime import Outbox, ServiceSpec
from services.stage import RingStage, StageSession
from shm.ring import ReadFrame, Stage, WriteSlot


@dataclass(slots=True)
class Encoded:
    """One frame's packets (none: the encoder dropped it), sent only if the frame was intact."""

    frame_number: int
    stamps: np.ndarray
    packets: list[EncodedPacket]


class EncodeStage(RingStage[None, p.EncodeInbox]):
    inbox = p.EncodeInbox

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        options = msgspec.convert(spec.options, EncodeOptions)
        self.core = EncodeCore(
            min_bitrate_bps=options.min_bitrate_bps,
            max_bitrate_bps=options.max_bitrate_bps,
            keyframe_interval_frames=options.keyframe_interval_frames,
            hardware=options.hardware,
        )
        self.initial_bitrate_bps = options.start_bitrate_bps

    def new_state(self, session: StageSession[None], previous: None) -> None:
        """The encoder context lives in :class:`EncodeCore`, keyed by session."""
        self.core.close_session(session.session_id)
        self.core.open_session(
            session.session_id,
            session.codec,
            session.width,
            session.height,
            bitrate_bps=self.initial_bitrate_bps,
        )

    def end_state(self, session: StageSession[None]) -> None:
        self.core.close_session(session.session_id)

    def close(self) -> None:
        self.core.close()

    def step(self, session: StageSession[None], frame: ReadFrame, out: WriteSlot | None) -> Encoded:
        stamps = frame.stamps
        stamps[Stage.ENCODE_START] = time.monotonic_ns()
        packets = self.core.encode(session.session_id, frame.array, frame.pts)
        stamps[Stage.ENCODE_END] = time.monotonic_ns()
        return Encoded(frame.frame_number, stamps, packets)

    def commit(self, session: StageSession[None], outcome: Encoded, out: WriteSlot | None) -> None:
        session.frames_done += 1
        self.frames_done += 1
        target = session.downstream
        if target is None:
            return
        if not outcome.packets:  # the encoder dropped the frame (rate control): lost here
            self.outbox.send(
                target, p.FramesDropped(session_id=session.session_id, stage="encode", count=1)
            )
            return
        stamp_list = outcome.stamps.tolist()
        for packet in outcome.packets:
            self.outbox.send(
                target,
                p.EncodedPacket(
                    session_id=session.session_id,
                    data=packet.data,
                    pts=packet.pts,
                    keyframe=packet.keyframe,
                    frame_number=outcome.frame_number,
                    stamps=stamp_list,
                ),
            )

    def handle(self, msg: p.EncodeInbox) -> None:
        match msg:
            case p.FrameReady():
                self.frame_ready(msg)
            case p.KeyframeNeeded(session_id=session_id):
                self.core.request_keyframe(self._known(session_id))
            case p.BitrateChanged(session_id=session_id, bitrate_bps=bps):
                self.core.set_bitrate(self._known(session_id), bps)
            case _:
                assert_never(msg)

    def _known(self, session_id: str) -> str:
        return self.session(session_id).session_id
