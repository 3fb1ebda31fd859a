"""signalling.webrtc against real aiortc peer connections on loopback, real codecs."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import av
import numpy as np
import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpTransceiver,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError
from av.video.frame import PictureType

from signalling.webrtc import (
    EncodedVideoFrame,
    EncodedVideoTrack,
    KeyframeReason,
    forward_encoded,
    negotiated_video_codec,
    offered_video_codecs,
    prefer_video_codecs,
    receive_encoded,
    request_keyframe_upstream,
    start_drain,
    video_codec_preferences,
)
from signalling.webrtc.forwarding import is_keyframe

WIDTH, HEIGHT = 320, 240
BANDS = 8  # frame number bits, one vertical black/white band each
WAIT_S = 20.0


def pattern(number: int) -> np.ndarray:
    """RGB frame showing ``number % 256`` as 8 black/white vertical bands (MSB left)."""
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    band = WIDTH // BANDS
    for bit in range(BANDS):
        if (number >> (BANDS - 1 - bit)) & 1:
            image[:, bit * band : (bit + 1) * band] = 255
    return image


def read_pattern(image: np.ndarray) -> int:
    band = WIDTH // BANDS
    number = 0
    for bit in range(BANDS):
        centre = image[
            HEIGHT // 4 : 3 * HEIGHT // 4, bit * band + band // 4 : (bit + 1) * band - band // 4
        ]
        number = (number << 1) | int(centre.mean() > 128)
    return number


class PatternTrack(VideoStreamTrack):
    """Real frames for aiortc to encode: frame n shows n."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(pattern(self.count), format="rgb24")
        frame.pts = pts
        frame.time_base = time_base
        self.count += 1
        return frame


def new_pc() -> RTCPeerConnection:
    # No STUN: loopback host candidates only.
    return RTCPeerConnection(RTCConfiguration(iceServers=[]))


@contextlib.asynccontextmanager
async def peers() -> AsyncIterator[tuple[RTCPeerConnection, RTCPeerConnection]]:
    pc_a, pc_b = new_pc(), new_pc()
    try:
        yield pc_a, pc_b
    finally:
        await pc_a.close()
        await pc_b.close()


async def negotiate(
    pc_a: RTCPeerConnection,
    pc_b: RTCPeerConnection,
    before_remote: Callable[[str], object] = lambda sdp: None,
    after_remote: Callable[[], object] = lambda: None,
) -> None:
    """A offers, B answers (the server side: hooks run around B's setRemoteDescription)."""
    await pc_a.setLocalDescription(await pc_a.createOffer())
    before_remote(pc_a.localDescription.sdp)
    await pc_b.setRemoteDescription(pc_a.localDescription)
    after_remote()
    await pc_b.setLocalDescription(await pc_b.createAnswer())
    await pc_a.setRemoteDescription(pc_b.localDescription)


