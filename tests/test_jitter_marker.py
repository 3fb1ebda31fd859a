"""Frames leave aiortc's jitter buffer on their RTP marker bit, not a frame interval later."""

from __future__ import annotations

import pytest
from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from signalling.webrtc.forwarding import complete_on_marker

pytestmark = pytest.mark.timeout(10)


def packet(seq: int, timestamp: int, payload: bytes, marker: bool) -> RtpPacket:
    p = RtpPacket(payload_type=96, marker=int(marker), sequence_number=seq, timestamp=timestamp)
    # What the receiver's depayloader leaves for the jitter buffer. RtpPacket does not declare
    # _data: aiortc attaches it dynamically (and type-ignores it in its own code too).
    p._data = payload  # type: ignore[attr-defined]
    return p


def add(buffer: JitterBuffer, p: RtpPacket) -> bytes | None:
    _, frame = buffer.add(p)
    if frame is None:
        frame = complete_on_marker(buffer, p)
    return None if frame is None else frame.data


def test_frame_completes_on_its_marker_packet() -> None:
    buffer = JitterBuffer(capacity=128, is_video=True)
    assert add(buffer, packet(10, 3000, b"ab", marker=False)) is None
    assert add(buffer, packet(11, 3000, b"cd", marker=True)) == b"abcd"
    # The next frame's first packet does not hand the previous one over a second time.
    assert add(buffer, packet(12, 6000, b"ef", marker=False)) is None
    assert add(buffer, packet(13, 6000, b"gh", marker=True)) == b"efgh"


def test_a_gap_waits_for_the_missing_packet() -> None:
    buffer = JitterBuffer(capacity=128, is_video=True)
    assert add(buffer, packet(20, 3000, b"ab", marker=False)) is None
    assert add(buffer, packet(22, 3000, b"ef", marker=True)) is None  # 21 is missing
    # The missing packet completes the frame at once; nothing is lost or doubled.
    assert add(buffer, packet(21, 3000, b"cd", marker=False)) == b"abcdef"
    assert add(buffer, packet(23, 6000, b"gh", marker=True)) == b"gh"
