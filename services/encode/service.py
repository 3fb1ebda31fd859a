"""The encode service: a ring of RGB frames → VP8/H264 packets → signalling.

The encoder reads the frame straight from the shared-memory slot (no copy before libswscale).
Keyframe requests (PLI/FIR from the viewer) and bitrate estimates (REMB) arrive from signalling,
and so do recording commands: a recording takes the packets as they leave (after they are sent),
into a file (``services.encode.recorder``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import assert_never

import msgspec
import numpy as np

from services import protocol as p
from services.encode.encoder import EncodedPacket, Encoder
from services.encode.recorder import Limits, Recorder
from services.options import EncodeOptions
from services.runtime import Outbox, ServiceSpec
from services.stage import RingStage, StageSession
from shm.ring import ReadFrame, Stage, WriteSlot

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class Encoded:
    """One frame's packets (none: the encoder dropped it), sent only if the frame was intact."""

    frame_number: int
    stamps: np.ndarray
    packets: list[EncodedPacket]


@dataclass(eq=False, slots=True)
class EncodeState:
    """A session's encoder, and the file it records to, if any."""

    encoder: Encoder
    recorder: Recorder | None = None


class EncodeStage(RingStage[EncodeState, p.EncodeInbox]):
    inbox = p.EncodeInbox

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        self.options = msgspec.convert(spec.options, EncodeOptions)

    def new_state(
        self, session: StageSession[EncodeState], previous: EncodeState | None
    ) -> EncodeState:
        o = self.options
        encoder = Encoder(
            session.codec,
            session.width,
            session.height,
            bitrate_bps=o.start_bitrate_bps,
            min_bitrate_bps=o.min_bitrate_bps,
            max_bitrate_bps=o.max_bitrate_bps,
            keyframe_interval_frames=o.keyframe_interval_frames,
            hardware=o.hardware,
        )
        return EncodeState(encoder)

    def end_state(self, session: StageSession[EncodeState]) -> None:
        self._finish_recording(session, "session ended")

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._finish_recording(session, "encode stopped")

    def step(
        self, session: StageSession[EncodeState], frame: ReadFrame, out: WriteSlot | None
    ) -> Encoded:
        stamps = frame.stamps
        stamps[Stage.ENCODE_START] = time.monotonic_ns()
        packets = session.state.encoder.encode(frame.array, frame.pts)
        stamps[Stage.ENCODE_END] = time.monotonic_ns()
        return Encoded(frame.frame_number, stamps, packets)

    def commit(
        self, session: StageSession[EncodeState], outcome: Encoded, out: WriteSlot | None
    ) -> None:
        self.count_done(session)
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
        if (recorder := session.state.recorder) is not None:
            for packet in outcome.packets:  # after the client's: the stream never waits
                if (reason := recorder.write(packet)) is not None:
                    self._finish_recording(session, reason)
                    break

    def handle(self, msg: p.EncodeInbox) -> None:
        match msg:
            case p.FrameReady():
                self.frame_ready(msg)
            case p.KeyframeNeeded(session_id=session_id):
                self.session(session_id).state.encoder.request_keyframe()
            case p.BitrateChanged(session_id=session_id, bitrate_bps=bps):
                self.session(session_id).state.encoder.set_bitrate(bps)
            case p.RecordCommand():
                self._record(msg)
            case _:
                assert_never(msg)

    def _record(self, msg: p.RecordCommand) -> None:
        session = self.session(msg.session_id)
        if msg.action == "stop":
            self._finish_recording(session, "stopped")
            return
        state = session.state
        if msg.action == "start" and state.recorder is not None:
            return  # already recording: the file goes on
        self._finish_recording(session, "cut")
        limits = Limits(msg.max_bytes, msg.max_seconds, msg.min_free_bytes)
        state.recorder = Recorder(
            Path(msg.path), session.codec, session.width, session.height, limits
        )
        state.encoder.request_keyframe()  # a file starts at a keyframe

    def _finish_recording(self, session: StageSession[EncodeState], reason: str) -> None:
        recorder, session.state.recorder = session.state.recorder, None
        if recorder is None:
            return
        done = recorder.finish()
        logger.info(
            "session %s: recorded %d frames (%.1f s, %d bytes) to %s: %s",
            session.session_id, done.frames, done.duration_s, done.size_bytes, done.path, reason,
        )  # fmt: skip
        if session.downstream is not None:
            self.outbox.send(
                session.downstream,
                p.RecordingFinished(
                    session_id=session.session_id,
                    path=str(done.path),
                    frames=done.frames,
                    size_bytes=done.size_bytes,
                    duration_s=done.duration_s,
                    reason=reason,
                ),
            )
