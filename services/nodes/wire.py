"""What the front's link and a media node's link say to each other, and how they connect.

One ZeroMQ connection per node over TCP, authenticated and encrypted with CURVE: the front's
ROUTER (a CURVE server, which admits only the public keys listed in its ``[nodes] allowed``)
and the node's DEALER (a CURVE client that knows the front's public key). On it travel the
inbox messages of the node's sessions (:class:`Relay`: the encoded frames in, the encoded
packets out, parameters, keyframe requests), the front supervisor's requests for the node's
supervisor (:class:`Request`), and the node's beats and pings, which are how each side knows
the other is there.
"""

from __future__ import annotations

import msgspec
import zmq

from services import protocol as p
from services import topology

#: ZeroMQ's own connection heartbeats: a connection whose peer went silent is dropped and
#: (node side) dialled again, so a link cut and then restored comes back by itself.
ZMQ_HEARTBEAT_IVL_MS = 1000
ZMQ_HEARTBEAT_TIMEOUT_MS = 3000
#: Messages queued for a peer that does not take them (a few frames: latest wins anyway).
LINK_HWM = 256


class Beat(msgspec.Struct, tag=True, array_like=True):
    """The node's state, each beat interval (node → front)."""

    node: str
    pipelines: list[p.PipelineState]
    rooms: list[topology.Room]
    sessions: list[str]
    rtt_ms: float | None = None


class Ping(msgspec.Struct, tag=True, array_like=True):
    """node → front: answered at once with :class:`Pong` (round trip, clock offset)."""

    node_ns: int


class Pong(msgspec.Struct, tag=True, array_like=True):
    node_ns: int
    front_ns: int


class Relay(msgspec.Struct, tag=True, array_like=True, gc=False):
    """An inbox message for ``service`` on the other side (its msgpack bytes)."""

    service: str
    data: bytes


class Failed(msgspec.Struct, tag=True, array_like=True):
    """A stage on the node can no longer serve a session (node → front; ``service`` is the
    node's own name for it)."""

    failure: p.SessionFailed


class Request(msgspec.Struct, tag=True, array_like=True):
    """For the node's supervisor (front → node)."""

    request: p.OpenSession | p.CloseSession | p.LoadPipelines


NodeToFront = Beat | Ping | Relay | Failed
FrontToNode = Pong | Relay | Request
#: What the front may put in a node stage's inbox: a session's frames, parameters, keyframes.
NodeInbox = p.EncodedFrame | p.KeyframeNeeded | p.BitrateChanged | p.UpdateParameters


def front_codec() -> p.Codec[NodeToFront, FrontToNode]:
    return p.Codec(NodeToFront, FrontToNode)


def node_codec() -> p.Codec[FrontToNode, NodeToFront]:
    return p.Codec(FrontToNode, NodeToFront)


# ---------------------------------------------------------------- keys


def keypair() -> tuple[str, str]:
    """A new CURVE key pair, (public, secret), Z85 text as the config takes them."""
    public, secret = zmq.curve_keypair()
    return public.decode(), secret.decode()


def public_key(secret: str) -> str:
    """The public key of a secret key (a config holds only the secret)."""
    return zmq.curve_public(secret.encode()).decode()


def tune(sock: zmq.Socket[bytes]) -> None:
    """Options both ends of a link share."""
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, LINK_HWM)
    sock.setsockopt(zmq.RCVHWM, LINK_HWM)
    sock.setsockopt(zmq.HEARTBEAT_IVL, ZMQ_HEARTBEAT_IVL_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMQ_HEARTBEAT_TIMEOUT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TTL, ZMQ_HEARTBEAT_TIMEOUT_MS)


# ---------------------------------------------------------------- clocks


class Clock:
    """The front's monotonic clock as seen from the node: ``front ≈ node + offset``.

    Each ping gives an offset estimate (the front's stamp against the midpoint of the round
    trip); the one with the shortest round trip among the recent ones is the least skewed
    by queueing, so it is the one used."""

    WINDOW = 16

    def __init__(self) -> None:
        self._samples: list[tuple[int, int]] = []  # (rtt_ns, offset_ns)
        self.offset_ns = 0
        self.rtt_ns: int | None = None

    def pong(self, pong: Pong, now_ns: int) -> None:
        rtt = now_ns - pong.node_ns
        if rtt < 0:
            return
        offset = pong.front_ns - (pong.node_ns + now_ns) // 2
        self._samples = [*self._samples[-(self.WINDOW - 1) :], (rtt, offset)]
        self.rtt_ns = rtt
        self.offset_ns = min(self._samples)[1]

    def to_front(self, node_ns: int) -> int:
        return node_ns + self.offset_ns if node_ns else 0

    def to_node(self, front_ns: int) -> int:
        return front_ns - self.offset_ns if front_ns else 0