async def wait_for(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def other(codec: str) -> str:
    return "H264" if codec == "VP8" else "VP8"


class PacketProducer:
    """Stands in for the encode process: PyAV-encodes pattern frames into an EncodedVideoTrack,
    honouring keyframe requests, pts from the monotonic clock (capture time)."""

    def __init__(self, codec: str, track: EncodedVideoTrack) -> None:
        name = "libvpx" if codec == "VP8" else "libx264"
        self.encoder = cast(av.VideoCodecContext, av.CodecContext.create(name, "w"))
        self.encoder.width, self.encoder.height = WIDTH, HEIGHT
        self.encoder.pix_fmt = "yuv420p"
        self.encoder.time_base = fractions.Fraction(1, 90_000)
        self.encoder.framerate = fractions.Fraction(30, 1)
        self.encoder.bit_rate = 1_000_000
        self.encoder.gop_size = 3000  # keyframes only when asked
        if codec == "VP8":
            self.encoder.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0"}
        else:
            self.encoder.options = {
                "preset": "ultrafast",
                "tune": "zerolatency",
                "profile": "baseline",
            }
        self.track = track
        self.keyframe_wanted = False
        self.requests: list[KeyframeReason] = []
        self.keyframes_pushed = 0
        track.on_keyframe_request = self._on_request
        self.task = asyncio.create_task(self._run(), name="test.producer")

    def _on_request(self, reason: KeyframeReason) -> None:
        self.requests.append(reason)
        self.keyframe_wanted = True

    async def _run(self) -> None:
        number = 0
        while True:
            frame = av.VideoFrame.from_ndarray(pattern(number), format="rgb24").reformat(
                format="yuv420p"
            )
            frame.pts = time.monotonic_ns() * 9 // 100_000  # 90 kHz capture time
            frame.time_base = fractions.Fraction(1, 90_000)
            if self.keyframe_wanted:
                frame.pict_type = PictureType.I
                self.keyframe_wanted = False
            for packet in self.encoder.encode(frame):
                assert packet.pts is not None
                self.keyframes_pushed += packet.is_keyframe
                self.track.push(bytes(packet), packet.pts, packet.is_keyframe)
            number += 1
            await asyncio.sleep(1 / 30)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def decode_numbers(codec: str, frames: list[EncodedVideoFrame]) -> list[int]:
    decoder = cast(av.VideoCodecContext, av.CodecContext.create(codec.lower(), "r"))
    numbers = []
    for encoded in frames:
        for frame in decoder.decode(av.Packet(encoded.data)):
            numbers.append(read_pattern(frame.to_ndarray(format="rgb24")))
    return numbers


async def with_timeout(awaitable: Awaitable[object]) -> object:
    return await asyncio.wait_for(awaitable, WAIT_S)


# -- (a) receive: aiortc encodes, the forwarding receiver hands over the bitstream ---------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_forwarded_frames_decode_to_what_was_sent(codec: str) -> None:
    async with peers() as (pc_a, pc_b):
        sender = PatternTrack()
        ta = pc_a.addTransceiver(sender, direction="sendonly")
        # The client offers both codecs, preferring `codec`.
        ta.setCodecPreferences(video_codec_preferences([codec, other(codec)]))
        tb: RTCRtpTransceiver = pc_b.addTransceiver("video", direction="recvonly")
        chosen: list[str] = []

        def before_remote(offer_sdp: str) -> None:
            assert offered_video_codecs(offer_sdp) == [codec, other(codec)]
            chosen.append(prefer_video_codecs(tb, offer_sdp))

        await negotiate(pc_a, pc_b, before_remote, lambda: forward_encoded(tb.receiver))
        assert chosen == [codec]
        negotiated = negotiated_video_codec(tb)
        assert negotiated is not None and negotiated.name == codec

        received: list[EncodedVideoFrame] = []

        async def collect() -> None:
            async for frame in receive_encoded(tb.receiver.track):
                received.append(frame)
                if len(received) == 20:
                    return

        await with_timeout(collect())
        now = time.monotonic_ns()

    assert all(f.codec == codec for f in received)
    assert received[0].keyframe
    timestamps = [f.timestamp for f in received]
    assert timestamps == sorted(timestamps) and len(set(timestamps)) == len(timestamps)
    arrivals = [f.arrival_ns for f in received]
    assert arrivals == sorted(arrivals) and 0 < arrivals[-1] <= now
    numbers = decode_numbers(codec, received)
    assert len(numbers) >= 15
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert numbers[-1] < sender.count


# -- (b) send: pre-encoded packets through EncodedVideoTrack, plain aiortc decodes -----------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_encoded_track_reaches_a_plain_receiver(codec: str) -> None:
    async with peers() as (pc_a, pc_b):
        bitrates: list[int] = []
        out = EncodedVideoTrack(on_bitrate=bitrates.append)
        ta = pc_a.addTransceiver(out, direction="sendonly")
        out.attach_sender(ta.sender)
        ta.setCodecPreferences(video_codec_preferences([other(codec), codec]))
        tb = pc_b.addTransceiver("video", direction="recvonly")
        # Server side prefers `codec` only (as if encode could only produce that).
        await negotiate(pc_a, pc_b, lambda sdp: prefer_video_codecs(tb, sdp, supported=[codec]))
        negotiated = negotiated_video_codec(ta)
        assert negotiated is not None and negotiated.name == codec

        producer = PacketProducer(codec, out)
        try:
            numbers: list[int] = []
            while len(numbers) < 15:
                frame = await with_timeout(tb.receiver.track.recv())
                assert isinstance(frame, av.VideoFrame)
                assert (frame.width, frame.height) == (WIDTH, HEIGHT)
                numbers.append(read_pattern(frame.to_ndarray(format="rgb24")))
            # aiortc's receiver estimates bandwidth (abs-send-time) and sends REMB.
            await wait_for(lambda: bool(bitrates), "REMB")
        finally:
            await producer.stop()

    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    assert out.packets_sent >= 15
    assert all(bps > 0 for bps in bitrates)


# -- (c) keyframe request: PLI from the receiving side reaches the producer -----------------


@pytest.mark.timeout(60)
async def test_pli_from_receiver_reaches_on_keyframe_request() -> None:
    async with peers() as (pc_a, pc_b):
        out = EncodedVideoTrack()
        ta = pc_a.addTransceiver(out, direction="sendonly")
        out.attach_sender(ta.sender)
        tb = pc_b.addTransceiver("video", direction="recvonly")
        await negotiate(pc_a, pc_b, after_remote=lambda: forward_encoded(tb.receiver))
        negotiated = negotiated_video_codec(ta)
        assert negotiated is not None
        producer = PacketProducer(negotiated.name, out)
        received: list[EncodedVideoFrame] = []
        drain = start_drain(tb.receiver.track, received.append, name="test.drain")
        try:
            await wait_for(lambda: len(received) >= 10, "frames before the PLI")
            assert received[0].keyframe and not any(f.keyframe for f in received[1:])
            assert producer.requests == []
            seen_before = len(received)

            assert await request_keyframe_upstream(tb.receiver)
            await wait_for(lambda: producer.requests == ["pli"], "on_keyframe_request('pli')")
            # The producer answered with a keyframe, and it came through.
            await wait_for(
                lambda: any(f.keyframe for f in received[seen_before:]), "the new keyframe"
            )
            # A second PLI right away is rate-limited upstream.
            assert not await request_keyframe_upstream(tb.receiver)
        finally:
            await producer.stop()
            await drain.stop()


# -- (d) the drain keeps aiortc's unbounded queue empty --------------------------------------


@pytest.mark.timeout(60)
async def test_drain_keeps_aiortc_queue_bounded() -> None:
    async with peers() as (pc_a, pc_b):
        pc_a.addTransceiver(PatternTrack(), direction="sendonly")
        tb = pc_b.addTransceiver("video", direction="recvonly")
        forwarders = []
        await negotiate(
            pc_a, pc_b, after_remote=lambda: forwarders.append(forward_encoded(tb.receiver))
        )
        forwarder = forwarders[0]
        assert forward_encoded(tb.receiver) is forwarder  # idempotent

        # Nobody reading: aiortc's queue grows without bound (the problem being solved).
        await wait_for(lambda: forwarder.backlog() >= 8, "an undrained backlog")

        frames: list[EncodedVideoFrame] = []
        backlog_seen: list[int] = []

        def on_frame(frame: EncodedVideoFrame) -> None:
            frames.append(frame)
            backlog_seen.append(forwarder.backlog())

        drain = start_drain(tb.receiver.track, on_frame, name="test.drain")
        try:
            await wait_for(lambda: forwarder.backlog() == 0, "the backlog to be drained")
            start = len(frames)
            await wait_for(lambda: len(frames) >= start + 45, "45 more frames")
            assert max(backlog_seen[start + 1 :]) <= 2
            assert forwarder.backlog() <= 2
            assert drain.frames == len(frames)
        finally:
            await drain.stop()
            await drain.stop()  # idempotent

    assert frames[0].keyframe
    numbers = decode_numbers("VP8", frames)  # nothing dropped: the whole run decodes
    assert len(numbers) == len(frames)
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


# -- no-network unit checks -----------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_encoded_track_never_sends_an_undecodable_stream() -> None:
    requests: list[KeyframeReason] = []
    track = EncodedVideoTrack(on_keyframe_request=requests.append, max_queued=2)
    assert not track.push(b"delta", 0, keyframe=False)  # nothing to decode it against
    assert requests == ["start"]
    assert track.push(b"key", 3000, keyframe=True)
    assert track.push(b"d1", 6000, keyframe=False)
    assert not track.push(b"d2", 9000, keyframe=False)  # full: drop, wait for a keyframe
    assert requests == ["start", "overflow"]
    packet = await track.recv()
    assert (bytes(packet), packet.pts, packet.is_keyframe) == (b"key", 3000, True)
    assert packet.time_base == fractions.Fraction(1, 90_000)
    assert not track.push(b"d3", 12000, keyframe=False)  # room again, but d2 is gone
    assert requests == ["start", "overflow"]  # coalesced: one outstanding request
    assert track.push(b"key2", 15000, keyframe=True)  # supersedes d1
    assert track.queued() == 1 and track.packets_dropped == 4
    assert bytes(await track.recv()) == b"key2"
    track.stop()
    track.stop()
    with pytest.raises(MediaStreamError):
        await track.recv()


def test_keyframe_detection_and_offer_order() -> None:
    assert is_keyframe("VP8", bytes([0x10, 0x02, 0x00]))
    assert not is_keyframe("VP8", bytes([0x11, 0x02, 0x00]))
    assert is_keyframe("H264", b"\x00\x00\x00\x01\x67\x42\x00\x00\x00\x01\x65\x88")
    assert not is_keyframe("H264", b"\x00\x00\x00\x01\x41\x9a")
    # m= order says H264 first even though VP8's rtpmap line comes first.
    sdp = (
        "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
        "m=video 9 UDP/TLS/RTP/SAVPF 102 96 97\r\nc=IN IP4 0.0.0.0\r\n"
        "a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n"
        "a=rtpmap:102 H264/90000\r\n"
        "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f\r\n"
    )
    assert offered_video_codecs(sdp) == ["H264", "VP8"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_a_preferred_codec_wins_when_the_client_offers_it(codec: str) -> None:
    """``[api] video_codec``: the server's choice when offered, the client's order otherwise."""
    preferred = other(codec)
    async with peers() as (pc_a, pc_b):
        ta = pc_a.addTransceiver(PatternTrack(), direction="sendonly")
        ta.setCodecPreferences(video_codec_preferences([codec, preferred]))
        tb: RTCRtpTransceiver = pc_b.addTransceiver("video", direction="recvonly")
        chosen: list[str] = []

        def before_remote(offer_sdp: str) -> None:
            chosen.append(prefer_video_codecs(tb, offer_sdp, preferred=preferred))

        await negotiate(pc_a, pc_b, before_remote, lambda: forward_encoded(tb.receiver))
        negotiated = negotiated_video_codec(tb)
        assert chosen == [preferred] and negotiated is not None and negotiated.name == preferred
    async with peers() as (pc_a, pc_b):  # not offered: the client's codec, no error
        ta = pc_a.addTransceiver(PatternTrack(), direction="sendonly")
        ta.setCodecPreferences(video_codec_preferences([codec]))
        tb = pc_b.addTransceiver("video", direction="recvonly")
        await negotiate(
            pc_a,
            pc_b,
            lambda sdp: chosen.append(prefer_video_codecs(tb, sdp, preferred=preferred)),
            lambda: forward_encoded(tb.receiver),
        )
        assert chosen[-1] == codec
