"""The media-node links' logic in one process, without a socket: the front's core and a node's
core hear decoded messages at given times and act through fake ports (what the link
processes, ``FrontProc`` and ``NodeProc``, do with sockets; ``test_nodes_net.py`` runs them
between network namespaces)."""

from __future__ import annotations

from typing import Any

import pytest

from services import protocol as p
from services import topology
from services.nodes import wire
from services.nodes.front import FrontCore
from services.nodes.node import NodeCore
from services.runtime import ServiceSpec
from services.topology import Kind
from shm.ring import N_STAMPS, Stage

pytestmark = pytest.mark.timeout(30)

KEY_A, KEY_B, STRANGER = "a" * 40, "b" * 40, "c" * 40


class Recorder:
    """Outbox and ports at once: every call, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def send(self, service: str, message: Any) -> bool:
        self.calls.append(("send", (service, message)))
        return True

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.calls.append((name, args if len(args) > 1 else args[0]))

    def take(self, name: str) -> list[Any]:
        taken = [args for what, args in self.calls if what == name]
        self.calls = [(what, args) for what, args in self.calls if what != name]
        return taken


def spec(kind: Kind, name: str, options: dict[str, Any]) -> ServiceSpec:
    return ServiceSpec(name, kind, "/nonexistent", "r", 0, options=options)


def front() -> tuple[FrontCore, Recorder]:
    ports = Recorder()
    options = {"bind": "tcp://127.0.0.1:1", "secret_key": KEY_A, "timeout_s": 3.0}
    options["allowed"] = {"a": KEY_A, "b": KEY_B}
    return FrontCore(spec(Kind.NODES, "nodes", options), ports, ports), ports


def beat(node: str) -> wire.Beat:
    loaded = [p.PipelineState("passthrough", "loaded")]
    return wire.Beat(node, loaded, [topology.Room("inference/passthrough", None, 0)], ["s1"])


def test_the_front_admits_only_its_nodes_and_binds_their_stages_when_they_beat() -> None:
    core, ports = front()
    assert core.admits(KEY_A) and not core.admits(STRANGER)
    core.from_node(STRANGER, b"r0", "10.0.0.9", beat("a"), 1.0)  # not a node of ours
    assert ports.calls == []
    core.from_node(KEY_A, b"ra", "10.0.0.1", beat("a"), 1.0)
    assert ports.take("bind") == [("a", "decode"), ("a", "encode"), ("a", "inference/passthrough")]
    (report,) = ports.take("report")
    assert report == p.NodeReport(
        "a", True, pipelines=beat("a").pipelines, rooms=beat("a").rooms, sessions=["s1"],
        address="10.0.0.1",
    )  # fmt: skip
    core.from_node(KEY_A, b"ra", "10.0.0.1", beat("a"), 1.5)  # bound once
    assert ports.take("bind") == [] and len(ports.take("report")) == 1
    core.from_node(KEY_B, b"rb", "10.0.0.2", beat("a"), 1.5)  # b calls itself a: ignored
    assert ports.calls == []


def test_the_front_carries_frames_both_ways_and_stamps_packets_leaving_a_node() -> None:
    core, ports = front()
    core.from_stage("a", "decode", b"frame")  # a is not up: nothing goes
    assert ports.calls == []
    core.from_node(KEY_A, b"ra", "", beat("a"), 1.0)
    ports.calls.clear()
    core.from_stage("a", "decode", b"frame")
    assert ports.take("to_node") == [(b"ra", wire.Relay("decode", b"frame"))]
    packet = p.EncodedPacket("s1", b"\x01", 3000, True, 7, [5] * N_STAMPS)
    data = p.inbox_codec(p.SignallingInbox).encode(packet)
    core.from_node(KEY_A, b"ra", "", wire.Relay(topology.SIGNALLING, data), 1.1)
    ((service, sent),) = ports.take("send")
    assert service == topology.SIGNALLING and sent.frame_number == 7
    assert sent.stamps[Stage.NODE_OUT] > 5 and sent.stamps[Stage.RTP_ARRIVAL] == 5
    core.from_node(KEY_A, b"ra", "", wire.Relay("encode", data), 1.2)  # only to signalling
    assert ports.calls == []


def test_the_front_fails_a_session_for_a_node_that_is_gone_or_never_came() -> None:
    core, ports = front()
    request = p.OpenSession("s9", 64, 32, pipeline_ids=["passthrough"])
    core.on_control(p.ToNode("a", request))  # not connected
    assert ports.take("report") == [
        p.SessionFailed("s9", "node/a/link", "media node a is not connected")
    ]
    core.from_node(KEY_A, b"ra", "", beat("a"), 10.0)
    ports.calls.clear()
    core.on_control(p.ToNode("a", request))
    assert ports.take("to_node") == [(b"ra", wire.Request(request))]
    failure = p.SessionFailed("s9", "inference/passthrough", "boom")
    core.from_node(KEY_A, b"ra", "", wire.Failed(failure), 11.0)
    assert ports.take("report") == [p.SessionFailed("s9", "node/a/inference/passthrough", "boom")]
    core.check_silence(13.9)  # heard at 11.0, timeout 3 s
    assert ports.calls == []
    core.check_silence(14.2)
    (lost,) = ports.take("report")
    assert (lost.node, lost.up) == ("a", False) and "nothing heard for 3.2 s" in lost.reason
    core.from_stage("a", "decode", b"late")  # lost: nothing more goes to it
    assert ports.calls == []


def node() -> tuple[NodeCore, Recorder]:
    ports = Recorder()
    options: dict[str, Any] = {"name": "a", "join": "tcp://front:1", "secret_key": KEY_A}
    options |= {"front_public_key": KEY_B, "timeout_s": 3.0, "beat_interval_s": 0.5}
    return NodeCore(spec(Kind.NODE_LINK, "node-link", options), ports, ports), ports


def status(*services: p.ServiceStatus) -> p.StatusReport:
    loaded = [p.PipelineState("passthrough", "loaded")]
    return p.StatusReport("r", 1, 1.0, list(services), ["s1"], 0, "running", pipelines=loaded)


def test_a_node_beats_what_its_supervisor_says() -> None:
    core, ports = node()
    assert core.beat(0.0) == 0.5
    (ping,) = ports.take("to_front")
    assert isinstance(ping, wire.Ping)
    assert ports.take("admin") == [p.GetStatus()]
    core.admin_reply(
        status(
            p.ServiceStatus("inference/passthrough", "ready", 1, 1.0, 0, sessions=1),
            p.ServiceStatus("inference/longlive", "starting", 2, 1.0, 0),
            p.ServiceStatus("decode", "ready", 3, 1.0, 0),
        )
    )
    (sent,) = ports.take("to_front")
    assert sent == wire.Beat(
        "a", status().pipelines, [topology.Room("inference/passthrough", None, 1)], ["s1"]
    )
    core.beat(0.2)  # not yet the next beat
    assert ports.calls == []


def test_a_node_opens_the_fronts_sessions_as_its_own_and_routes_their_messages() -> None:
    core, ports = node()
    request = p.OpenSession("s1", 64, 32, pipeline_ids=["passthrough"], sink="x", owner="y")
    core.from_front(wire.Request(request), 1.0)
    (asked,) = ports.take("admin")
    assert (asked.sink, asked.owner, asked.stages) == ("signalling", "node-link", [])
    stages = ["decode", "inference/passthrough@cuda:1", "encode"]
    core.admin_reply(p.SessionOpened("s1", stages, []))
    update = p.UpdateParameters("s1", {"prompt": "x"})
    data = p.inbox_codec(wire.NodeInbox).encode(update)
    core.from_front(wire.Relay("inference/passthrough", data), 1.1)
    assert ports.take("send") == [("inference/passthrough@cuda:1", update)]  # its device
    # An open the node's supervisor refuses fails the session at the front.
    core.from_front(wire.Request(p.OpenSession("s2", 64, 32)), 1.2)
    ports.take("admin")
    core.admin_reply(p.Rejected("no room", why="unavailable"))
    assert ports.take("to_front") == [wire.Failed(p.SessionFailed("s2", "node-link", "no room"))]
    # A stage failing a session here is told to the front.
    core.on_session_failed(p.SessionFailed("s1", "encode", "gone"))
    assert ports.take("to_front") == [wire.Failed(p.SessionFailed("s1", "encode", "gone"))]


def test_a_node_closes_its_sessions_when_the_front_falls_silent() -> None:
    core, ports = node()
    core.from_front(wire.Request(p.OpenSession("s1", 64, 32)), 0.0)
    core.admin_reply(p.SessionOpened("s1", ["decode", "encode"], []))
    ports.calls.clear()
    core.beat(2.9)
    assert p.CloseSession("s1") not in ports.take("admin")
    ports.calls.clear()
    core.beat(3.1)
    assert p.CloseSession("s1") in ports.take("admin") and core.sessions == {}
