"""Encoded-frame passthrough for aiortc receivers: signalling forwards, decode decodes.

aiortc's ``RTCRtpReceiver`` reassembles RTP packets into encoded frames in its jitter buffer
(on the event loop), then puts ``(codec, JitterFrame)`` on a thread queue that a decoder thread
drains: it calls ``get_decoder(codec)`` and pushes decoded ``av.VideoFrame``s onto the track's
``asyncio.Queue``. signalling does no codec work, so this module cuts in at that thread queue::

    RTP packet ─▶ _handle_rtp_packet        wrapped: monotonic arrival stamp
               ─▶ jitter buffer .add        wrapped: first-packet arrival per RTP timestamp
               ─▶ decoder queue .put((codec, JitterFrame))
                  └ _ForwardingQueue: EncodedVideoFrame onto the track's asyncio.Queue
    track.recv() ─▶ EncodedVideoFrame       (the decoder thread idles until stop)

Why this hook and not a patched ``get_decoder``: the decoder thread looks ``get_decoder`` up in
the ``aiortc.rtcrtpreceiver`` module namespace, so swapping the decoder means a process-wide
monkeypatch that cannot tell receivers apart (it only sees the codec). Replacing the receiver's
own decoder queue is per receiver, skips the thread hop and never builds a decoder. The cost is
that it reaches name-mangled attributes of ``RTCRtpReceiver`` (``__decoder_queue``,
``__jitter_buffer``, ``__started``) plus ``_handle_rtp_packet`` / ``_send_rtcp_pli``; all exist
unchanged from aiortc 1.9 to 1.16, and :func:`forward_encoded` checks for them and fails with a
clear error. It must run before ``receiver.receive()`` starts the decoder thread, i.e. in the peer
connection's ``"track"`` handler or right after ``setRemoteDescription``.

Arrival time: aiortc stamps each datagram with ``clock.current_ms()`` (wall clock, ms). We wrap
the receiver's ``_handle_rtp_packet`` (the transport calls it straight after SRTP decryption)
and take ``time.monotonic_ns()`` on entry; the jitter-buffer wrapper keeps the earliest stamp
per RTP timestamp, so ``arrival_ns`` is the arrival of the frame's first packet to arrive.

aiortc's track queue is unbounded (aiortc #642, #1192): whoever holds the track must drain it
continuously. :func:`start_drain` does that, handing each frame to a synchronous callback.
Frames are never dropped here (a dropped delta frame breaks decoding until the next keyframe);
dropping happens at the rings.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from services.codec_common import check_codec
from services.protocol import VideoCodec

logger = logging.getLogger(__name__)

# Frames whose first packet has arrived but which the jitter buffer has not emitted yet.
# A 512-packet jitter buffer holds far fewer distinct frames than this.
ARRIVAL_TRACKED_FRAMES = 256
# Lower bound between two PLIs sent upstream by one forwarder: a decoder that fails on every
# delta frame until the next keyframe must not turn into a PLI per frame.
PLI_MIN_INTERVAL_S = 0.25

_PRIVATE_RECEIVER_ATTRS = (
    "_RTCRtpReceiver__decoder_queue",
    "_RTCRtpReceiver__jitter_buffer",
    "_RTCRtpReceiver__started",
)


@dataclass(frozen=True, slots=True)
class EncodedVideoFrame:
    """One reassembled, still-encoded video frame as it came off the jitter buffer."""

    data: bytes
    """Depayloaded bitstream: a VP8 frame, or H264 NAL units in Annex B (start codes)."""
    timestamp: int
    """90 kHz, unwrapped; 0 at the first frame of the stream (aiortc's TimestampMapper)."""
    keyframe: bool
    codec: VideoCodec
    """Codec name as negotiated."""
    arrival_ns: int
    """``time.monotonic_ns()`` when the first RTP packet of this frame arrived."""


def is_keyframe(codec: str, data: bytes) -> bool:
    """Whether a depayloaded VP8 frame / Annex B H264 access unit starts a decodable sequence."""
    if not data:
        return False
    if codec == "VP8":
        # RFC 6386 9.1: frame tag bit 0 is 0 for key frames.
        return data[0] & 0x01 == 0
    if codec == "H264":
        pos = data.find(b"\x00\x00\x01")
        while pos != -1 and pos + 3 < len(data):
            if data[pos + 3] & 0x1F == 5:  # IDR slice
                return True
            pos = data.find(b"\x00\x00\x01", pos + 3)
        return False
    return False


def complete_on_marker(jitter_buffer: Any, packet: Any) -> JitterFrame | None:
    """The frame that is complete now because its last packet (RTP marker bit) is in.

    aiortc's jitter buffer hands a frame over only when the *next* frame's first packet
    arrives, which costs a whole frame interval (33 ms at 30 fps) of latency. The marker bit
    (RFC 7741 for VP8, RFC 6184 for H.264) says a frame is complete: when the packets from the
    buffer's origin are contiguous, of one timestamp, and end with a marker packet, take them out
    and hand the frame over at once (after ``packet`` filled a gap, too). Anything else is left
    to aiortc's own logic. Uses the buffer's private state: :func:`check_marker_completion`
    proves at start-up that this aiortc has it.
    """
    origin = jitter_buffer._origin
    slots = jitter_buffer._packets
    if origin is None or packet.timestamp is None:
        return None
    capacity = len(slots)
    run: list[Any] = []
    for count in range(capacity):
        queued = slots[(origin + count) % capacity]
        if queued is None or (run and queued.timestamp != run[0].timestamp):
            return None
        run.append(queued)
        if queued.marker:
            jitter_buffer.remove(count + 1)
            return JitterFrame(data=b"".join(p._data for p in run), timestamp=queued.timestamp)
    return None


def check_marker_completion() -> None:
    """Fail loudly when this aiortc's jitter buffer lacks what :func:`complete_on_marker`
    reads: without it every frame would silently wait a frame interval longer."""
    import aiortc
    from aiortc.jitterbuffer import JitterBuffer

    buffer = JitterBuffer(capacity=16, is_video=True)
    missing = [name for name in ("_origin", "_packets", "remove") if not hasattr(buffer, name)]
    if missing or not isinstance(getattr(buffer, "_packets", None), list):
        raise RuntimeError(
            f"aiortc {aiortc.__version__}: JitterBuffer lacks {missing or ['a list of _packets']}"
            ", which frame completion on the RTP marker bit needs (tested with 1.9-1.16)"
        )


class _ForwardingQueue(queue.Queue[Any]):
    """Stands in for the receiver's decoder queue: frames go to the track, ``None`` (stop)
    goes to the decoder thread so it exits and ends the track as usual."""

    def __init__(self, forwarder: EncodedFrameForwarder) -> None:
        super().__init__()
        self._forwarder = forwarder

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if item is None:
            super().put(None, block, timeout)
            return
        codec, jitter_frame = item
        # Negotiation admits only VP8 and H264 (signalling.sessions refuses other offers).
        self._forwarder._deliver(check_codec(codec.name), jitter_frame)


class EncodedFrameForwarder:
    """Per-receiver state installed by :func:`forward_encoded`."""

    def __init__(self, receiver: RTCRtpReceiver) -> None:
        self._receiver = receiver
        self._track_queue: asyncio.Queue[Any] = receiver._track._queue  # type: ignore[union-attr]
        self._arrivals: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._packet_arrival_ns = 0
        self._last_pli_ns = 0
        self.media_ssrc: int | None = None
        """SSRC of the media stream (RTX unwrapped) last seen; PLIs are addressed to it."""
        self.frames_forwarded = 0
        self.plis_sent = 0

    @property
    def receiver(self) -> RTCRtpReceiver:
        return self._receiver

    def backlog(self) -> int:
        """Frames waiting in aiortc's (unbounded) track queue."""
        return self._track_queue.qsize()

    def _install(self) -> None:
        receiver = self._receiver
        original_handle = receiver._handle_rtp_packet
        jitter_buffer = receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
        original_add = jitter_buffer.add

        async def handle_rtp_packet(packet: Any, arrival_time_ms: int) -> None:
            self._packet_arrival_ns = time.monotonic_ns()
            await original_handle(packet, arrival_time_ms=arrival_time_ms)

        def jitter_add(packet: Any) -> Any:
            self.media_ssrc = packet.ssrc
            if packet.timestamp not in self._arrivals:
                self._arrivals[packet.timestamp] = self._packet_arrival_ns
                if len(self._arrivals) > ARRIVAL_TRACKED_FRAMES:
                    self._arrivals.popitem(last=False)
            pli_flag, frame = original_add(packet)
            if frame is None:
                frame = complete_on_marker(jitter_buffer, packet)
            if frame is not None:
                frame.arrival_ns = self._arrivals.pop(frame.timestamp, self._packet_arrival_ns)
            return pli_flag, frame

        receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]
        jitter_buffer.add = jitter_add
        receiver._RTCRtpReceiver__decoder_queue = _ForwardingQueue(self)  # type: ignore[attr-defined]

    def _deliver(self, codec: VideoCodec, jitter_frame: Any) -> None:
        data = bytes(jitter_frame.data)
        frame = EncodedVideoFrame(
            data=data,
            timestamp=jitter_frame.timestamp,
            keyframe=is_keyframe(codec, data),
            codec=codec,
            arrival_ns=getattr(jitter_frame, "arrival_ns", self._packet_arrival_ns),
        )
        self.frames_forwarded += 1
        self._track_queue.put_nowait(frame)

    async def request_keyframe(self, *, force: bool = False) -> bool:
        """Send a PLI to the remote sender. Rate-limited to one per ``PLI_MIN_INTERVAL_S``
        unless ``force``; returns whether a PLI went out."""
        if self.media_ssrc is None:
            return False
        now = time.monotonic_ns()
        if not force and now - self._last_pli_ns < PLI_MIN_INTERVAL_S * 1e9:
            return False
        self._last_pli_ns = now
        self.plis_sent += 1
        await self._receiver._send_rtcp_pli(self.media_ssrc)
        return True


