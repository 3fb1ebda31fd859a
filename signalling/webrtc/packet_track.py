"""An outgoing video track of packets encoded elsewhere (the encode process).

``RTCRtpSender`` only packetizes what a track's ``recv()`` returns when it is an ``av.Packet``
(``encoder.pack``: VP8 payload descriptors, H264 FU-A/STAP-A from an Annex B bitstream); it
never encodes. The RTP timestamp is the packet's own ``pts`` (90 kHz), so output timing follows
the frames' capture times, not aiortc's 30 fps ``VideoStreamTrack`` pacing.

Queueing: latest wins, bounded by ``max_queued``. Dropping a delta frame would leave the remote
decoder broken until the next keyframe, so the track never sends a stream with a hole in it::

    push(keyframe)          -> everything queued is superseded: queue = [keyframe]
    push(delta), queue full -> drop it, wait for a keyframe, ask the producer for one
    push(delta) while waiting for a keyframe (also at start) -> drop, ask for a keyframe

Feedback from the remote receiver (PLI, FIR, NACKs for packets no longer in the sender's
history, REMB) reaches ``on_keyframe_request(reason)`` / ``on_bitrate(bps)`` once the track is
attached to its sender with :meth:`EncodedVideoTrack.attach_sender`, which wraps that sender's
``_handle_rtcp_packet`` (aiortc's own handling still runs afterwards). Keyframe requests are
coalesced: while one is outstanding (no keyframe pushed since) another is only passed on after
``KEYFRAME_REQUEST_RETRY_S``.

Departure (for the metrics): ``push(..., on_done=cb)`` calls ``cb(True)`` once the frame's RTP
packets have all been handed to the transport, and ``cb(False)`` if the frame is dropped after
being queued (superseded by a keyframe, or the track stopped). aiortc's sender loop is
``recv()`` → packetize → ``await _send_rtp`` for each packet → ``recv()`` again, so the next
``recv()`` call is the moment the previous frame left.
"""

from __future__ import annotations

import asyncio
import collections
import fractions
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import av
from aiortc import RTCRtpSender
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import (
    RTCP_PSFB_APP,
    RTCP_PSFB_FIR,
    RTCP_PSFB_PLI,
    RTCP_RTPFB_NACK,
    RTP_HISTORY_SIZE,
    RtcpPsfbPacket,
    RtcpRtpfbPacket,
    unpack_remb_fci,
)

logger = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)
MAX_QUEUED_PACKETS = 4
KEYFRAME_REQUEST_RETRY_S = 0.5

KeyframeReason = Literal["start", "overflow", "pli", "fir", "nack"]
OnDone = Callable[[bool], None]


def _call(on_done: OnDone | None, sent: bool) -> None:
    if on_done is None:
        return
    try:
        on_done(sent)
    except Exception:
        logger.exception("on_done callback failed")


