"""Decoding of WebRTC video frames to RGB at the session's pipeline resolution, no sockets.

One PyAV decoder per session. Input is one complete encoded frame as aiortc's jitter buffer
hands it over (``JitterFrame.data``): a raw VP8 frame, or H.264 Annex-B NAL units. Output is
RGB24 scaled to the session resolution by libswscale (one cached ``SwsContext`` per session).

Decoding never raises for bad input. Corrupt data, an empty payload, a frame FFmpeg flags as
corrupt, or anything before the first keyframe is counted, dropped, and raises the session's
keyframe request, which :meth:`DecodeCore.needs_keyframe` reads and clears. The caller turns it
into an RTCP PLI (and rate-limits that). The next keyframe makes the session decode again.

Copies per decoded frame: swscale writes RGB into a fresh PyAV frame; ``to_ndarray`` of an
rgb24 frame is a zero-copy strided view of that buffer. Without ``out`` that view is returned
(no further copy). With ``out`` the view is copied once into the caller's array (e.g. a
shared-memory slot). PyAV offers no public way to make swscale write into a caller's buffer,
so one copy is the minimum there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext
from av.video.frame import VideoFrame
from av.video.reformatter import VideoReformatter

from services import hwcodec
from services.codec_common import (
    VIDEO_TIME_BASE,
    PerSession,
    check_codec,
    check_size,
)
from services.hwcodec import Hardware

logger = logging.getLogger(__name__)

# FFmpeg's native decoders. (aiortc decodes VP8 with "libvpx"; the native one is faster.)
_DECODER_NAMES = {"VP8": "vp8", "H264": "h264"}

DestFactory = Callable[[int, int], np.ndarray]
"""``out(height, width)`` returns an (height, width, 3) uint8 array to decode into."""


@dataclasses.dataclass(slots=True)
class DecodedFrame:
    rgb: np.ndarray
    """(height, width, 3) uint8 at the session resolution. Without ``out``: a view of PyAV's
    frame buffer (rows may be padded, i.e. not C-contiguous). With ``out``: the array ``out``
    returned."""
    pts: int | None
    """Presentation time in 1/90000 s (the pts passed to :meth:`DecodeCore.decode`)."""
    keyframe: bool


@dataclasses.dataclass(slots=True)
class DecodeStats:
    frames_in: int = 0
    frames_out: int = 0
    errors: int = 0
    """Payloads or frames dropped: decoder errors, empty payloads, corrupt frames."""
    dropped_before_keyframe: int = 0
    keyframe_requests: int = 0
    """Times the keyframe request went from clear to raised."""


@dataclasses.dataclass(slots=True)
class _Stream:
    codec_context: VideoCodecContext
    width: int
    height: int
    reformatter: VideoReformatter
    seen_keyframe: bool = False
    keyframe_wanted: bool = True
    stats: DecodeStats = dataclasses.field(default_factory=DecodeStats)


class DecodeCore(PerSession[_Stream]):
    """Per-session decoders. Not thread-safe: call from one thread."""

    holds = "decoder"

    def __init__(self, hardware: Hardware = "auto") -> None:
        self.hardware: Hardware = hardware
        super().__init__()

    def open_session(self, session_id: str, codec: str, width: int, height: int) -> None:
        """Start decoding ``codec`` ("VP8" or "H264") for ``session_id``, output ``width`` x
        ``height``. Raises ``ValueError`` if the session is already open."""
        name = _DECODER_NAMES[check_codec(codec)]
        check_size(width, height)
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} is already open")
        context = av.CodecContext.create(hwcodec.decoder(codec, self.hardware) or name, "r")
        assert isinstance(context, VideoCodecContext)
        session = _Stream(context, width, height, VideoReformatter())
        session.stats.keyframe_requests = 1  # keyframe_wanted starts raised
        self._sessions[session_id] = session
        logger.debug("session %s: decoding %s to %dx%d", session_id, codec, width, height)

    def needs_keyframe(self, session_id: str) -> bool:
        """Whether a keyframe should be requested from the sender; clears the request.

        Raised from opening until the first keyframe (each payload before it raises it
        again) and by every decode error; a decoded keyframe clears it.
        """
        session = self._session(session_id)
        wanted = session.keyframe_wanted
        session.keyframe_wanted = False
        return wanted

    def stats(self, session_id: str) -> DecodeStats:
        """The session's counters (a copy)."""
        return dataclasses.replace(self._session(session_id).stats)

    def decode(
        self,
        session_id: str,
        payload: bytes,
        pts: int | None,
        out: DestFactory | None = None,
    ) -> list[DecodedFrame]:
        """Decode one complete encoded frame; return the frames it completes (usually one).

        ``pts`` is in 1/90000 s (the RTP timestamp). ``out``, if given, is called once per
        decoded frame with (height, width) and must return an (height, width, 3) uint8 array
        that the frame is written into. Bad input never raises: see the module docstring.
        """
        session = self._session(session_id)
        session.stats.frames_in += 1
        if not payload:
            # An empty packet would put the decoder into draining mode for good.
            self._error(session_id, session, "empty payload")
            return []
        packet = av.Packet(payload)
        packet.pts = pts
        packet.time_base = VIDEO_TIME_BASE
        try:
            frames = session.codec_context.decode(packet)
        except av.FFmpegError as exc:
            self._error(session_id, session, str(exc))
            return []

        decoded: list[DecodedFrame] = []
        for frame in frames:
            if frame.is_corrupt:
                self._error(session_id, session, "corrupt frame")
                continue
            if frame.key_frame:
                session.seen_keyframe = True
                session.keyframe_wanted = False  # the request is answered
            elif not session.seen_keyframe:
                session.stats.dropped_before_keyframe += 1
                self._want_keyframe(session)
                continue
            decoded.append(self._to_rgb(session, frame, pts, out))
        if not session.seen_keyframe:
            # Whatever this payload was, nothing is shown until a keyframe arrives.
            self._want_keyframe(session)
        session.stats.frames_out += len(decoded)
        return decoded

    def _to_rgb(
        self, session: _Stream, frame: VideoFrame, pts: int | None, out: DestFactory | None
    ) -> DecodedFrame:
        rgb_frame = session.reformatter.reformat(
            frame, width=session.width, height=session.height, format="rgb24"
        )
        rgb = rgb_frame.to_ndarray()  # zero-copy view of rgb_frame's buffer
        if out is not None:
            dest = out(session.height, session.width)
            if dest.shape != rgb.shape or dest.dtype != np.uint8:
                raise ValueError(
                    f"out() returned {dest.shape} {dest.dtype}, expected {rgb.shape} uint8"
                )
            np.copyto(dest, rgb)
            rgb = dest
        frame_pts = frame.pts if frame.pts is not None else pts
        return DecodedFrame(rgb=rgb, pts=frame_pts, keyframe=bool(frame.key_frame))

    def _error(self, session_id: str, session: _Stream, reason: str) -> None:
        session.stats.errors += 1
        logger.debug("session %s: decode error: %s", session_id, reason)
        self._want_keyframe(session)

    def _want_keyframe(self, session: _Stream) -> None:
        if not session.keyframe_wanted:
            session.keyframe_wanted = True
            session.stats.keyframe_requests += 1