_FORWARDER_ATTR = "_dreamwire_forwarder"


def forward_encoded(receiver: RTCRtpReceiver) -> EncodedFrameForwarder:
    """Make ``receiver.track.recv()`` return :class:`EncodedVideoFrame` instead of decoded frames.

    Call before the receiver starts (in the ``"track"`` handler, or after
    ``setRemoteDescription``). Idempotent: a second call returns the same forwarder.
    """
    existing = getattr(receiver, _FORWARDER_ATTR, None)
    if existing is not None:
        return existing
    missing = [name for name in _PRIVATE_RECEIVER_ATTRS if not hasattr(receiver, name)]
    if missing or not hasattr(receiver, "_send_rtcp_pli"):
        import aiortc

        raise RuntimeError(
            f"aiortc {aiortc.__version__} is not supported by encoded-frame forwarding "
            f"(RTCRtpReceiver lacks {missing or ['_send_rtcp_pli']}); tested with 1.9-1.16"
        )
    if receiver._RTCRtpReceiver__started:  # type: ignore[attr-defined]
        raise RuntimeError("forward_encoded() must run before the receiver starts")
    if receiver.track is None or receiver.track.kind != "video":
        raise ValueError("forward_encoded() needs a video receiver")
    forwarder = EncodedFrameForwarder(receiver)
    forwarder._install()
    setattr(receiver, _FORWARDER_ATTR, forwarder)
    return forwarder


