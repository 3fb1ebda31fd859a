"""A media node's link to its front (the ``node-link`` service of ``supervisor node``).

The node's supervisor runs decode, the pipelines, overlay and encode as on one box, but no
signalling: this link binds the node's ``signalling`` inbox instead and carries what the
stages send there to the front, their stamps put on the front's clock (:class:`wire.Clock`).
It dials the front (a CURVE client: the front's public key is in ``[node]``), beats the
node's state (from its supervisor's status) and pings every beat interval, and turns the
front's requests into admin requests to its own supervisor; the sessions it opens are its
own (``owner``), so their failures come here and go on to the front. A front silent for
``timeout_s`` is taken as gone: the node closes its sessions (nobody watches them) and keeps
dialling until the front answers again.

:class:`NodeCore` is the logic, without a socket: it hears decoded messages and acts through
:class:`NodePorts`. :class:`NodeProc` is the process around it: the service runtime's loop and
control protocol, the CURVE connection to the front, the ``signalling`` inbox and a DEALER to
the node's own supervisor.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from typing import Protocol, assert_never

import msgspec
import zmq
from zmq.utils.monitor import parse_monitor_message

from services import protocol as p
from services import topology
from services.nodes import wire
from services.runtime import (
    CoreFactory,
    Outbox,
    ServiceCore,
    ServiceProc,
    ServiceSpec,
    admin_endpoint,
    inbox_endpoint,
)

logger = logging.getLogger(__name__)


class NodeLinkOptions(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    join: str
    secret_key: str
    front_public_key: str
    timeout_s: float = 3.0
    beat_interval_s: float = 0.5


#: What an admin request to the node's supervisor was for: ("status",), ("open", sid), ...
Pending = tuple[str, str]


class NodePorts(Protocol):
    """What the node's core acts through (the sockets of :class:`NodeProc`; fakes in tests)."""

    def to_front(self, msg: wire.NodeToFront) -> None:
        """Send to the front (dropped while it does not take it)."""

    def admin(self, request: p.AdminRequest) -> None:
        """An admin request to the node's supervisor; its reply comes to
        :meth:`NodeCore.admin_reply`, in order."""


