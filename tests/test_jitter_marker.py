"""Frames leave aiortc's jitter buffer on their RTP marker bit, not a frame interval later."""

from __future__ import annotations

from typing import Any

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


def test_missing_internals_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiortc import jitterbuffer

    from signalling.webrtc.forwarding import check_marker_completion

    check_marker_completion()  # this aiortc has them

    class Changed:  # an aiortc whose jitter buffer keeps its packets elsewhere
        def __init__(self, capacity: int, is_video: bool = False) -> None:
            self._queue: list[object] = []

    monkeypatch.setattr(jitterbuffer, "JitterBuffer", Changed)
    with pytest.raises(RuntimeError, match="frame completion on the RTP marker bit"):
        check_marker_completion()


async def test_a_live_receiver_hands_a_frame_over_on_its_marker_packet() -> None:
    """A real aiortc receiver, negotiated and connected, fed RTP packets by the test: the frame
    leaves on its marker packet, before any packet of the next frame exists."""
    import asyncio

    from aiortc import RTCConfiguration, RTCPeerConnection, VideoStreamTrack

    from signalling.webrtc import forward_encoded, receive_encoded

    class Silent(VideoStreamTrack):
        async def recv(self) -> Any:
            await asyncio.Event().wait()  # never sends: the test sends the packets
            raise AssertionError

    pc_a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc_b = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc_a.addTransceiver(Silent(), direction="sendonly")
        tb = pc_b.addTransceiver("video", direction="recvonly")
        await pc_a.setLocalDescription(await pc_a.createOffer())
        await pc_b.setRemoteDescription(pc_a.localDescription)
        forward_encoded(tb.receiver)
        await pc_b.setLocalDescription(await pc_b.createAnswer())
        await pc_a.setRemoteDescription(pc_b.localDescription)
        for _ in range(100):  # the receiver takes its codecs once connected (10 s at most)
            if tb.receiver._RTCRtpReceiver__codecs:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.1)
        vp8 = next(c for c in tb.receiver._RTCRtpReceiver__codecs.values() if c.name == "VP8")  # type: ignore[attr-defined]
        frames = receive_encoded(tb.receiver.track)

        async def feed(seq: int, timestamp: int, data: bytes, start: bool, marker: bool) -> None:
            p = RtpPacket(
                payload_type=vp8.payloadType,
                marker=int(marker),
                sequence_number=seq,
                timestamp=timestamp,
                ssrc=1234,
            )
            p.payload = bytes([0x10 if start else 0x00]) + data  # VP8 payload descriptor
            await tb.receiver._handle_rtp_packet(p, arrival_time_ms=0)

        await feed(100, 3000, b"\x00key", start=True, marker=False)
        await feed(101, 3000, b"frame", start=False, marker=True)
        first = await asyncio.wait_for(anext(frames), 5)
        assert first.data == b"\x00keyframe" and first.keyframe
        await feed(102, 6000, b"\x01dd", start=True, marker=True)
        second = await asyncio.wait_for(anext(frames), 5)
        assert second.data == b"\x01dd" and second.timestamp > first.timestamp
    finally:
        await pc_a.close()
        await pc_b.close()
