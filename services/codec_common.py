"""Names shared by the decode and encode cores."""

from __future__ import annotations

import fractions
import logging
from typing import Generic, TypeVar

from services.protocol import VideoCodec

logger = logging.getLogger(__name__)
T = TypeVar("T")

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
"""Time base of every ``pts`` the cores take and return: the WebRTC video RTP clock."""

CODEC_NAMES: tuple[VideoCodec, ...] = ("VP8", "H264")


class UnknownSession(KeyError):
    """A session id that was never opened, or was closed."""

    def __init__(self, session_id: str) -> None:
        super().__init__(session_id)
        self.session_id = session_id

    def __str__(self) -> str:
        return f"unknown session {self.session_id!r}"


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


class PerSession(Generic[T]):
    """Per-session codec state, shared bookkeeping of the decode and encode cores."""

    #: What one session holds, for the log ("decoder", "encoder").
    holds = "codec"

    def __init__(self) -> None:
        self._sessions: dict[str, T] = {}

    def close_session(self, session_id: str) -> None:
        """Free the session's state. Closing an unknown or closed session does nothing."""
        if self._sessions.pop(session_id, None) is not None:
            logger.debug("session %s: %s closed", session_id, self.holds)

    def close(self) -> None:
        """Close every session."""
        for session_id in list(self._sessions):
            self.close_session(session_id)

    def sessions(self) -> list[str]:
        return list(self._sessions)

    def _session(self, session_id: str) -> T:
        try:
            return self._sessions[session_id]
        except KeyError:
            raise UnknownSession(session_id) from None
