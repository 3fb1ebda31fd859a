"""A front's media nodes in its supervisor's logic, on a fake clock (no sockets, no hosts):
where sessions go, what happens when a node is lost, what front and node disagree on, and the
clock offset a node's link measures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from test_supervisor_core import Rig

from services import protocol as p
from services import topology
from services.nodes.wire import Clock, Pong
from supervisor.events import Send

pytestmark = pytest.mark.timeout(30)

KEY = "0" * 40


def front(**config: Any) -> Rig:
    rig = Rig(nodes={"secret_key": KEY, "allowed": {"a": KEY, "b": KEY}}, **config)
    rig.add(topology.NODES, "nodes")
    rig.add("signalling")
    return rig


def beat(
    node: str, *, sessions: Sequence[str] = (), free: int | None = None, **kw: Any
) -> p.NodeReport:
    pipelines = kw.pop("pipelines", ["passthrough"])
    return p.NodeReport(
        node=node,
        up=True,
        pipelines=[p.PipelineState(pid, "loaded") for pid in pipelines],
        rooms=[topology.Room(f"inference/{pid}", free, 0) for pid in pipelines],
        sessions=list(sessions),
        address="10.0.0.1",
        **kw,
    )


def report(rig: Rig, msg: p.NodeReport) -> list[Any]:
    return rig.control(topology.NODES.encode(), msg, rig.now)


def open_session(rig: Rig, session_id: str, **kw: Any) -> tuple[p.AdminReply, list[Any]]:
    req = p.OpenSession(session_id, 64, 32, owner="signalling", sink="signalling", **kw)
    return rig.admin(req, rig.now)


def to_nodes(effects: list[Any]) -> list[p.ToNode]:
    return [e.message for e in effects if isinstance(e, Send) and isinstance(e.message, p.ToNode)]


def failures(effects: list[Any]) -> list[p.SessionFailed]:
    return [
        e.message for e in effects if isinstance(e, Send) and isinstance(e.message, p.SessionFailed)
    ]


def test_sessions_spread_over_the_nodes_and_the_node_is_asked_to_open_them() -> None:
    rig = front()
    report(rig, beat("a"))
    report(rig, beat("b"))
    placed = []
    for sid in ("s1", "s2", "s3", "s4"):
        reply, effects = open_session(rig, sid, pipeline_ids=["passthrough"])
        assert isinstance(reply, p.SessionOpened), reply
        assert reply.rings == []  # the node's rings are the node's
        (sent,) = to_nodes(effects)
        assert isinstance(sent.request, p.OpenSession)
        assert sent.request.pipeline_ids == ["passthrough"]
        node = topology.StageAddress.parse(reply.stages[0]).node
        assert sent.node == node
        assert reply.stages == [
            f"node/{node}/decode",
            f"node/{node}/inference/passthrough",
            f"node/{node}/encode",
        ]
        placed.append(node)
    assert sorted(placed) == ["a", "a", "b", "b"]  # equal room: turn about
    # The pipeline is loaded as far as a client can tell (the API reads this).
    assert [(s.pipeline_id, s.status) for s in rig.core.pipelines.states()] == [
        ("passthrough", "loaded")
    ]


def test_more_free_gpu_memory_wins_and_a_node_without_the_pipeline_is_passed_over() -> None:
    rig = front()
    report(rig, beat("a", free=10 << 30))
    report(rig, beat("b", free=40 << 30))
    reply, _ = open_session(rig, "s1", pipeline_ids=["passthrough"])
    assert isinstance(reply, p.SessionOpened) and reply.stages[0].startswith("node/b/")
    report(rig, beat("b", free=40 << 30, pipelines=["testcard"]))
    reply, _ = open_session(rig, "s2", pipeline_ids=["passthrough"])
    assert isinstance(reply, p.SessionOpened) and reply.stages[0].startswith("node/a/")
    reply, _ = open_session(rig, "s3", pipeline_ids=["streamdiffusion"])
    assert isinstance(reply, p.Rejected) and "streamdiffusion" in reply.reason


def test_a_lost_node_stops_its_sessions_only_and_new_ones_go_elsewhere() -> None:
    rig = front()
    report(rig, beat("a"))
    report(rig, beat("b"))
    open_session(rig, "s1", pipeline_ids=["passthrough"])  # a (name order on a tie)
    open_session(rig, "s2", pipeline_ids=["passthrough"])  # b
    lost = p.NodeReport(node="a", up=False, reason="media node a lost: nothing heard for 3.1 s")
    effects = report(rig, lost)
    (failed,) = failures(effects)
    assert (failed.session_id, failed.reason) == ("s1", lost.reason)
    assert failed.service.startswith("node/a")
    reply, _ = open_session(rig, "s3", pipeline_ids=["passthrough"])
    assert isinstance(reply, p.SessionOpened) and reply.stages[0].startswith("node/b/")
    status = {n.node: n for n in rig.core.status(rig.now).nodes}
    assert not status["a"].up and status["a"].reason == lost.reason
    assert status["a"].pipelines  # what it last had, for `supervisor status`


def test_front_and_node_settle_what_they_disagree_on() -> None:
    rig = front()
    report(rig, beat("a"))
    open_session(rig, "s1", pipeline_ids=["passthrough"])
    # The node still runs a session the front has closed: it is told to close it.
    effects = report(rig, beat("a", sessions=["s1", "old"]))
    assert [(m.node, m.request) for m in to_nodes(effects)] == [("a", p.CloseSession("old"))]
    assert failures(effects) == []
    # The node restarted and lost s1 (past the grace of a session just opened): its client
    # hears it, once.
    rig.now = 10.0
    effects = report(rig, beat("a", sessions=[]))
    assert [f.session_id for f in failures(effects)] == ["s1"]
    assert failures(report(rig, beat("a", sessions=[]))) == []


def test_a_load_goes_to_every_node_and_to_a_node_that_joins_later() -> None:
    rig = front()
    report(rig, beat("a"))
    loads = [p.PipelineLoad("testcard", {"width": 64})]
    reply, effects = rig.admin(p.LoadPipelines(loads), rig.now)
    assert isinstance(reply, p.Ack)
    assert [(m.node, m.request) for m in to_nodes(effects)] == [("a", p.LoadPipelines(loads))]
    # A front without media of its own starts no pipeline process here.
    assert not any(c.is_pipeline for c in rig.core.children.values())
    effects = report(rig, beat("b"))
    assert [(m.node, m.request) for m in to_nodes(effects)] == [("b", p.LoadPipelines(loads))]
    assert to_nodes(report(rig, beat("b"))) == []  # only when it joins


def test_closing_a_node_session_asks_the_node() -> None:
    rig = front()
    report(rig, beat("a"))
    open_session(rig, "s1", pipeline_ids=["passthrough"])
    reply, effects = rig.admin(p.CloseSession("s1"), rig.now)
    assert isinstance(reply, p.Ack)
    assert [(m.node, m.request) for m in to_nodes(effects)] == [("a", p.CloseSession("s1"))]
    assert rig.core.sessions.sessions == {}


def test_the_clock_offset_is_the_least_queued_estimate() -> None:
    """Node clock = front clock - 5 s; the one-way delays below are what the network did."""
    offset = 5_000_000_000
    clock = Clock()
    for out_ns, back_ns in ((2_000_000, 9_000_000), (400_000, 500_000), (3_000_000, 1_000_000)):
        sent = 1_000_000_000
        front_at = sent + out_ns + offset
        clock.pong(Pong(sent, front_at), sent + out_ns + back_ns)
    # The least-queued round trip (0.4 + 0.5 ms) misjudges the offset by half the asymmetry.
    assert clock.offset_ns == offset + (400_000 - 500_000) // 2
    assert clock.to_front(7) == 7 + clock.offset_ns
    assert clock.to_node(clock.to_front(123)) == 123
    assert clock.to_front(0) == 0  # an absent stamp stays absent


def test_after_a_load_a_node_counts_only_once_it_reports_the_new_load() -> None:
    """A node that beat "loaded" before the load reached it is loading until it says so with
    the asked load params: a client that polls the status must not stream to the old one."""
    rig = front()
    report(rig, beat("a"))
    loads = [p.PipelineLoad("passthrough", {"width": 512})]
    rig.admin(p.LoadPipelines(loads), rig.now)
    report(rig, beat("a"))  # the beat it sent before the load arrived
    assert [s.status for s in rig.core.pipelines.states()] == ["loading"]
    reply, _ = open_session(rig, "s1", pipeline_ids=["passthrough"])
    assert isinstance(reply, p.Rejected)
    done = beat("a")
    done.pipelines[0].load_params = {"width": 512}
    report(rig, done)
    assert [s.status for s in rig.core.pipelines.states()] == ["loaded"]
    reply, _ = open_session(rig, "s1", pipeline_ids=["passthrough"])
    assert isinstance(reply, p.SessionOpened)
