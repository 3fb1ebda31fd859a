"""Encoding of RGB frames for WebRTC (VP8 via libvpx, H.264 via libx264), no sockets.

One PyAV encoder per session, configured for real time the way aiortc configures its own
(``aiortc/codecs/vpx.py`` and ``h264.py``): no lookahead, no B-frames, one packet out per frame
in, immediately. Packets are what aiortc's ``Vp8Encoder.pack`` / ``H264Encoder.pack`` take:
a raw VP8 frame, or H.264 Annex-B NAL units (constrained baseline, SPS and PPS repeated in
front of every IDR so a late joiner can start at any keyframe). :meth:`EncodedPacket.to_av_packet`
builds the ``av.Packet`` with the pts and time base ``pack`` needs.

Timestamps: the caller's ``pts`` is in 1/90000 s (the WebRTC video clock) and is passed through
to the packet unchanged. The encoder itself sees a constant-rate stream (time base 1/fps,
pts = frame counter), so rate control assumes ``fps`` frames per second; sending fewer frames
produces proportionally fewer bits. (x264's zerolatency tune ignores timestamps for rate
control anyway.)

Bitrate: neither encoder can be fully retargeted in place through PyAV (libvpx ignores
``bit_rate`` after opening; x264 follows ``bit_rate`` but its VBV ``maxrate``/``bufsize``
cannot be changed), so, like aiortc, a change of more than 10% recreates the encoder at the
next frame, which is then a keyframe.

Per-frame work: the RGB array is wrapped without copying (``VideoFrame.from_numpy_buffer``),
converted to yuv420p by the codec context's own cached ``SwsContext``, and the packet bytes
are copied once into ``EncodedPacket.data``.
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import os

import av
import numpy as np
from av.video.codeccontext import VideoCodecContext
from av.video.frame import PictureType, VideoFrame

from services import hwcodec
from services.codec_common import (
    VIDEO_TIME_BASE,
    PerSession,
    VideoCodec,
    check_codec,
    check_size,
)
from services.hwcodec import Hardware
from services.options import (
    KEYFRAME_INTERVAL_FRAMES,
    MAX_BITRATE_BPS,
    MIN_BITRATE_BPS,
    START_BITRATE_BPS,
)

logger = logging.getLogger(__name__)

DEFAULT_FPS = 30
BITRATE_REOPEN_RATIO = 0.1  # recreate the encoder only for changes larger than this
_PENDING_PTS_MAX = 16  # frames in the encoder; with these settings there is at most one

# (max frame size in macroblocks, max macroblocks per second, level): H.264 Table A-1. Levels
# written as x264 reads them (31 is 3.1): the libx264 builds in PyAV 14's wheels refuse "3.1".
_H264_LEVELS = (
    (3600, 108_000, "31"),
    (5120, 216_000, "32"),
    (8192, 245_760, "40"),
    (8704, 522_240, "42"),
    (22_080, 589_824, "50"),
    (36_864, 983_040, "51"),
)


@dataclasses.dataclass(slots=True)
class EncodedPacket:
    data: bytes
    """One encoded frame: raw VP8, or H.264 Annex-B NAL units."""
    pts: int
    """Presentation time in 1/90000 s, as given to :meth:`EncodeCore.encode`."""
    keyframe: bool

    def to_av_packet(self) -> av.Packet:
        """An ``av.Packet`` for aiortc's ``Encoder.pack`` (needs pts and time_base)."""
        packet = av.Packet(self.data)
        packet.pts = self.pts
        packet.time_base = VIDEO_TIME_BASE
        return packet


@dataclasses.dataclass(slots=True)
class _Stream:
    codec: VideoCodec
    width: int
    height: int
    fps: int
    bitrate_bps: int
    """Target; the encoder in ``context`` may still run at ``context_bitrate_bps``."""
    context: VideoCodecContext | None = None
    context_bitrate_bps: int = 0
    frame_index: int = 0
    force_keyframe: bool = False
    pending_pts: dict[int, int] = dataclasses.field(default_factory=dict)
    """Caller pts by encoder frame index, for frames not yet out of the encoder."""


