"""The front's link to its media nodes (the ``nodes`` service of a front with ``[nodes]``).

It binds the ROUTER nodes join (CURVE server; the ZAP handler admits the keys of
``[nodes] allowed`` and logs any other), and for each node that joins, the inboxes of the
stages the front may place a session's frames in (``node/<name>/decode``, ``…/encode``,
``…/inference/<id>``, ``…/overlay``): what signalling pushes there goes to the node. What the
node's stages send signalling comes back through here, its packets stamped ``NODE_OUT``. The
supervisor hears of each node on every beat (:class:`~services.protocol.NodeReport`) and of its
loss when it has been silent for ``timeout_s``; it sends its requests for a node as ``ToNode``.

:class:`FrontCore` is the logic, without a socket: it hears decoded messages with the time
they came and acts through :class:`FrontPorts`. :class:`FrontProc` is the process around it:
the service runtime's loop and control protocol (:class:`~services.runtime.ServiceProc`), plus
the ROUTER, the ZAP handler and the stage inboxes it binds when the core asks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol, assert_never

import msgspec
import zmq
from zmq.auth.thread import ThreadAuthenticator

from services import protocol as p
from services import topology
from services.inference import registry
from services.nodes import wire
from services.runtime import (
    CoreFactory,
    Outbox,
    ServiceCore,
    ServiceProc,
    ServiceSpec,
    inbox_endpoint,
)
from shm.ring import N_STAMPS, Stage

logger = logging.getLogger(__name__)


class NodesOptions(msgspec.Struct, forbid_unknown_fields=True):
    bind: str
    secret_key: str
    #: node name → its public key.
    allowed: dict[str, str]
    timeout_s: float = 3.0


class FrontPorts(Protocol):
    """What the front's core acts through (the sockets of :class:`FrontProc`; fakes in tests)."""

    def to_node(self, route: bytes, msg: wire.FrontToNode) -> None:
        """Send to the node's connection ``route`` (dropped if it does not take it)."""

    def bind(self, node: str, stage: str) -> None:
        """Bind ``node/<node>/<stage>``'s inbox: what arrives there goes to
        :meth:`FrontCore.from_stage`."""

    def report(self, msg: p.ServiceToSupervisor) -> None:
        """Tell the supervisor (a node's beat or loss, a session failed on a node)."""


@dataclass
class NodeState:
    """One node as the link knows it."""

    name: str
    #: The ROUTER's identity of its connection (the latest it spoke on).
    route: bytes = b""
    up: bool = False
    last_seen: float = 0.0
    address: str = ""
    #: The stages whose inboxes are bound for it, by the node's own name for the stage.
    stages: set[str] = field(default_factory=set)


