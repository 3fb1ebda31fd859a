"""WebRTC sessions: one RTCPeerConnection each, wired to the media stages.

signalling does no codec work. Incoming video leaves aiortc as encoded frames (see
``signalling.webrtc.forwarding``) and goes to ``decode``; outgoing video arrives from ``encode``
as packets that an :class:`~signalling.webrtc.EncodedVideoTrack` hands to aiortc's sender.
Keyframe requests and bitrate estimates go the other way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCPeerConnection,
    RTCRtpTransceiver,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp

from services import protocol as p
from services import topology
from services.codec_common import check_codec
from services.inference.catalog import ParameterError, PipelineCatalog
from signalling.api.types import IceCandidate
from signalling.links import AsyncOutbox
from signalling.metrics import MetricsAggregator
from signalling.webrtc import (
    EncodedVideoFrame,
    EncodedVideoTrack,
    FrameDrain,
    forward_encoded,
    negotiated_video_codec,
    prefer_video_codecs,
    request_keyframe_upstream,
    start_drain,
)

logger = logging.getLogger(__name__)

PARAMETERS_CHANNEL = "parameters"
STOPPED_LINGER_S = 2.0


#: The max-message-size this server's SCTP transport (aiortc's) advertises in its answer.
MAX_MESSAGE_BYTES = 256 * 1024


def parse_parameters_message(raw: str | bytes) -> dict[str, Any]:
    """Decode a data-channel message into a dict, or raise ParameterError naming the problem.
    A message over the advertised size is refused unread (a peer that ignores the limit)."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise ParameterError(
            f"message: {len(raw)} bytes, over the {MAX_MESSAGE_BYTES} bytes this server accepts "
            "(its max-message-size)"
        )
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ParameterError(f"message: not JSON ({exc})") from None
    except RecursionError:
        raise ParameterError("message: nested too deeply") from None
    if not isinstance(value, dict):
        raise ParameterError(f"message: expected a JSON object, got {type(value).__name__}")
    return value


@dataclass
class PeerSession:
    """A client's session as signalling keeps it: the peer connection, its track and channel,
    and the stages its frames pass (planned by the supervisor)."""

    session_id: str
    pipeline_id: str
    mode: p.Mode
    pc: RTCPeerConnection
    track: EncodedVideoTrack
    transceiver: RTCRtpTransceiver
    stages: list[str]
    pipeline_ids: tuple[str, ...] = ()
    #: Scope 0.2's graph node ids -> pipeline ids (per-node ``node_id`` messages).
    nodes: dict[str, str] = field(default_factory=dict)
    #: Its graph's record nodes (the ``node_id`` of their recording requests).
    record_nodes: frozenset[str] = frozenset()
    #: Ignored parameter names already reported to the client (once each).
    reported: set[str] = field(default_factory=set)
    codec: p.VideoCodec = "VP8"
    channel: RTCDataChannel | None = None
    drain: FrameDrain | None = None
    packets_out: int = 0
    frames_in: int = 0
    created: float = field(default_factory=time.monotonic)
    closed: bool = False
    #: Registered while it opens (its offer still holds a reserved slot: counted once).
    opening: bool = True
    #: Messages for the client queued before its data channel opened.
    pending_messages: list[str] = field(default_factory=list)
    #: Server-sent-event listeners of this session's results (``/api/v1/sessions/{id}/outputs``).
    output_listeners: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)

    @property
    def parameter_targets(self) -> tuple[str, ...]:
        """The processes that take the session's runtime parameters: those the supervisor
        placed its pipelines in (``inference/<id>@cuda:N`` with several GPUs, ``node/<name>/…``
        on a media node), in chain order."""
        media = (topology.DECODE, topology.ENCODE)
        return tuple(s for s in self.stages if topology.StageAddress.parse(s).process not in media)

    def stage(self, kind: str) -> str:
        """The session's decode or encode: here, or on the media node it was placed on."""
        return next(
            (s for s in self.stages if topology.StageAddress.parse(s).process == kind), kind
        )

    def publish_output(self, message: dict[str, Any] | None) -> None:
        """To every listener; one that lags loses its oldest message, never blocks us."""
        for queue in self.output_listeners:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(message)

    def send_message(self, message: dict[str, Any]) -> None:
        text = json.dumps(message)
        channel = self.channel
        if channel is not None and channel.readyState == "open":
            channel.send(text)
        else:
            self.pending_messages.append(text)


class Admin(Protocol):
    """The supervisor's admin requests (``signalling.links.AdminLink``)."""

    async def request(self, message: p.AdminRequest) -> p.AdminReply: ...


