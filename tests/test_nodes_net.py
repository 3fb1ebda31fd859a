"""A front and its media nodes as hosts on a network: Linux network namespaces joined by veth
pairs, made by the test (``scripts/netlab.py``), 25 ms of delay each way on one link, and a
real aiortc client talking to the front from this machine's own namespace::

    client ──10.213.0── front ──10.213.1── n1
                          └────10.213.2── n2 (+25 ms each way)

The delay is ``tc netem`` on n2's veths; on a kernel built without ``sch_netem`` (this
project's CI machines) it is a TCP relay on n2 that holds every byte 25 ms each way, which is
what the link's latency does to the node's connection. Skipped, with the reason, where
namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import netlab
import pytest
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun, async_wait_until, wait_until

from services import protocol as p
from services.nodes.wire import keypair

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(bool(why := netlab.unavailable()), reason=why or ""),
]

DELAY_MS = 25.0
TIMEOUT_S = 2.0
PORT = 7700


class Net:
    """The lab, its hosts' supervisors, and the keys."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.lab = netlab.Lab()
        for host in ("front", "n1", "n2"):
            self.lab.host(host)
        self.client_link = self.lab.link(None, "front", 0)
        self.netem = netlab.netem_missing() is None
        self.links = {
            "n1": self.lab.link("front", "n1", 1),
            "n2": self.lab.link("front", "n2", 2, delay_ms=DELAY_MS if self.netem else 0.0),
        }
        #: Where each node dials the front: straight, or through n2's delaying relay.
        self.join = {name: f"{link.a_ip}:{PORT}" for name, link in self.links.items()}
        self.relay = None
        if not self.netem:
            link = self.links["n2"]
            self.relay = netlab.delay_relay(link.b, "127.0.0.1:7701", self.join["n2"], DELAY_MS)
            self.join["n2"] = "127.0.0.1:7701"
        self.front_public, front_secret = keypair()
        self.keys = {name: keypair() for name in ("n1", "n2")}
        allowed = ", ".join(f'{n} = "{pub}"' for n, (pub, _) in self.keys.items())
        self.front = SupervisorRun(
            self.dir("front"),
            f'host = "{self.client_link.b_ip}"\nmedia = false\n'
            "max_sessions = 4\n[api.ice]\nstun_urls = []\n"
            f'[nodes]\nbind = "tcp://0.0.0.0:{PORT}"\nsecret_key = "{front_secret}"\n'
            f"allowed = {{ {allowed} }}\ntimeout_s = {TIMEOUT_S}\n",
            prefix=self.lab.exec(self.lab.ns("front")),
            host=self.client_link.b_ip,
        )
        self.nodes: dict[str, SupervisorRun] = {}

    def dir(self, host: str) -> Path:
        path = self.base / host
        path.mkdir(exist_ok=True)
        return path

    def node_run(
        self, name: str, secret: str | None = None, host: str | None = None, tag: str = ""
    ) -> SupervisorRun:
        host = host or name
        link = self.links[host]
        secret = secret or self.keys[name][1]
        config = (
            'pipelines = ["passthrough"]\n'
            f'[node]\nname = "{name}"\nsecret_key = "{secret}"\n'
            f'front_public_key = "{self.front_public}"\ntimeout_s = {TIMEOUT_S}\n'
        )
        return SupervisorRun(
            self.dir(tag or f"{name}-{host}"),
            config,
            ["--join", f"tcp://{self.join[host]}"],
            command="node",
            prefix=self.lab.exec(link.b),
        )

    def start_node(self, name: str) -> SupervisorRun:
        run = self.nodes[name] = self.node_run(name).start()
        wait_until(lambda: self.node_up(name), 30, f"node {name} to join")
        return run

    def node_report(self, name: str) -> p.NodeReport | None:
        return next((n for n in self.front.status().nodes if n.node == name), None)

    def node_up(self, name: str) -> bool:
        report = self.node_report(name)
        return report is not None and report.up

    def where(self, session_id: str) -> str | None:
        for n in self.front.status().nodes:
            if session_id in n.sessions:
                return n.node
        return None

    def close(self) -> None:
        for run in [*self.nodes.values(), self.front]:
            if run.proc is not None and run.proc.poll() is None:
                run.stop()
        if self.relay is not None:
            self.relay.terminate()
            self.relay.wait(10)
        self.lab.close()


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    base = Path(tempfile.mkdtemp(prefix="dwn", dir="/tmp"))
    net = Net(base)
    try:
        net.front.start()
        net.start_node("n1")
        net.start_node("n2")
        yield net
    finally:
        net.close()
        shutil.rmtree(base, ignore_errors=True)