class NodeCore(ServiceCore[p.LinkInbox]):
    inbox = p.LinkInbox  # nothing is addressed to ``node-link`` itself

    def __init__(self, spec: ServiceSpec, outbox: Outbox, ports: NodePorts) -> None:
        super().__init__(spec, outbox)
        self.options = msgspec.convert(spec.options, NodeLinkOptions)
        self.ports = ports
        self.stage_codec = p.inbox_codec(wire.NodeInbox)
        self.signalling_codec = p.inbox_codec(p.SignallingInbox)
        self.clock = wire.Clock()
        self.pending: collections.deque[Pending] = collections.deque()
        #: session → {stage kind (``inference/<id>``) → the node's process for it}.
        self.sessions: dict[str, dict[str, str]] = {}
        self.front_seen = 0.0
        self.front_up = False
        self._next_beat = 0.0
        logger.info("node %s: joining %s", self.options.name, self.options.join)

    # ------------------------------------------------------------ front → node

    def from_front(self, msg: wire.FrontToNode, now: float) -> None:
        self.front_seen = now
        self.front_up = True
        match msg:
            case wire.Pong():
                self.clock.pong(msg, time.monotonic_ns())
            case wire.Relay(service=service, data=payload):
                self._to_stage(service, payload)
            case wire.Request(request=request):
                self._request(request)
            case _:
                assert_never(msg)

    def _to_stage(self, service: str, data: bytes) -> None:
        try:
            msg = self.stage_codec.decode(data)
        except p.MessageRejected as exc:
            logger.warning("rejected relay for %s: %s", service, exc)
            return
        target = self.sessions.get(msg.session_id, {}).get(service, service)
        if isinstance(msg, p.EncodedFrame):
            msg.rtp_arrival_ns = self.clock.to_node(msg.rtp_arrival_ns)
            msg.frame_complete_ns = self.clock.to_node(msg.frame_complete_ns)
            msg.node_in_ns = time.monotonic_ns()
        self.outbox.send(target, msg)

    def _request(self, request: p.OpenSession | p.CloseSession | p.LoadPipelines) -> None:
        match request:
            case p.OpenSession():
                request.sink = topology.SIGNALLING
                request.owner = self.spec.name
                request.stages = []
                self._admin(request, ("open", request.session_id))
            case p.CloseSession(session_id=session_id):
                self.sessions.pop(session_id, None)
                self._admin(request, ("close", session_id))
            case p.LoadPipelines():
                self._admin(request, ("load", ""))

    # ------------------------------------------------------------ node → front

    def to_front(self, data: bytes) -> None:
        """What the node's stages sent ``signalling``: to the front, on its clock."""
        try:
            msg = self.signalling_codec.decode(data)
        except p.MessageRejected as exc:
            logger.warning("rejected message for signalling: %s", exc)
            return
        if isinstance(msg, p.EncodedPacket):
            msg.stamps = [self.clock.to_front(ns) for ns in msg.stamps]
            data = self.signalling_codec.encode(msg)
        self.ports.to_front(wire.Relay(topology.SIGNALLING, data))

    def on_session_failed(self, msg: p.SessionFailed) -> None:
        self.ports.to_front(wire.Failed(msg))

    # ------------------------------------------------------------ the node's supervisor

    def _admin(self, request: p.AdminRequest, why: Pending) -> None:
        self.pending.append(why)
        self.ports.admin(request)

    def admin_reply(self, reply: p.AdminReply | None) -> None:
        """The node's supervisor answered the oldest request (None: undecodable)."""
        if not self.pending:
            return
        what, session_id = self.pending.popleft()
        if reply is None:
            return
        match what, reply:
            case "status", p.StatusReport():
                self._beat(reply)
            case "open", p.SessionOpened(stages=stages):
                self.sessions[session_id] = {
                    topology.StageAddress.parse(s).process: s for s in stages
                }
                logger.info("session %s opened here: %s", session_id, " → ".join(stages))
            case "open", p.Rejected(reason=reason):
                self.ports.to_front(
                    wire.Failed(p.SessionFailed(session_id, self.spec.name, reason))
                )
            case "close", p.Rejected():
                pass  # it never opened here (its open was refused)
            case _, p.Rejected(reason=reason):
                logger.warning("node supervisor refused %s: %s", what, reason)

    def _beat(self, report: p.StatusReport) -> None:
        rooms = [
            topology.Room(s.name, s.memory_free_bytes, s.sessions)
            for s in report.services
            if s.state == "ready" and topology.StageAddress.parse(s.name).kind == topology.INFERENCE
        ]
        rtt = self.clock.rtt_ns
        self.ports.to_front(
            wire.Beat(
                node=self.options.name,
                pipelines=report.pipelines,
                rooms=rooms,
                sessions=report.sessions,
                rtt_ms=None if rtt is None else rtt / 1e6,
            )
        )

    # ------------------------------------------------------------ the clock

    def tick(self) -> float:
        return self.beat(time.monotonic())

    def beat(self, now: float) -> float:
        """Ping and ask for the node's state each beat interval; a front silent for
        ``timeout_s`` is gone and the node closes its sessions. Seconds to the next beat."""
        if now >= self._next_beat:
            self._next_beat = now + self.options.beat_interval_s
            self.ports.to_front(wire.Ping(time.monotonic_ns()))
            if len(self.pending) < 8:  # a supervisor that does not answer is not flooded
                self._admin(p.GetStatus(), ("status", ""))
        if self.front_up and now - self.front_seen > self.options.timeout_s:
            self.front_up = False
            logger.error(
                "node %s: the front is silent for %.1f s; closing its %d sessions",
                self.options.name,
                now - self.front_seen,
                len(self.sessions),
            )
            for session_id in list(self.sessions):
                self._request(p.CloseSession(session_id))
        return max(0.0, self._next_beat - now)

    def session_count(self) -> int:
        return len(self.sessions)

    def start_session(self, msg: p.StartSession) -> None:
        raise ValueError("the node link serves no session itself")

    def end_session(self, session_id: str) -> None:
        pass

    def handle(self, msg: p.LinkInbox) -> None:
        match msg:
            case p.NoMessages():
                pass
            case _:
                assert_never(msg)


