"""Names shared by the decoder and the encoder."""

from __future__ import annotations

import fractions
import logging

from services.protocol import VideoCodec

logger = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
"""Time base of every ``pts`` the encoder and decoder take and return: the WebRTC video clock."""

CODEC_NAMES: tuple[VideoCodec, ...] = ("VP8", "H264")


def check_codec(codec: str) -> VideoCodec:
    """Return ``codec`` as a :data:`VideoCodec`, or raise ``ValueError``."""
    if codec == "VP8":
        return "VP8"
    if codec == "H264":
        return "H264"
    raise ValueError(f"unsupported codec {codec!r}, expected one of {CODEC_NAMES}")


def check_size(width: int, height: int) -> None:
    """Raise ``ValueError`` unless ``width`` x ``height`` is a valid 4:2:0 frame size."""
    if width <= 0 or height <= 0 or width % 2 or height % 2:
        raise ValueError(f"frame size must be positive and even, got {width}x{height}")