def _thread_count(pixels: int, cpus: int) -> int:
    """Encoder threads for a frame size, as aiortc's ``vpx.number_of_threads``."""
    if pixels >= 1920 * 1080 and cpus > 8:
        return 8
    if pixels > 1280 * 960 and cpus >= 6:
        return 3
    if pixels > 640 * 480 and cpus >= 3:
        return 2
    return 1


def _h264_level(width: int, height: int, fps: int) -> str:
    """The lowest H.264 level that allows this size and rate (at least 3.1, as aiortc)."""
    frame_mbs = ((width + 15) // 16) * ((height + 15) // 16)
    for max_frame_mbs, max_mbs_per_s, level in _H264_LEVELS:
        if frame_mbs <= max_frame_mbs and frame_mbs * fps <= max_mbs_per_s:
            return level
    return "52"


class EncodeCore(PerSession[_Stream]):
    """Per-session encoders. Not thread-safe: call from one thread.

    Bitrates are clamped to [``min_bitrate_bps``, ``max_bitrate_bps``].
    """

    holds = "encoder"

    def __init__(
        self,
        min_bitrate_bps: int = MIN_BITRATE_BPS,
        max_bitrate_bps: int = MAX_BITRATE_BPS,
        keyframe_interval_frames: int = KEYFRAME_INTERVAL_FRAMES,
        hardware: Hardware = "auto",
    ) -> None:
        if not 0 < min_bitrate_bps <= max_bitrate_bps:
            raise ValueError(f"bad bitrate range [{min_bitrate_bps}, {max_bitrate_bps}]")
        if keyframe_interval_frames < 1:
            raise ValueError(f"keyframe interval must be >= 1, got {keyframe_interval_frames}")
        self.min_bitrate_bps = min_bitrate_bps
        self.max_bitrate_bps = max_bitrate_bps
        self.keyframe_interval_frames = keyframe_interval_frames
        self.hardware: Hardware = hardware
        super().__init__()

    def open_session(
        self,
        session_id: str,
        codec: str,
        width: int,
        height: int,
        fps: int = DEFAULT_FPS,
        bitrate_bps: int = START_BITRATE_BPS,
    ) -> None:
        """Start encoding ``codec`` ("VP8" or "H264") at ``width`` x ``height``.

        The encoder is created on the first :meth:`encode`. Raises ``ValueError`` if the
        session is already open.
        """
        name = check_codec(codec)
        check_size(width, height)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if session_id in self._sessions:
            raise ValueError(f"session {session_id!r} is already open")
        self._sessions[session_id] = _Stream(
            codec=name, width=width, height=height, fps=fps, bitrate_bps=self._clamp(bitrate_bps)
        )
        logger.debug("session %s: encoding %s %dx%d@%d", session_id, codec, width, height, fps)

    def _clamp(self, bitrate_bps: int) -> int:
        return max(self.min_bitrate_bps, min(int(bitrate_bps), self.max_bitrate_bps))

    def request_keyframe(self, session_id: str) -> None:
        """Make the next encoded frame a keyframe (on RTCP PLI or FIR)."""
        self._session(session_id).force_keyframe = True

    def set_bitrate(self, session_id: str, bitrate_bps: int) -> int:
        """Set the target bitrate (e.g. from REMB); returns it after clamping.

        Takes effect at the next frame if it differs from the running encoder's by more than
        10%, by recreating the encoder (that frame is then a keyframe).
        """
        session = self._session(session_id)
        session.bitrate_bps = self._clamp(bitrate_bps)
        return session.bitrate_bps

    def bitrate(self, session_id: str) -> int:
        """The session's target bitrate in bits per second."""
        return self._session(session_id).bitrate_bps

    def encode(
        self, session_id: str, rgb: np.ndarray, pts: int, force_keyframe: bool = False
    ) -> list[EncodedPacket]:
        """Encode one (H, W, 3) uint8 RGB frame; ``pts`` in 1/90000 s.

        A frame of another size is scaled to the session's. Returns the packets the frame
        completes: one with these real-time settings (none only if the encoder dropped the
        frame).
        """
        session = self._session(session_id)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
        context = self._context(session_id, session)

        try:
            frame = VideoFrame.from_numpy_buffer(rgb, format="rgb24")
        except ValueError:  # rows not contiguous
            frame = VideoFrame.from_numpy_buffer(np.ascontiguousarray(rgb), format="rgb24")
        index = session.frame_index
        session.frame_index += 1
        frame.pts = index
        frame.time_base = context.time_base
        if force_keyframe or session.force_keyframe:
            frame.pict_type = PictureType.I
            session.force_keyframe = False
        else:
            frame.pict_type = PictureType.NONE
        session.pending_pts[index] = pts

        packets = []
        for packet in context.encode(frame):
            packet_index = packet.pts if packet.pts is not None else index
            packet_pts = session.pending_pts.pop(packet_index, pts)
            packets.append(
                EncodedPacket(data=bytes(packet), pts=packet_pts, keyframe=packet.is_keyframe)
            )
        # Frames the encoder dropped never come out: forget the oldest.
        while len(session.pending_pts) > _PENDING_PTS_MAX:
            del session.pending_pts[next(iter(session.pending_pts))]
        return packets

    def _context(self, session_id: str, session: _Stream) -> VideoCodecContext:
        context = session.context
        if context is not None and (
            abs(session.bitrate_bps - session.context_bitrate_bps) / session.context_bitrate_bps
            <= BITRATE_REOPEN_RATIO
        ):
            return context
        if context is not None:
            logger.debug(
                "session %s: bitrate %d -> %d bps, recreating encoder",
                session_id,
                session.context_bitrate_bps,
                session.bitrate_bps,
            )
        context = self._create_context(session)
        session.context = context
        session.context_bitrate_bps = session.bitrate_bps
        session.pending_pts.clear()
        return context

    def _create_context(self, session: _Stream) -> VideoCodecContext:
        bitrate = session.bitrate_bps
        if session.codec == "VP8":
            context = av.CodecContext.create("libvpx", "w")
            context.qmin = 2  # rc_min_quantizer
            context.qmax = 56  # rc_max_quantizer
            options = {
                # rc_buf_sz = bufsize * 1000 / bit_rate = 1000 ms.
                "bufsize": str(bitrate),
                "cpu-used": "-6",
                "deadline": "realtime",
                "lag-in-frames": "0",
                # minrate = maxrate = bit_rate selects CBR.
                "minrate": str(bitrate),
                "maxrate": str(bitrate),
                "noise-sensitivity": "4",
                "overshoot-pct": "15",
                "partitions": "0",  # VP8_ONE_TOKENPARTITION
                "static-thresh": "1",
                "undershoot-pct": "100",
            }
        elif (gpu := hwcodec.encoder("H264", self.hardware)) is not None:
            created = av.CodecContext.create(gpu, "w")
            assert isinstance(created, VideoCodecContext)
            context = created
            context.profile = "baseline"
            options = {
                "preset": "p1",  # the fastest
                "tune": "ull",  # ultra-low latency: no lookahead, no B-frames, no delay
                "zerolatency": "1",
                "delay": "0",
                "rc": "cbr",
                "forced-idr": "1",
                "maxrate": str(bitrate),
                "bufsize": str(bitrate),
            }
        else:
            context = av.CodecContext.create("libx264", "w")
            context.profile = "Baseline"  # x264 also sets constraint_set1: constrained baseline
            options = {
                "preset": "ultrafast",
                "tune": "zerolatency",  # no lookahead, no B-frames, sliced threads
                "level": _h264_level(session.width, session.height, session.fps),
                "forced-idr": "1",  # a forced keyframe is an IDR (SPS/PPS repeated)
                # A one-second VBV at the target rate, so the rate holds over short spans.
                "maxrate": str(bitrate),
                "bufsize": str(bitrate),
            }
        assert isinstance(context, VideoCodecContext)
        context.width = session.width
        context.height = session.height
        context.pix_fmt = "yuv420p"
        context.bit_rate = bitrate
        context.framerate = fractions.Fraction(session.fps, 1)
        context.time_base = fractions.Fraction(1, session.fps)
        context.gop_size = self.keyframe_interval_frames
        context.thread_count = _thread_count(session.width * session.height, os.cpu_count() or 1)
        context.options = options
        context.open()
        return context
