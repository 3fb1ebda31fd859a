"""The front's link to its media nodes (the ``nodes`` service of a front with ``[nodes]``).

It binds the ROUTER nodes join (CURVE server; the ZAP handler admits the keys of
``[nodes] allowed`` and logs any other), and for each node that joins, the inboxes of the
stages the front may place a session's frames in (``node/<name>/decode``, ``…/encode``,
``…/inference/<id>``, ``…/overlay``): what signalling pushes there goes to the node. What the
node's stages send signalling comes back through here, its packets stamped ``NODE_OUT``. The
supervisor hears of each node on every beat (:class:`~services.protocol.NodeReport`) and of its
loss when it has been silent for ``timeout_s``; it sends its requests for a node as ``ToNode``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import assert_never

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from services import protocol as p
from services import topology
from services.inference import registry
from services.nodes import wire
from services.runtime import Outbox, ServiceCore, ServiceSpec, inbox_endpoint
from shm.ring import N_STAMPS, Stage

logger = logging.getLogger(__name__)


class NodesOptions(msgspec.Struct, forbid_unknown_fields=True):
    bind: str
    secret_key: str
    #: node name → its public key.
    allowed: dict[str, str]
    timeout_s: float = 3.0


@dataclass
class NodeLinkState:
    """One node as the link knows it."""

    name: str
    #: The ROUTER's identity of its connection (the latest it spoke on).
    route: bytes = b""
    up: bool = False
    last_seen: float = 0.0
    address: str = ""
    #: The stages' inboxes bound for it, by the node's own name for the stage.
    inboxes: dict[str, zmq.Socket[bytes]] = field(default_factory=dict)


class FrontLink(ServiceCore[p.LinkInbox]):
    inbox = p.LinkInbox  # nothing is addressed to ``nodes`` itself

    def __init__(self, spec: ServiceSpec, outbox: Outbox) -> None:
        super().__init__(spec, outbox)
        self.options = msgspec.convert(spec.options, NodesOptions)
        self.by_key = {key: name for name, key in self.options.allowed.items()}
        self.nodes = {name: NodeLinkState(name) for name in self.options.allowed}
        self.codec = wire.front_codec()
        self.signalling_codec = p.inbox_codec(p.SignallingInbox)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("services.nodes.zap"))
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)
        self.router = self.ctx.socket(zmq.ROUTER)
        wire.tune(self.router)
        self.router.curve_server = True
        self.router.curve_secretkey = self.options.secret_key.encode()
        self.router.curve_publickey = wire.public_key(self.options.secret_key).encode()
        self.router.bind(self.options.bind)
        #: inbox socket → (node, stage) it carries to.
        self.routes: dict[zmq.Socket[bytes], tuple[str, str]] = {}
        self._sockets: tuple[zmq.Socket[bytes], ...] = (self.router,)
        logger.info(
            "waiting for media nodes on %s (%d allowed: %s)",
            self.options.bind,
            len(self.nodes),
            ", ".join(self.nodes) or "none",
        )

    # ------------------------------------------------------------ ZAP

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: a node's CURVE key (Z85) is admitted if it is one of ``allowed``."""
        name = self.by_key.get(key.decode())
        if name is None:
            logger.warning("refused a node whose key %s is not in [nodes] allowed", key.decode())
            return False
        return True

    # ------------------------------------------------------------ sockets

    def sockets(self) -> tuple[zmq.Socket[bytes], ...]:
        return self._sockets

    def readable(self, sock: zmq.Socket[bytes]) -> None:
        if sock is self.router:
            self._drain_router()
        else:
            self._drain_stage_inbox(sock)

    def _drain_router(self) -> None:
        for _ in range(256):
            try:
                route, payload = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:
                continue  # not two frames: not a link message
            name = self.by_key.get(str(payload.get("User-Id")))
            if name is None:
                continue
            try:
                msg = self.codec.decode(payload.buffer)
            except p.MessageRejected as exc:
                logger.warning("node %s: rejected message: %s", name, exc)
                continue
            node = self.nodes[name]
            node.route = bytes(route.buffer)
            node.last_seen = time.monotonic()
            with contextlib.suppress(zmq.ZMQError):
                node.address = str(payload.get("Peer-Address"))
            self._on_message(node, msg)

    def _on_message(self, node: NodeLinkState, msg: wire.NodeToFront) -> None:
        match msg:
            case wire.Ping(node_ns=node_ns):
                self._send(node, wire.Pong(node_ns, time.monotonic_ns()))
            case wire.Beat():
                if msg.node != node.name:
                    logger.warning(
                        "node %s (by its key) calls itself %r: ignored", node.name, msg.node
                    )
                    return
                if not node.up:
                    logger.info("node %s joined from %s", node.name, node.address)
                    node.up = True
                loaded = [s.pipeline_id for s in msg.pipelines]
                self._bind(node, topology.node_inboxes(loaded, registry.overlays()))
                self.reports.append(
                    p.NodeReport(
                        node=node.name,
                        up=True,
                        pipelines=msg.pipelines,
                        rooms=msg.rooms,
                        sessions=msg.sessions,
                        rtt_ms=msg.rtt_ms,
                        address=node.address,
                    )
                )
            case wire.Relay(service=service, data=data):
                self._to_signalling(node, service, data)
            case wire.Failed(failure=failure):
                service = topology.node_stage(node.name, failure.service)
                self.reports.append(p.SessionFailed(failure.session_id, service, failure.reason))

    def _to_signalling(self, node: NodeLinkState, service: str, data: bytes) -> None:
        if service != topology.SIGNALLING:
            logger.warning("node %s: relay for %r refused", node.name, service)
            return
        try:
            msg = self.signalling_codec.decode(data)
        except p.MessageRejected as exc:
            logger.warning("node %s: rejected relay: %s", node.name, exc)
            return
        if isinstance(msg, p.EncodedPacket):
            stamps = msg.stamps + [0] * max(0, N_STAMPS - len(msg.stamps))
            stamps[Stage.NODE_OUT] = time.monotonic_ns()
            msg.stamps = stamps
        self.outbox.send(topology.SIGNALLING, msg)

    def _drain_stage_inbox(self, sock: zmq.Socket[bytes]) -> None:
        name, stage = self.routes[sock]
        node = self.nodes[name]
        for _ in range(256):
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if node.up:
                self._send(node, wire.Relay(stage, data))

    def _bind(self, node: NodeLinkState, stages: list[str]) -> None:
        for stage in stages:
            if stage in node.inboxes:
                continue
            sock = self.ctx.socket(zmq.PULL)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1024)
            path = inbox_endpoint(self.spec.run_dir, topology.node_stage(node.name, stage))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.removeprefix("ipc://"))
            sock.bind(path)
            node.inboxes[stage] = sock
            self.routes[sock] = (node.name, stage)
        self._sockets = (self.router, *self.routes)

    def _send(self, node: NodeLinkState, msg: wire.FrontToNode) -> None:
        if not node.route:
            return
        with contextlib.suppress(zmq.Again, zmq.ZMQError):
            self.router.send_multipart([node.route, self.codec.encode(msg)], zmq.NOBLOCK)

    # ------------------------------------------------------------ the supervisor

    def on_control(self, msg: p.SupervisorToService) -> None:
        if not isinstance(msg, p.ToNode):
            return
        node = self.nodes.get(msg.node)
        if node is not None and node.up:
            self._send(node, wire.Request(msg.request))
        elif isinstance(msg.request, p.OpenSession):
            reason = f"media node {msg.node} is not connected"
            self.reports.append(
                p.SessionFailed(
                    msg.request.session_id, topology.node_stage(msg.node, "link"), reason
                )
            )

    def tick(self) -> float:
        now = time.monotonic()
        for node in self.nodes.values():
            if node.up and now - node.last_seen > self.options.timeout_s:
                node.up = False
                reason = (
                    f"media node {node.name} lost: nothing heard for {now - node.last_seen:.1f} s"
                )
                logger.error("%s", reason)
                self.reports.append(p.NodeReport(node=node.name, up=False, reason=reason))
        return min(0.25, self.options.timeout_s / 4)

    def start_session(self, msg: p.StartSession) -> None:
        raise ValueError("the nodes link serves no session itself")

    def end_session(self, session_id: str) -> None:
        pass

    def handle(self, msg: p.LinkInbox) -> None:
        match msg:
            case p.NoMessages():
                pass
            case _:
                assert_never(msg)

    def close(self) -> None:
        for sock in (*self.routes, self.router):
            sock.close(linger=0)
        self.auth.stop()
        self.ctx.term()