@asynccontextmanager
async def streaming(net: Net) -> AsyncIterator[DreamwireClient]:
    url = f"http://{net.client_link.b_ip}:{net.front.port}"
    async with DreamwireClient(url, ice_servers=[]) as client:
        await client.load_pipeline("passthrough")
        client.pattern = PatternTrack(256, 256, 30)
        await client.connect(client.pattern)
        await client.wait_frames(20, timeout_s=30)
        yield client


async def stage_p50(client: DreamwireClient, session_id: str) -> dict[str, float]:
    _, report = await client.request("GET", "/api/v1/metrics")
    session = next(s for s in report["sessions"] if s["session_id"] == session_id)
    return {s["stage"]: s["latency"]["p50_ms"] for s in session["stages"]}


async def test_sessions_spread_over_both_nodes_with_their_content_and_the_delay_shows(
    net: Net,
) -> None:
    async with streaming(net) as first, streaming(net) as second:
        where = {c.session_id: net.where(c.session_id or "") for c in (first, second)}
        assert sorted(map(str, where.values())) == ["n1", "n2"], where
        for client in (first, second):
            await client.wait_frames(30)
            numbers = client.received.numbers
            assert numbers == sorted(numbers) and len(numbers) >= 30
            assert client.pattern is not None and set(numbers) <= set(client.pattern.sent_at)
        # The profile shows what the distance costs: the netem delay on n2's link, each way.
        hops = {
            where[c.session_id]: await stage_p50(c, c.session_id or "") for c in (first, second)
        }
        assert hops["n2"]["to_node"] >= DELAY_MS and hops["n2"]["from_node"] >= DELAY_MS
        assert hops["n1"]["to_node"] < DELAY_MS and hops["n1"]["from_node"] < DELAY_MS
        # A parameter change reaches the session's pipeline on its node: paused, it finishes
        # no frames while that node's decode goes on decoding the camera.
        on_n2 = first if where[first.session_id] == "n2" else second
        await on_n2.send_parameters({"paused": True})
        node = net.nodes["n2"]

        def paused() -> bool:
            done = {s.name: s.frames_done for s in node.status().services}
            last = paused.__dict__.get("last")
            paused.__dict__["last"] = done
            return (
                last is not None
                and done["inference/passthrough"] == last["inference/passthrough"]
                and done["decode"] > last["decode"]
            )

        await async_wait_until(paused, 20, "n2's pipeline to pause")


async def test_a_node_with_a_key_the_front_does_not_know_is_refused(net: Net) -> None:
    _, rogue_secret = keypair()
    rogue = net.node_run("n1", secret=rogue_secret, host="n1", tag="rogue")
    try:
        rogue.start()
        await async_wait_until(
            lambda: "refused a node whose key" in net.front.log(), 20, "the front to refuse it"
        )
        await async_wait_until(
            lambda: "the front refused this node's key" in rogue.log(), 20, "the node to say so"
        )
        assert net.node_up("n1")  # the real n1 is untouched
    finally:
        rogue.stop()


async def test_a_lost_node_stops_its_sessions_and_comes_back_by_itself(net: Net) -> None:
    # Killed: its sessions hear why within the timeout; a new session goes to the other node.
    async with streaming(net) as client:
        victim = net.where(client.session_id or "")
        assert victim is not None
        other = "n2" if victim == "n1" else "n1"
        os.kill(net.nodes[victim].proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        stopped = await client.wait_message("stream_stopped", timeout_s=TIMEOUT_S + 5)
        assert f"media node {victim} lost" in stopped["error_message"]
    async with streaming(net) as client:
        assert net.where(client.session_id or "") == other
    assert net.nodes[victim].stop() == -signal.SIGKILL  # reaped
    net.start_node(victim)  # rejoins

    # Cut off (a pulled cable): the same, and when the link is back the node rejoins alone.
    async with streaming(net) as first, streaming(net) as second:
        cut = "n2"
        client = first if net.where(first.session_id or "") == cut else second
        assert net.where(client.session_id or "") == cut
        net.lab.set_link(net.links[cut], up=False)
        try:
            stopped = await client.wait_message("stream_stopped", timeout_s=TIMEOUT_S + 5)
            assert f"media node {cut} lost" in stopped["error_message"]
        finally:
            net.lab.set_link(net.links[cut], up=True)
        await async_wait_until(lambda: net.node_up(cut), 30, f"{cut} to rejoin")
        # The node closed what nobody watched any more.
        await async_wait_until(
            lambda: not net.nodes[cut].status().sessions, 10, f"{cut}'s sessions closed"
        )