class EncodedVideoTrack(MediaStreamTrack):
    """A video track whose ``recv()`` returns pre-encoded ``av.Packet``s given to :meth:`push`."""

    kind = "video"

    def __init__(
        self,
        *,
        on_keyframe_request: Callable[[KeyframeReason], None] | None = None,
        on_bitrate: Callable[[int], None] | None = None,
        max_queued: int = MAX_QUEUED_PACKETS,
    ) -> None:
        super().__init__()
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        self.on_keyframe_request = on_keyframe_request
        self.on_bitrate = on_bitrate
        self._max_queued = max_queued
        self._queue: collections.deque[tuple[av.Packet, OnDone | None]] = collections.deque()
        self._in_flight: OnDone | None = None  # on_done of the frame being sent
        self._ready = asyncio.Event()
        self._waiting_for_keyframe = True
        self._keyframe_seen = False
        self._request_pending_since_ns: int | None = None
        self.packets_pushed = 0
        self.packets_sent = 0
        self.packets_dropped = 0
        self.keyframe_requests = 0

    # -- producer side -------------------------------------------------------------------

    def push(self, data: bytes, pts: int, keyframe: bool, on_done: OnDone | None = None) -> bool:
        """Queue one encoded frame (``pts`` in 90 kHz units). Call from the event loop.

        Returns False when the frame was dropped (a keyframe request has then been made).
        ``on_done`` (only for a queued frame) learns whether it was sent: see the module doc.
        """
        if self.readyState != "live":
            return False
        self.packets_pushed += 1
        if keyframe:
            self.packets_dropped += len(self._queue)
            self._discard_queue()
            self._waiting_for_keyframe = False
            self._keyframe_seen = True
            self._request_pending_since_ns = None
        elif self._waiting_for_keyframe or len(self._queue) >= self._max_queued:
            self.packets_dropped += 1
            reason: KeyframeReason = "overflow" if self._keyframe_seen else "start"
            self._waiting_for_keyframe = True
            self.request_keyframe(reason)
            return False
        packet = av.Packet(data)
        packet.pts = pts
        packet.dts = pts
        packet.time_base = VIDEO_TIME_BASE
        packet.is_keyframe = keyframe
        self._queue.append((packet, on_done))
        self._ready.set()
        return True

    def queued(self) -> int:
        return len(self._queue)

    # -- aiortc side ---------------------------------------------------------------------

    async def recv(self) -> av.Packet:
        self._done_in_flight(True)  # the sender is back: the previous frame is out
        while not self._queue:
            if self.readyState != "live":
                raise MediaStreamError
            self._ready.clear()
            await self._ready.wait()
        if self.readyState != "live":
            raise MediaStreamError
        self.packets_sent += 1
        packet, self._in_flight = self._queue.popleft()
        return packet

    def stop(self) -> None:
        super().stop()
        self._discard_queue()
        self._done_in_flight(False)
        self._ready.set()

    def _discard_queue(self) -> None:
        queued = list(self._queue)
        self._queue.clear()
        for _, on_done in queued:
            _call(on_done, False)

    def _done_in_flight(self, sent: bool) -> None:
        on_done, self._in_flight = self._in_flight, None
        _call(on_done, sent)

    def request_keyframe(self, reason: KeyframeReason) -> bool:
        """Pass a keyframe request to the producer unless one is already outstanding."""
        now = time.monotonic_ns()
        pending = self._request_pending_since_ns
        if pending is not None and now - pending < KEYFRAME_REQUEST_RETRY_S * 1e9:
            return False
        self._request_pending_since_ns = now
        self.keyframe_requests += 1
        if self.on_keyframe_request is not None:
            try:
                self.on_keyframe_request(reason)
            except Exception:
                logger.exception("on_keyframe_request callback failed")
        return True

    def attach_sender(self, sender: RTCRtpSender) -> None:
        """Route ``sender``'s RTCP feedback (PLI/FIR/NACK/REMB) to this track's callbacks.

        Call once the sender exists (after ``addTrack``/``addTransceiver``); idempotent.
        """
        if getattr(sender, "_dreamwire_feedback", None) is self:
            return
        original = sender._handle_rtcp_packet
        # aiortc keeps the last RTP_HISTORY_SIZE packets for retransmission; a NACK for one
        # that is gone cannot be repaired. Without this (private) map, NACKs are left alone.
        history: dict[int, Any] | None = getattr(sender, "_RTCRtpSender__rtp_history", None)

        async def handle_rtcp_packet(packet: Any) -> None:
            try:
                self._on_rtcp(sender, packet, history)
            except Exception:
                logger.exception("RTCP feedback handling failed")
            await original(packet)

        sender._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]
        sender._dreamwire_feedback = self  # type: ignore[attr-defined]

    def _on_rtcp(self, sender: RTCRtpSender, packet: Any, history: dict[int, Any] | None) -> None:
        if isinstance(packet, RtcpPsfbPacket):
            if packet.fmt == RTCP_PSFB_PLI:
                self.request_keyframe("pli")
            elif packet.fmt == RTCP_PSFB_FIR:
                self.request_keyframe("fir")
            elif packet.fmt == RTCP_PSFB_APP and self.on_bitrate is not None:
                try:
                    bitrate, ssrcs = unpack_remb_fci(packet.fci)
                except ValueError:
                    return
                if sender._ssrc in ssrcs:
                    self.on_bitrate(bitrate)
        elif (
            isinstance(packet, RtcpRtpfbPacket)
            and packet.fmt == RTCP_RTPFB_NACK
            and history is not None
        ):
            for seq in packet.lost:
                kept = history.get(seq % RTP_HISTORY_SIZE)
                if kept is None or kept.sequence_number != seq:
                    self.request_keyframe("nack")
                    break
