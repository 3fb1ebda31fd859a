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
from services.codec_common import check_codec
from services.encode.core import EncodeCore, EncodedPacket
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
        self.recorders: dict[str, Recorder] = {}

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
        self._finish_recording(session, "session ended")
        self.core.close_session(session.session_id)

    def close(self) -> None:
        for session in list(self.sessions.values()):
            self._finish_recording(session, "encode stopped")
        self.core.close()

    def step(self, session: StageSession[None], frame: ReadFrame, out: WriteSlot | None) -> Encoded:
        stamps = frame.stamps
        stamps[Stage.ENCODE_START] = time.monotonic_ns()
        packets = self.core.encode(session.session_id, frame.array, frame.pts)
        stamps[Stage.ENCODE_END] = time.monotonic_ns()
        return Encoded(frame.frame_number, stamps, packets)

    def commit(self, session: StageSession[None], outcome: Encoded, out: WriteSlot | None) -> None:
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
        if (recorder := self.recorders.get(session.session_id)) is not None:
            for packet in outcome.packets:  # after the client's: the stream never waits
                if (reason := recorder.write(packet)) is not None:
                    self._finish_recording(session, reason)
                    break

    def handle(self, msg: p.EncodeInbox) -> None:
        match msg:
            case p.FrameReady():
                self.frame_ready(msg)
            case p.KeyframeNeeded(session_id=session_id):
                self.core.request_keyframe(self._known(session_id))
            case p.BitrateChanged(session_id=session_id, bitrate_bps=bps):
                self.core.set_bitrate(self._known(session_id), bps)
            case p.RecordCommand():
                self._record(msg)
            case _:
                assert_never(msg)

    def _record(self, msg: p.RecordCommand) -> None:
        session = self.session(msg.session_id)
        if msg.action == "stop":
            self._finish_recording(session, "stopped")
            return
        if msg.action == "start" and session.session_id in self.recorders:
            return  # already recording: the file goes on
        self._finish_recording(session, "cut")
        limits = Limits(msg.max_bytes, msg.max_seconds, msg.min_free_bytes)
        codec = check_codec(session.codec)
        self.recorders[session.session_id] = Recorder(
            Path(msg.path), codec, session.width, session.height, limits
        )
        self.core.request_keyframe(session.session_id)  # a file starts at a keyframe

    def _finish_recording(self, session: StageSession[None], reason: str) -> None:
        recorder = self.recorders.pop(session.session_id, None)
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

    def _known(self, session_id: str) -> str:
        return self.session(session_id).session_id