class FrontCore(ServiceCore[p.LinkInbox]):
    inbox = p.LinkInbox  # nothing is addressed to ``nodes`` itself

    def __init__(self, spec: ServiceSpec, outbox: Outbox, ports: FrontPorts) -> None:
        super().__init__(spec, outbox)
        self.options = msgspec.convert(spec.options, NodesOptions)
        self.ports = ports
        self.by_key = {key: name for name, key in self.options.allowed.items()}
        self.nodes = {name: NodeState(name) for name in self.options.allowed}
        self.signalling_codec = p.inbox_codec(p.SignallingInbox)

    def admits(self, key: str) -> bool:
        """ZAP: a node's CURVE key (Z85) is admitted if it is one of ``allowed``."""
        if key in self.by_key:
            return True
        logger.warning("refused a node whose key %s is not in [nodes] allowed", key)
        return False

    # ------------------------------------------------------------ node → front

    def from_node(
        self, key: str, route: bytes, address: str, msg: wire.NodeToFront, now: float
    ) -> None:
        """A message on the connection of the node whose key is ``key``."""
        name = self.by_key.get(key)
        if name is None:
            return
        node = self.nodes[name]
        node.route, node.last_seen = route, now
        if address:
            node.address = address
        match msg:
            case wire.Ping(node_ns=node_ns):
                self.ports.to_node(node.route, wire.Pong(node_ns, time.monotonic_ns()))
            case wire.Beat():
                self._beat(node, msg)
            case wire.Relay(service=service, data=data):
                self._to_signalling(node, service, data)
            case wire.Failed(failure=failure):
                service = topology.node_stage(node.name, failure.service)
                self.ports.report(p.SessionFailed(failure.session_id, service, failure.reason))
            case _:
                assert_never(msg)

    def _beat(self, node: NodeState, msg: wire.Beat) -> None:
        if msg.node != node.name:
            logger.warning("node %s (by its key) calls itself %r: ignored", node.name, msg.node)
            return
        if not node.up:
            logger.info("node %s joined from %s", node.name, node.address)
            node.up = True
        loaded = [s.pipeline_id for s in msg.pipelines]
        for stage in topology.node_inboxes(loaded, registry.overlays()):
            if stage not in node.stages:
                node.stages.add(stage)
                self.ports.bind(node.name, stage)
        self.ports.report(
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

    def _to_signalling(self, node: NodeState, service: str, data: bytes) -> None:
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

    # ------------------------------------------------------------ front → node

    def from_stage(self, name: str, stage: str, data: bytes) -> None:
        """What a front stage sent ``node/<name>/<stage>``: carried to the node, if it is up."""
        node = self.nodes[name]
        if node.up and node.route:
            self.ports.to_node(node.route, wire.Relay(stage, data))

    def on_control(self, msg: p.ToNode) -> None:
        """The supervisor's request for a node; an open for a node that is not connected
        fails its session at once."""
        node = self.nodes.get(msg.node)
        if node is not None and node.up and node.route:
            self.ports.to_node(node.route, wire.Request(msg.request))
        elif isinstance(msg.request, p.OpenSession):
            reason = f"media node {msg.node} is not connected"
            self.ports.report(
                p.SessionFailed(
                    msg.request.session_id, topology.node_stage(msg.node, "link"), reason
                )
            )

    # ------------------------------------------------------------ the clock

    def check_silence(self, now: float) -> None:
        """A node silent for ``timeout_s`` is lost: the supervisor stops its sessions."""
        for node in self.nodes.values():
            if node.up and now - node.last_seen > self.options.timeout_s:
                node.up = False
                reason = (
                    f"media node {node.name} lost: nothing heard for {now - node.last_seen:.1f} s"
                )
                logger.error("%s", reason)
                self.ports.report(p.NodeReport(node=node.name, up=False, reason=reason))

    def tick(self) -> float:
        self.check_silence(time.monotonic())
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


class FrontProc(ServiceProc):
    """The ``nodes`` process: the runtime's loop and control, the ROUTER and the inboxes."""

    core: FrontCore

    def __init__(self, spec: ServiceSpec) -> None:
        super().__init__(spec)
        self.router: zmq.Socket[bytes] | None = None
        self.auth: ThreadAuthenticator | None = None
        #: inbox socket → (node, stage) it carries to.
        self.routes: dict[zmq.Socket[bytes], tuple[str, str]] = {}

    def make_core(self, core_factory: CoreFactory | None) -> FrontCore:
        self.core = FrontCore(self.spec, self.outbox, self)
        options = self.core.options
        self.codec = wire.front_codec()
        self.auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("services.nodes.zap"))
        self.auth.start()
        self.auth.configure_curve_callback("*", credentials_provider=self)
        self.router = self.ctx.socket(zmq.ROUTER)
        wire.tune(self.router)
        self.router.curve_server = True
        self.router.curve_secretkey = options.secret_key.encode()
        self.router.curve_publickey = wire.public_key(options.secret_key).encode()
        self.router.bind(options.bind)
        logger.info(
            "waiting for media nodes on %s (%d allowed: %s)",
            options.bind,
            len(options.allowed),
            ", ".join(options.allowed) or "none",
        )
        return self.core

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP's question (``credentials_provider``), answered by the core."""
        return self.core.admits(key.decode())

    # ------------------------------------------------------------ FrontPorts

    def to_node(self, route: bytes, msg: wire.FrontToNode) -> None:
        assert self.router is not None
        with contextlib.suppress(zmq.Again, zmq.ZMQError):
            self.router.send_multipart([route, self.codec.encode(msg)], zmq.NOBLOCK)

    def bind(self, node: str, stage: str) -> None:
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 1024)
        path = inbox_endpoint(self.spec.run_dir, topology.node_stage(node, stage))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path.removeprefix("ipc://"))
        sock.bind(path)
        self.routes[sock] = (node, stage)

    def report(self, msg: p.ServiceToSupervisor) -> None:
        self.send_control(msg)

    # ------------------------------------------------------------ the loop's hooks

    def sockets(self) -> tuple[zmq.Socket[bytes], ...]:
        return (self.router, *self.routes) if self.router is not None else ()

    def readable(self, sock: zmq.Socket[bytes]) -> None:
        if sock is self.router:
            self._drain_router()
            return
        name, stage = self.routes[sock]
        for _ in range(256):
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.core.from_stage(name, stage, data)

    def _drain_router(self) -> None:
        assert self.router is not None
        for _ in range(256):
            try:
                route, payload = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            except ValueError:
                continue  # not two frames: not a link message
            key = str(payload.get("User-Id"))
            try:
                msg = self.codec.decode(payload.buffer)
            except p.MessageRejected as exc:
                logger.warning("node with key %s: rejected message: %s", key, exc)
                continue
            address = ""
            with contextlib.suppress(zmq.ZMQError):
                address = str(payload.get("Peer-Address"))
            self.core.from_node(key, bytes(route.buffer), address, msg, time.monotonic())

    def on_control(self, msg: p.SupervisorToService) -> None:
        if isinstance(msg, p.ToNode):
            self.core.on_control(msg)

    def close_sockets(self) -> None:
        for sock in self.sockets():
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
