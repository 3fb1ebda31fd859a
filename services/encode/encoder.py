"""Encoding of RGB frames for WebRTC (VP8 via libvpx, H.264 via libx264), no sockets.

An :class:`Encoder` is one session's PyAV encoder (the encode stage keeps it in the session's
state), configured for real time the way aiortc configures its own
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
from services.codec_common import VIDEO_TIME_BASE, check_codec, check_size
from services.hwcodec import Hardware
from services.options import (
    KEYFRAME_INTERVAL_FRAMES,
    MAX_BITRATE_BPS,
    MIN_BITRATE_BPS,
    START_BITRATE_BPS,
)
from services.protocol import VideoCodec

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
    """Presentation time in 1/90000 s, as given to :meth:`Encoder.encode`."""
    keyframe: bool

    def to_av_packet(self) -> av.Packet:
        """An ``av.Packet`` for aiortc's ``Encoder.pack`` (needs pts and time_base)."""
        packet = av.Packet(self.data)
        packet.pts = self.pts
        packet.time_base = VIDEO_TIME_BASE
        return packet


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


class Encoder:
    """One session's encoder. Not thread-safe: call from one thread.

    Bitrates are clamped to [``min_bitrate_bps``, ``max_bitrate_bps``]; the PyAV context is
    created at the first :meth:`encode` and again when the bitrate moves enough.
    """

    def __init__(
        self,
        codec: str,
        width: int,
        height: int,
        fps: int = DEFAULT_FPS,
        bitrate_bps: int = START_BITRATE_BPS,
        *,
        min_bitrate_bps: int = MIN_BITRATE_BPS,
        max_bitrate_bps: int = MAX_BITRATE_BPS,
        keyframe_interval_frames: int = KEYFRAME_INTERVAL_FRAMES,
        hardware: Hardware = "auto",
    ) -> None:
        """Encode ``codec`` ("VP8" or "H264") at ``width`` x ``height``; ``ValueError`` for
        another codec, an odd size or bad limits."""
        self.codec: VideoCodec = check_codec(codec)
        check_size(width, height)
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        if not 0 < min_bitrate_bps <= max_bitrate_bps:
            raise ValueError(f"bad bitrate range [{min_bitrate_bps}, {max_bitrate_bps}]")
        if keyframe_interval_frames < 1:
            raise ValueError(f"keyframe interval must be >= 1, got {keyframe_interval_frames}")
        self.width, self.height, self.fps = width, height, fps
        self.min_bitrate_bps = min_bitrate_bps
        self.max_bitrate_bps = max_bitrate_bps
        self.keyframe_interval_frames = keyframe_interval_frames
        self.hardware: Hardware = hardware
        #: The target; the running context may still be at ``_context_bitrate_bps``.
        self.bitrate_bps = self._clamp(bitrate_bps)
        self._context: VideoCodecContext | None = None
        self._context_bitrate_bps = 0
        self._frame_index = 0
        self._force_keyframe = False
        #: Caller pts by encoder frame index, for frames not yet out of the encoder.
        self._pending_pts: dict[int, int] = {}
        logger.debug("encoding %s %dx%d@%d", codec, width, height, fps)

    def _clamp(self, bitrate_bps: int) -> int:
        return max(self.min_bitrate_bps, min(int(bitrate_bps), self.max_bitrate_bps))

    def request_keyframe(self) -> None:
        """Make the next encoded frame a keyframe (on RTCP PLI or FIR)."""
        self._force_keyframe = True

    def set_bitrate(self, bitrate_bps: int) -> int:
        """Set the target bitrate (e.g. from REMB); returns it after clamping.

        Takes effect at the next frame if it differs from the running encoder's by more than
        10%, by recreating the encoder (that frame is then a keyframe).
        """
        self.bitrate_bps = self._clamp(bitrate_bps)
        return self.bitrate_bps

    def encode(
        self, rgb: np.ndarray, pts: int, force_keyframe: bool = False
    ) -> list[EncodedPacket]:
        """Encode one (H, W, 3) uint8 RGB frame; ``pts`` in 1/90000 s.

        A frame of another size is scaled to the session's. Returns the packets the frame
        completes: one with these real-time settings (none only if the encoder dropped the
        frame).
        """
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
        context = self._current_context()

        try:
            frame = VideoFrame.from_numpy_buffer(rgb, format="rgb24")
        except ValueError:  # rows not contiguous
            frame = VideoFrame.from_numpy_buffer(np.ascontiguousarray(rgb), format="rgb24")
        index = self._frame_index
        self._frame_index += 1
        frame.pts = index
        frame.time_base = context.time_base
        if force_keyframe or self._force_keyframe:
            frame.pict_type = PictureType.I
            self._force_keyframe = False
        else:
            frame.pict_type = PictureType.NONE
        self._pending_pts[index] = pts

        packets = []
        for packet in context.encode(frame):
            packet_index = packet.pts if packet.pts is not None else index
            packet_pts = self._pending_pts.pop(packet_index, pts)
            packets.append(
                EncodedPacket(data=bytes(packet), pts=packet_pts, keyframe=packet.is_keyframe)
            )
        # Frames the encoder dropped never come out: forget the oldest.
        while len(self._pending_pts) > _PENDING_PTS_MAX:
            del self._pending_pts[next(iter(self._pending_pts))]
        return packets

    def _current_context(self) -> VideoCodecContext:
        context = self._context
        if context is not None and (
            abs(self.bitrate_bps - self._context_bitrate_bps) / self._context_bitrate_bps
            <= BITRATE_REOPEN_RATIO
        ):
            return context
        if context is not None:
            logger.debug(
                "bitrate %d -> %d bps, recreating the encoder",
                self._context_bitrate_bps,
                self.bitrate_bps,
            )
        context = self._create_context()
        self._context = context
        self._context_bitrate_bps = self.bitrate_bps
        self._pending_pts.clear()
        return context

    def _create_context(self) -> VideoCodecContext:
        bitrate = self.bitrate_bps
        if self.codec == "VP8":
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
                "level": _h264_level(self.width, self.height, self.fps),
                "forced-idr": "1",  # a forced keyframe is an IDR (SPS/PPS repeated)
                # A one-second VBV at the target rate, so the rate holds over short spans.
                "maxrate": str(bitrate),
                "bufsize": str(bitrate),
            }
        assert isinstance(context, VideoCodecContext)
        context.width = self.width
        context.height = self.height
        context.pix_fmt = "yuv420p"
        context.bit_rate = bitrate
        context.framerate = fractions.Fraction(self.fps, 1)
        context.time_base = fractions.Fraction(1, self.fps)
        context.gop_size = self.keyframe_interval_frames
        context.thread_count = _thread_count(self.width * self.height, os.cpu_count() or 1)
        context.options = options
        context.open()
        return context