class SessionRefused(RuntimeError):
    """The supervisor would not open the session."""

    def __init__(self, reason: str, why: p.Refusal = "refused") -> None:
        super().__init__(reason)
        self.why = why


class SessionManager:
    """Creates, tracks and tears down sessions; routes media and messages for them."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        catalog: PipelineCatalog,
        admin: Admin,
        *,
        connect_timeout_s: float,
        ice_servers: list[RTCIceServer] | None = None,
        metrics: MetricsAggregator | None = None,
        video_codec: str = "offer",
    ) -> None:
        self.outbox = outbox
        #: The codec preferred when the client offers several (None: the client's order).
        self.preferred_codec = None if video_codec == "offer" else video_codec
        self.metrics = metrics or MetricsAggregator()  # per-stage latency (issue 5)
        self.catalog = catalog
        self.admin = admin
        self._ice_servers = ice_servers or []
        self.sessions: dict[str, PeerSession] = {}
        self.connect_timeout_s = connect_timeout_s
        #: Offers being negotiated: they hold a slot before they are sessions.
        self.reserved = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self.sessions)

    def reserve(self, limit: int) -> bool:
        """Take a slot for an offer, atomically (no await between the check and the take);
        :meth:`release` gives it back once the offer is a session or refused."""
        opened = sum(1 for s in self.sessions.values() if not s.opening)
        if opened + self.reserved >= limit:
            return False
        self.reserved += 1
        return True

    def release(self) -> None:
        self.reserved -= 1

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _close_unconnected(self, session: PeerSession) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if not session.closed and session.pc.connectionState != "connected":
            logger.warning(
                "session %s: not connected %.0f s after its answer; closed",
                session.session_id,
                self.connect_timeout_s,
            )
            await self.close(session.session_id)

    # ------------------------------------------------------------------ create

    async def create(
        self,
        sdp: str,
        asked: tuple[str, ...] | None,
        modes: list[p.Mode],
        initial_params: dict[str, Any],
        *,
        nodes: dict[str, str] | None = None,
        record_nodes: frozenset[str] = frozenset(),
    ) -> tuple[str, RTCSessionDescription]:
        """Negotiate, open the session (one request: the supervisor plans its chain and
        settles its size, mode and parameters) and answer. Raises ValueError for a bad offer,
        :class:`SessionRefused` when the supervisor refuses.

        ``asked``: the pipelines the client named (None: the loaded ones); ``modes``: the
        modes its offer allows, preferred first (:func:`signalling.intent.offer_modes`)."""
        session_id = secrets.token_hex(8)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=self._ice_servers))
        track = EncodedVideoTrack(
            on_keyframe_request=lambda reason: self._keyframe_to_encode(session_id, reason),
            on_bitrate=lambda bps: self._bitrate_to_encode(session_id, bps),
        )
        # Narrowed to sendonly before the answer if the session runs in text mode.
        transceiver = pc.addTransceiver(track, direction="sendrecv")
        track.attach_sender(transceiver.sender)
        session = PeerSession(
            session_id,
            "",
            modes[0],
            pc,
            track,
            transceiver,
            [],
            nodes=dict(nodes or {}),
            record_nodes=record_nodes,
        )
        opened: p.SessionOpened | None = None
        try:
            bad_offer: ValueError | None = None
            try:
                chosen = prefer_video_codecs(transceiver, sdp, preferred=self.preferred_codec)
                session.codec = check_codec(chosen.upper())
            except ValueError as exc:
                bad_offer = exc
            # Registered before its stages start, so their first outputs find it. A session
            # the server cannot open is refused before a bad offer is (as Scope answers).
            self.sessions[session_id] = session
            opened = await self._open(session, asked, modes, initial_params)
            if bad_offer is not None:
                raise bad_offer
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            negotiated = negotiated_video_codec(transceiver)
            if negotiated is None or negotiated.name.upper() != session.codec:
                raise ValueError("the offer has no video codec dreamwire supports (VP8, H264)")
            if session.mode == "video":
                forward_encoded(transceiver.receiver)
            else:
                transceiver.direction = "sendonly"
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception:
            self.sessions.pop(session_id, None)
            if opened is not None:
                await self.admin.request(p.CloseSession(session_id))
            await pc.close()
            raise
        session.opening = False
        self._report_unknown(session, tuple(opened.unknown))
        self._report_load_time(session, tuple(opened.load_time))
        self._wire_events(session)
        self.metrics.session_opened(session_id, session.pipeline_id, session.mode, session.stages)
        self._spawn(self._close_unconnected(session), f"session-{session_id[:6]}.connect")
        if session.mode == "video":
            session.drain = start_drain(
                transceiver.receiver.track,
                lambda frame: self._forward_frame(session, frame),
                name=f"session-{session_id[:6]}.recv",
            )
        logger.info(
            "session %s: %s, %s mode, %s %dx%d",
            session_id,
            session.pipeline_id,
            session.mode,
            session.codec,
            opened.width,
            opened.height,
        )
        return session_id, pc.localDescription

    async def _open(
        self,
        session: PeerSession,
        asked: tuple[str, ...] | None,
        modes: list[p.Mode],
        params: dict[str, Any],
    ) -> p.SessionOpened:
        """The supervisor plans the session's chain, settles it and starts its stages; the
        session takes what was chosen."""
        reply = await self.admin.request(
            p.OpenSession(
                session_id=session.session_id,
                pipeline_ids=list(asked or ()),
                sink=topology.SIGNALLING,
                params=params,
                owner=topology.SIGNALLING,
                modes=modes,
                codec=session.codec,
            )
        )
        if isinstance(reply, p.Rejected):
            if reply.why == "invalid":  # fields of the offer's initialParameters
                reason = "initialParameters." + "; initialParameters.".join(reply.problems)
                raise SessionRefused(reason, reply.why)
            raise SessionRefused(reply.reason, reply.why)
        assert isinstance(reply, p.SessionOpened)
        session.stages = list(reply.stages)
        session.pipeline_ids = tuple(reply.pipeline_ids)
        session.pipeline_id = reply.pipeline_ids[0]
        session.mode = reply.mode
        return reply

    def _wire_events(self, session: PeerSession) -> None:
        pc = session.pc

        @pc.on("datachannel")
        def on_datachannel(channel: RTCDataChannel) -> None:
            if channel.label != PARAMETERS_CHANNEL:
                logger.info(
                    "session %s: ignoring data channel %r", session.session_id, channel.label
                )
                return
            session.channel = channel

            def flush() -> None:
                for text in session.pending_messages:
                    channel.send(text)
                session.pending_messages.clear()

            if channel.readyState == "open":
                flush()
            else:
                channel.on("open", flush)

            @channel.on("message")
            def on_message(raw: str | bytes) -> None:
                self.on_parameters_message(session, raw)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            logger.info("session %s: connection %s", session.session_id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self.close(session.session_id)

    # ------------------------------------------------------------------ media

    def _forward_frame(self, session: PeerSession, frame: EncodedVideoFrame) -> None:
        session.frames_in += 1
        forwarded = self.outbox.send(
            session.stage(topology.DECODE),
            p.EncodedFrame(
                session_id=session.session_id,
                codec=frame.codec,
                data=frame.data,
                pts=frame.timestamp,
                keyframe=frame.keyframe,
                rtp_arrival_ns=frame.arrival_ns,
                frame_complete_ns=time.monotonic_ns(),
            ),
        )
        self.metrics.frame_in(session.session_id, forwarded)

    def encode_of(self, session_id: str) -> str:
        session = self.sessions.get(session_id)
        return topology.ENCODE if session is None else session.stage(topology.ENCODE)

    def _keyframe_to_encode(self, session_id: str, reason: str) -> None:
        logger.debug("session %s: keyframe requested (%s)", session_id, reason)
        self.outbox.send(self.encode_of(session_id), p.KeyframeNeeded(session_id=session_id))

    def _bitrate_to_encode(self, session_id: str, bps: int) -> None:
        self.outbox.send(
            self.encode_of(session_id), p.BitrateChanged(session_id=session_id, bitrate_bps=bps)
        )

    def on_packet(self, msg: p.EncodedPacket) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            raise KeyError(f"unknown session {msg.session_id!r}")
        # The metrics stamp RTP departure when aiortc has sent the frame (issue 5).
        on_done = self.metrics.departure_callback(msg.session_id, msg.frame_number, msg.stamps)
        if session.track.push(msg.data, msg.pts, msg.keyframe, on_done=on_done):
            session.packets_out += 1
        else:
            self.metrics.dropped(msg.session_id, "send")

    async def on_keyframe_needed(self, session_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is None:
            raise KeyError(f"unknown session {session_id!r}")
        if session.mode == "video":
            await request_keyframe_upstream(session.transceiver.receiver)

    def on_stage_output(self, msg: p.StageOutput) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            raise KeyError(f"unknown session {msg.session_id!r}")
        message = {"type": msg.kind, "data": msg.data}
        session.send_message(message)
        session.publish_output(message)

    # ------------------------------------------------------------------ parameters

    def on_parameters_message(self, session: PeerSession, raw: str | bytes) -> None:
        """Scope's parameter policy: known keys apply, a bad value is an error naming it (the
        others still apply), unknown keys are ignored and reported once. ``node_id`` (Scope
        0.2) sends the message to that node's pipeline alone."""
        try:
            params = parse_parameters_message(raw)
            if params.get("type") == "ping":
                session.send_message({"type": "pong", "data": params.get("data")})
                return
            pipeline_ids, targets = self._addressed(session, params.get("node_id"))
        except ParameterError as exc:
            session.send_message({"type": "error", "data": str(exc)})
            return
        checked = self.catalog.sort(pipeline_ids, params)
        for error in checked.errors:
            session.send_message({"type": "error", "data": error})
        self._report_unknown(session, checked.unknown)
        self._report_load_time(session, checked.load_time)
        if not checked.valid:
            return
        update = p.UpdateParameters(session_id=session.session_id, params=checked.valid)
        for target in targets:
            self.outbox.send(target, update)

    def _addressed(
        self, session: PeerSession, node_id: Any
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(pipelines, processes) a message is for: the whole chain, or one graph node."""
        if node_id is None:
            return session.pipeline_ids, session.parameter_targets
        pipeline_id = session.nodes.get(node_id) if isinstance(node_id, str) else None
        if pipeline_id is None and node_id in session.pipeline_ids:
            pipeline_id = node_id  # Scope names a pipeline's node after it
        if pipeline_id is None:
            known = sorted({*session.nodes, *session.pipeline_ids})
            raise ParameterError(
                f"node_id: no node {node_id!r} in this session (nodes: {', '.join(known)})"
            )
        index = session.pipeline_ids.index(pipeline_id)
        return (pipeline_id,), (session.parameter_targets[index],)

    def _report_unknown(self, session: PeerSession, keys: tuple[str, ...]) -> None:
        chain = ", ".join(session.pipeline_ids)
        self._warn_once(
            session,
            keys,
            lambda new: f"ignored parameters no pipeline of this session has ({chain}): {new}",
        )

    def _report_load_time(self, session: PeerSession, keys: tuple[str, ...]) -> None:
        self._warn_once(
            session,
            keys,
            lambda new: f"ignored {new}: set when the pipeline loads (load it again to change)",
        )

    def _warn_once(
        self, session: PeerSession, keys: tuple[str, ...], text: Callable[[str], str]
    ) -> None:
        """Log and tell the client, as a FastRTC ``warning``, about keys not reported yet."""
        new = [k for k in keys if k not in session.reported]
        if not new:
            return
        session.reported.update(new)
        message = text(", ".join(new))
        logger.info("session %s: %s", session.session_id, message)
        session.send_message({"type": "warning", "data": message})

    # ------------------------------------------------------------------ teardown

    async def add_candidates(self, session_id: str, candidates: list[IceCandidate]) -> None:
        session = self.sessions[session_id]
        for item in candidates:
            if not item.candidate:
                continue  # end-of-candidates
            text = item.candidate.removeprefix("candidate:")
            try:
                candidate = candidate_from_sdp(text)
            except (ValueError, IndexError) as exc:
                raise ValueError(f"candidates: cannot parse {item.candidate!r}: {exc}") from None
            candidate.sdpMid = item.sdpMid
            candidate.sdpMLineIndex = item.sdpMLineIndex
            await session.pc.addIceCandidate(candidate)

    async def stage_failed(self, msg: p.SessionFailed) -> None:
        session = self.sessions.get(msg.session_id)
        if session is None:
            return
        logger.warning("session %s stopped: %s", msg.session_id, msg.reason)
        session.send_message({"type": "stream_stopped", "error_message": msg.reason})
        # Free the stages at once; keep the peer connection a moment so the message is
        # delivered (the client closes it on stream_stopped anyway).
        await self.close(msg.session_id, linger_s=STOPPED_LINGER_S)

    async def close(self, session_id: str, linger_s: float = 0.0) -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None or session.closed:
            return False
        session.closed = True
        self.metrics.session_closed(session_id)
        if session.drain is not None:
            await session.drain.stop()
        try:
            await self.admin.request(p.CloseSession(session_id=session_id))
        except Exception as exc:
            logger.warning("session %s: closing its chain: %s", session_id, exc)
        if linger_s > 0:
            self._spawn(self._close_pc_later(session, linger_s), f"session-{session_id[:6]}.linger")
        else:
            await session.pc.close()
        logger.info("session %s closed", session_id)
        return True

    async def _close_pc_later(self, session: PeerSession, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        await session.pc.close()

    async def close_all(self) -> None:
        for session_id in list(self.sessions):
            await self.close(session_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
