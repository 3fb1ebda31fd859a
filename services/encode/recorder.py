"""Recording a session's output: the encoded packets as they leave, into a file (no second
encode). H.264 goes into MP4 (FFmpeg's muxer builds the ``avcC`` box from the first IDR's SPS
and PPS, which x264 repeats before every IDR); VP8 into WebM, its own container (VP8 in MP4 is
not a mapping players agree on).

A file starts at a keyframe (the encoder is asked for one when a recording starts), its
timestamps from zero. It ends when asked, when the session ends, or at a limit: its size, its
duration, or the disk's free space falling under a floor. Each packet is appended with PyAV's
``mux``, a buffered write; nothing here blocks on more than the file.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import av
import av.container
import av.error

from services.codec_common import VIDEO_TIME_BASE, VideoCodec
from services.encode.encoder import EncodedPacket

logger = logging.getLogger(__name__)

#: codec -> (container format, file suffix, PyAV codec name)
CONTAINERS: dict[VideoCodec, tuple[str, str, str]] = {
    "H264": ("mp4", ".mp4", "h264"),
    "VP8": ("webm", ".webm", "vp8"),
}
#: The disk's free space is looked at once a second of stream.
FREE_CHECK_TICKS = VIDEO_TIME_BASE.denominator


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int
    max_seconds: float
    #: Stop before the disk has less than this free.
    min_free_bytes: int


@dataclass(frozen=True, slots=True)
class Finished:
    path: Path
    frames: int
    size_bytes: int
    duration_s: float


class Recorder:
    """One file of one session's recording."""

    def __init__(
        self, path: Path, codec: VideoCodec, width: int, height: int, limits: Limits
    ) -> None:
        self.path = path
        self.codec = codec
        self.width, self.height = width, height
        self.limits = limits
        self.container: av.container.OutputContainer | None = None
        self.stream: av.VideoStream | None = None
        self.first_pts = 0
        self.last_pts = 0
        self.frames = 0
        self.bytes = 0
        self._free_checked_pts = 0

    def write(self, packet: EncodedPacket) -> str | None:
        """Append one packet (one before the first keyframe is skipped). A reason when the
        recording must end here (a limit, a write error); the packet is then not in it."""
        if self.container is None:
            if not packet.keyframe:
                return None
            try:
                self._open()
            except (OSError, av.error.FFmpegError) as exc:
                return f"cannot write {self.path.name}: {exc}"
            self.first_pts = self._free_checked_pts = packet.pts
        if reason := self._over_limit(packet):
            return reason
        assert self.container is not None and self.stream is not None
        out = av.Packet(packet.data)
        out.pts = out.dts = packet.pts - self.first_pts
        out.time_base = VIDEO_TIME_BASE
        out.is_keyframe = packet.keyframe
        out.stream = self.stream
        try:
            self.container.mux(out)
        except (OSError, av.error.FFmpegError) as exc:
            return f"writing {self.path.name} failed: {exc}"
        self.frames += 1
        self.bytes += len(packet.data)
        self.last_pts = packet.pts
        return None

    def _open(self) -> None:
        fmt, _, codec_name = CONTAINERS[self.codec]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(self.path), "w", format=fmt)
        stream = self.container.add_stream(codec_name)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = self.width, self.height
        stream.time_base = VIDEO_TIME_BASE
        self.stream = stream

    def _over_limit(self, packet: EncodedPacket) -> str | None:
        limits = self.limits
        if self.bytes + len(packet.data) > limits.max_bytes:
            return f"the recording reached its size limit ({limits.max_bytes / 2**20:.0f} MB)"
        if (packet.pts - self.first_pts) / VIDEO_TIME_BASE.denominator > limits.max_seconds:
            return f"the recording reached its time limit ({limits.max_seconds:g} s)"
        if packet.pts - self._free_checked_pts >= FREE_CHECK_TICKS:
            self._free_checked_pts = packet.pts
            stat = os.statvfs(self.path.parent)
            free = stat.f_bavail * stat.f_frsize
            if free < limits.min_free_bytes:
                return (
                    f"the disk is nearly full ({free / 2**20:.0f} MB free, the floor is "
                    f"{limits.min_free_bytes / 2**20:.0f} MB)"
                )
        return None

    def finish(self) -> Finished:
        """Close the file (MP4 writes its index here); what it holds."""
        if self.container is not None:
            try:
                self.container.close()
            except (OSError, av.error.FFmpegError) as exc:
                logger.warning("recording %s: closing failed: %s", self.path, exc)
            self.container = None
        size = self.path.stat().st_size if self.path.exists() else 0
        ticks = self.last_pts - self.first_pts if self.frames else 0
        # The last frame lasts one frame interval (the mean one so far).
        frame_s = ticks / max(self.frames - 1, 1) / VIDEO_TIME_BASE.denominator
        duration = ticks / VIDEO_TIME_BASE.denominator + (frame_s if self.frames > 1 else 0.0)
        return Finished(self.path, self.frames, size, round(duration, 3))


def file_suffix(codec: VideoCodec) -> str:
    return CONTAINERS[codec][1]
