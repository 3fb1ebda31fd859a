"""Names shared by the decode and encode cores."""

from __future__ import annotations

import fractions
from typing import Literal

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
"""Time base of every ``pts`` the cores take and return: the WebRTC video RTP clock."""

CodecName = Literal["VP8", "H264"]
"""Codec names as WebRTC (and aiortc's ``RTCRtpCodecParameters.name``) spells them."""

CODEC_NAMES: tuple[CodecName, ...] = ("VP8", "H264")


class UnknownSession(KeyError):
    """A session id that was never opened, or was closed."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r}"


def check_codec(codec: str) -> CodecName:
    """Return ``codec`` as a :data:`CodecName`, or raise ``ValueError``."""
    if codec == "VP8":
        return "VP8"
    if codec == "H264":
        return "H264"
    raise ValueError(f"unsupported codec {codec!r}, expected one of {CODEC_NAMES}")


def check_size(width: int, height: int) -> None:
    """Raise ``ValueError`` unless ``width`` x ``height`` is a valid 4:2:0 frame size."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"frame size must be positive and even, got {width}x{height}")
