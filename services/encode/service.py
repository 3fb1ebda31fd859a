"""The encode service: a ring of RGB frames → VP8/H264 packets → signalling.

The encoder reads the frame straight from the shared-memory slot (no copy before libswscale).
Keyframe requests (PLI/FIR from the viewer) and bitrate estimates (REMB) arrive from signalling.
"""

from __future__ import annotations

import time

import msgspec

from services import protocol as p
from services.encode.core import EncodeCore
from services.options import EncodeOptions
from services.runtime import Outbox, ServiceSpec
from services.stage import RingStage, StageSession
from shm.ring import Stage


class EncodeStage(RingStage):
    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        options = msgspec.convert(spec.options, EncodeOptions)
        self.core = EncodeCore(
            min_bitrate_bps=options.min_bitrate_bps,
            max_bitrate_bps=options.max_bitrate_bps,
            keyframe_interval_frames=options.keyframe_interval_frames,
        )
        self.initial_bitrate_bps = options.start_bitrate_bps

    def on_session_started(self, session: StageSession) -> None:
        self.core.close_session(session.session_id)
        self.core.open_session(
            session.session_id,
            session.codec,
            session.width,
            session.height,
            bitrate_bps=self.initial_bitrate_bps,
        )

    def on_session_ended(self, session: StageSession) -> None:
        self.core.close_session(session.session_id)

    def close(self) -> None:
        self.core.close()

    def drain(self, session: StageSession) -> None:
        assert session.input is not None
        frame = session.input.acquire_latest()
        if frame is None:
            return
        stamps = frame.stamps
        stamps[Stage.ENCODE_START] = time.monotonic_ns()
        try:
            packets = self.core.encode(session.session_id, frame.array, frame.pts)
        finally:
            intact = session.input.release(frame)
        stamps[Stage.ENCODE_END] = time.monotonic_ns()
        if not intact:
            return
        session.frames_done += 1
        self.frames_done += 1
        target = session.downstream
        if target is None:
            return
        if not packets:  # the encoder dropped the frame (rate control): lost here
            self.outbox.send(
                target, p.FramesDropped(session_id=session.session_id, stage="encode", count=1)
            )
            return
        stamp_list = stamps.tolist()
        for packet in packets:
            self.outbox.send(
                target,
                p.EncodedPacket(
                    session_id=session.session_id,
                    data=packet.data,
                    pts=packet.pts,
                    keyframe=packet.keyframe,
                    frame_number=frame.frame_number,
                    stamps=stamp_list,
                ),
            )

    def handle_other(self, msg: p.InboxMessage) -> None:
        match msg:
            case p.KeyframeNeeded(session_id=session_id):
                self.core.request_keyframe(self._known(session_id))
            case p.BitrateChanged(session_id=session_id, bitrate_bps=bps):
                self.core.set_bitrate(self._known(session_id), bps)
            case _:
                raise ValueError(f"encode does not take {type(msg).__name__}")

    def _known(self, session_id: str) -> str:
        if session_id not in self.sessions:
            raise KeyError(f"unknown session {session_id!r}")
        return session_id