def forwarder_of(receiver: RTCRtpReceiver) -> EncodedFrameForwarder | None:
    return getattr(receiver, _FORWARDER_ATTR, None)


async def request_keyframe_upstream(receiver: RTCRtpReceiver, *, force: bool = False) -> bool:
    """Ask the remote sender for a keyframe (RTCP PLI), e.g. when decode cannot decode.

    Works for receivers set up with :func:`forward_encoded` (which know the media SSRC).
    Returns whether a PLI was sent (False before the first packet or when rate-limited).
    """
    forwarder = forwarder_of(receiver)
    if forwarder is None:
        raise ValueError("receiver was not set up with forward_encoded()")
    return await forwarder.request_keyframe(force=force)


async def receive_encoded(track: MediaStreamTrack) -> AsyncIterator[EncodedVideoFrame]:
    """Yield encoded frames from a forwarded track until it ends."""
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        if not isinstance(frame, EncodedVideoFrame):
            raise TypeError("track is not forwarding encoded frames (see forward_encoded)")
        yield frame


class FrameDrain:
    """A task that empties a forwarded track's queue into a callback as frames arrive."""

    def __init__(
        self,
        track: MediaStreamTrack,
        on_frame: Callable[[EncodedVideoFrame], None],
        *,
        name: str,
    ) -> None:
        self._track = track
        self._on_frame = on_frame
        self.frames = 0
        self.max_backlog = 0
        """Most frames seen waiting in aiortc's queue when one was taken (observability)."""
        self.task: asyncio.Task[None] = asyncio.create_task(self._run(), name=name)

    async def _run(self) -> None:
        track_queue: asyncio.Queue[Any] | None = getattr(self._track, "_queue", None)
        async for frame in receive_encoded(self._track):
            if track_queue is not None:
                self.max_backlog = max(self.max_backlog, track_queue.qsize())
            self.frames += 1
            try:
                self._on_frame(frame)
            except Exception:
                logger.exception("encoded-frame callback failed; frame dropped")

    async def stop(self) -> None:
        """Cancel the task and wait for it; safe to call twice."""
        if not self.task.done():
            self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def start_drain(
    track: MediaStreamTrack,
    on_frame: Callable[[EncodedVideoFrame], None],
    *,
    name: str = "webrtc.drain",
) -> FrameDrain:
    """Start draining ``track`` (set up with :func:`forward_encoded`) into ``on_frame``.

    ``on_frame`` is synchronous and must not block (e.g. a non-blocking ZeroMQ send): the
    task takes the next frame as soon as the callback returns, so aiortc's queue only holds
    what arrived while the event loop was busy elsewhere. The task ends when the track ends.
    """
    return FrameDrain(track, on_frame, name=name)