class NodeProc(ServiceProc):
    """The ``node-link`` process: the runtime's loop and control, the link's sockets."""

    core: NodeCore

    def __init__(self, spec: ServiceSpec) -> None:
        super().__init__(spec)
        self.own: tuple[zmq.Socket[bytes], ...] = ()

    def make_core(self, core_factory: CoreFactory | None) -> NodeCore:
        self.core = NodeCore(self.spec, self.outbox, self)
        options = self.core.options
        self.codec = wire.node_codec()
        self.admin_codec = p.admin_client_codec()
        self.dealer = self.ctx.socket(zmq.DEALER)
        wire.tune(self.dealer)
        self.dealer.curve_serverkey = options.front_public_key.encode()
        self.dealer.curve_secretkey = options.secret_key.encode()
        self.dealer.curve_publickey = wire.public_key(options.secret_key).encode()
        self.monitor = self.dealer.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_DISCONNECTED
        )
        self.dealer.connect(options.join)
        # The node's stages notify "signalling": that is us here.
        self.signalling = self.ctx.socket(zmq.PULL)
        self.signalling.setsockopt(zmq.LINGER, 0)
        self.signalling.setsockopt(zmq.RCVHWM, 1024)
        path = inbox_endpoint(self.spec.run_dir, topology.SIGNALLING)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.removeprefix("ipc://"))
        self.signalling.bind(path)
        self.admin_socket = self.ctx.socket(zmq.DEALER)
        self.admin_socket.setsockopt(zmq.LINGER, 0)
        self.admin_socket.connect(admin_endpoint(self.spec.run_dir))
        self.own = (self.dealer, self.signalling, self.admin_socket, self.monitor)
        return self.core

    # ------------------------------------------------------------ NodePorts

    def to_front(self, msg: wire.NodeToFront) -> None:
        with contextlib.suppress(zmq.Again):
            self.dealer.send(self.codec.encode(msg), zmq.NOBLOCK)

    def admin(self, request: p.AdminRequest) -> None:
        self.admin_socket.send_multipart([b"", self.admin_codec.encode(request)])

    # ------------------------------------------------------------ the loop's hooks

    def sockets(self) -> tuple[zmq.Socket[bytes], ...]:
        return self.own

    def readable(self, sock: zmq.Socket[bytes]) -> None:
        for _ in range(256):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if sock is self.dealer:
                self._from_front(frames[-1])
            elif sock is self.signalling:
                self.core.to_front(frames[-1])
            elif sock is self.admin_socket:
                self._admin_reply(frames[-1])
            else:
                self._monitor_event(frames)

    def _from_front(self, data: bytes) -> None:
        try:
            msg = self.codec.decode(data)
        except p.MessageRejected as exc:
            logger.warning("rejected message from the front: %s", exc)
            return
        self.core.from_front(msg, time.monotonic())

    def _admin_reply(self, data: bytes) -> None:
        try:
            reply: p.AdminReply | None = self.admin_codec.decode(data)
        except p.MessageRejected as exc:
            logger.warning("rejected admin reply: %s", exc)
            reply = None
        self.core.admin_reply(reply)

    def _monitor_event(self, frames: list[bytes]) -> None:
        options = self.core.options
        event = parse_monitor_message(frames)
        match event["event"]:
            case zmq.EVENT_HANDSHAKE_SUCCEEDED:
                logger.info("node %s: connected to the front %s", options.name, event["endpoint"])
            case zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                logger.error(
                    "node %s: the front refused this node's key (is its public key %s in the "
                    "front's [nodes] allowed?)",
                    options.name,
                    wire.public_key(options.secret_key),
                )
            case zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                logger.error(
                    "node %s: handshake with the front failed (its public key in [node] "
                    "front_public_key may be wrong)",
                    options.name,
                )
            case zmq.EVENT_DISCONNECTED:
                logger.warning("node %s: disconnected from the front", options.name)

    def close_sockets(self) -> None:
        if not self.own:
            return
        with contextlib.suppress(zmq.ZMQError):
            self.dealer.disable_monitor()
        for sock in self.own:
            sock.close(linger=0)
