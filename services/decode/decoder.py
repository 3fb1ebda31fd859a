"""Decoding of WebRTC video frames to RGB at the session's pipeline resolution, no sockets.

A :class:`Decoder` is one session's PyAV decoder (the decode stage keeps it in the session's
state). Input is one complete encoded frame as aiortc's jitter buffer
hands it over (``JitterFrame.data``): a raw VP8 frame, or H.264 Annex-B NAL units. Output is
RGB24 scaled to the session resolution by libswscale (one cached ``SwsContext`` per session).

Decoding never raises for bad input. Corrupt data, an empty payload, a frame FFmpeg flags as
corrupt, or anything before the first keyframe is counted, dropped, and raises the session's
keyframe request, which :meth:`Decoder.needs_keyframe` reads and clears. The caller turns it
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
from services.codec_common import VIDEO_TIME_BASE, check_codec, check_size
from services.hwcodec import Hardware
from services.protocol import VideoCodec

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
    """Presentation time in 1/90000 s (the pts passed to :meth:`Decoder.decode`)."""
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


class Decoder:
    """One session's decoder and scaler. Not thread-safe: call from one thread."""

    def __init__(self, codec: str, width: int, height: int, hardware: Hardware = "auto") -> None:
        """Decode ``codec`` ("VP8" or "H264") to ``width`` x ``height`` RGB; ``ValueError``
        for another codec or an odd size."""
        self.codec: VideoCodec = check_codec(codec)
        check_size(width, height)
        self.width, self.height = width, height
        name = hwcodec.decoder(self.codec, hardware) or _DECODER_NAMES[self.codec]
        context = av.CodecContext.create(name, "r")
        assert isinstance(context, VideoCodecContext)
        self._context = context
        self._reformatter = VideoReformatter()
        self._seen_keyframe = False
        self._keyframe_wanted = True
        self._stats = DecodeStats(keyframe_requests=1)  # keyframe_wanted starts raised
        logger.debug("decoding %s to %dx%d", codec, width, height)

    def needs_keyframe(self) -> bool:
        """Whether a keyframe should be requested from the sender; clears the request.

        Raised from opening until the first keyframe (each payload before it raises it
        again) and by every decode error; a decoded keyframe clears it.
        """
        wanted = self._keyframe_wanted
        self._keyframe_wanted = False
        return wanted

    def stats(self) -> DecodeStats:
        """The counters (a copy)."""
        return dataclasses.replace(self._stats)

    def decode(
        self,
        payload: bytes,
        pts: int | None,
        out: DestFactory | None = None,
    ) -> list[DecodedFrame]:
        """Decode one complete encoded frame; return the frames it completes (usually one).

        ``pts`` is in 1/90000 s (the RTP timestamp). ``out``, if given, is called once per
        decoded frame with (height, width) and must return an (height, width, 3) uint8 array
        that the frame is written into. Bad input never raises: see the module docstring.
        """
        self._stats.frames_in += 1
        if not payload:
            # An empty packet would put the decoder into draining mode for good.
            self._error("empty payload")
            return []
        packet = av.Packet(payload)
        packet.pts = pts
        packet.time_base = VIDEO_TIME_BASE
        try:
            frames = self._context.decode(packet)
        except av.FFmpegError as exc:
            self._error(str(exc))
            return []

        decoded: list[DecodedFrame] = []
        for frame in frames:
            if frame.is_corrupt:
                self._error("corrupt frame")
                continue
            if frame.key_frame:
                self._seen_keyframe = True
                self._keyframe_wanted = False  # the request is answered
            elif not self._seen_keyframe:
                self._stats.dropped_before_keyframe += 1
                self._want_keyframe()
                continue
            decoded.append(self._to_rgb(frame, pts, out))
        if not self._seen_keyframe:
            # Whatever this payload was, nothing is shown until a keyframe arrives.
            self._want_keyframe()
        self._stats.frames_out += len(decoded)
        return decoded

    def _to_rgb(self, frame: VideoFrame, pts: int | None, out: DestFactory | None) -> DecodedFrame:
        rgb_frame = self._reformatter.reformat(
            frame, width=self.width, height=self.height, format="rgb24"
        )
        rgb = rgb_frame.to_ndarray()  # zero-copy view of rgb_frame's buffer
        if out is not None:
            dest = out(self.height, self.width)
            if dest.shape != rgb.shape or dest.dtype != np.uint8:
                raise ValueError(
                    f"out() returned {dest.shape} {dest.dtype}, expected {rgb.shape} uint8"
                )
            np.copyto(dest, rgb)
            rgb = dest
        frame_pts = frame.pts if frame.pts is not None else pts
        return DecodedFrame(rgb=rgb, pts=frame_pts, keyframe=bool(frame.key_frame))

    def _error(self, reason: str) -> None:
        self._stats.errors += 1
        logger.debug("decode error: %s", reason)
        self._want_keyframe()

    def _want_keyframe(self) -> None:
        if not self._keyframe_wanted:
            self._keyframe_wanted = True
            self._stats.keyframe_requests += 1
