"""The supervisor's logic in one process, on a fake clock: what it does about each event.

These drive :class:`SupervisorCore` directly (no sockets, no processes): the effects it
returns are what the process layer would carry out.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from services import protocol as p
from services.topology import Kind
from shm.ring import RingError, RingStats
from supervisor.children import State
from supervisor.config import Config, RestartPolicy, ServiceConfig
from supervisor.core import RunInfo, SupervisorCore
from supervisor.events import (
    AdminRequest,
    ControlMessage,
    Exited,
    Kill,
    Reply,
    Send,
    Shutdown,
    Spawn,
    Spawned,
    SpawnFailed,
    Start,
    StartupFailed,
    StopRequested,
    Tick,
)

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cret"
POLICY = RestartPolicy(max_restarts=2, window_s=60.0, backoff_initial_s=0.5, backoff_max_s=5.0)


class DictRings:
    """Rings as names in a dict: what was made and freed."""

    def __init__(self) -> None:
        self.live: dict[str, int] = {}
        self.freed: list[str] = []
        self.capacity = 2**40  # bytes of "shared memory"
        self.fail_next: Exception | None = None

    def create(self, key: str, slots: int, nbytes: int) -> str:
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        name = f"ring.{key}"
        self.live[name] = nbytes
        return name

    def room(self, slots: int, nbytes: int) -> tuple[int, int]:
        return slots * nbytes, self.capacity - sum(slots * n for n in self.live.values())

    def free(self, name: str) -> None:
        del self.live[name]
        self.freed.append(name)

    def stats(self, name: str) -> RingStats:
        return RingStats(published=3, consumed=2, skipped=1, torn=0, pending=0)


class Rig:
    """A core and the processes it asked for: pids are handed out as a process layer would."""

    def __init__(self, **config: Any) -> None:
        config = {"signalling": False, "media": False, "heartbeat_interval_s": 1.0, **config}
        self.config = Config(**config)
        run = RunInfo("run1", "/run", 1, SECRET, Path("/models"), started=0.0)
        self.rings = DictRings()
        self.core = SupervisorCore(self.config, run, self.rings)
        self.next_pid = 100
        self.now = 0.0

    def apply(self, effects: list[Any]) -> list[Any]:
        """Carry out Spawns (a new pid each); return every effect for the test to look at."""
        for effect in effects:
            if isinstance(effect, Spawn):
                self.next_pid += 1
                self.core.handle(Spawned(effect.spec.name, self.next_pid), self.now)
        return effects

    def start(self, svc: ServiceConfig) -> list[Any]:
        return self.apply(self.core.handle(Start([svc]), self.now))

    def add(self, name: str, kind: str = "testsrc") -> None:
        self.start(ServiceConfig(name, Kind(kind), restart=POLICY))
        self.hello_ready(name)

    def hello_ready(self, name: str) -> None:
        child = self.core.children[name]
        assert child.pid is not None
        route = name.encode()
        hello = p.Hello(service=name, pid=child.pid, secret=SECRET)
        assert self.control(route, hello, self.now) == []
        self.apply(self.control(route, p.Ready(name), self.now))

    # The core's one entry point, event by event.

    def control(self, route: bytes, msg: p.ServiceToSupervisor, t: float) -> list[Any]:
        return self.core.handle(ControlMessage(route, msg), t)

    def admin(self, request: p.AdminRequest, t: float) -> tuple[p.AdminReply, list[Any]]:
        effects = self.core.handle(AdminRequest(request), t)
        (reply,) = [e.reply for e in effects if isinstance(e, Reply)]
        return reply, [e for e in effects if not isinstance(e, Reply)]

    def exited(self, pid: int, code: int, t: float) -> list[Any]:
        return self.core.handle(Exited(pid, code), t)

    def spawn_failed(self, name: str, reason: str, t: float) -> list[Any]:
        return self.core.handle(SpawnFailed(name, reason), t)

    def tick(self, to: float) -> list[Any]:
        self.now = to
        return self.apply(self.core.handle(Tick(), to))

    def open(self, stages: list[str], owner: str | None = None) -> p.SessionOpened:
        req = p.OpenSession("s1", 64, 32, stages=stages, sink="signalling", owner=owner)
        reply, effects = self.admin(req, self.now)
        assert isinstance(reply, p.SessionOpened), reply
        self.opened_effects = effects
        return reply


def sent(effects: list[Any], kind: type) -> list[tuple[bytes, Any]]:
    return [
        (e.route, e.message) for e in effects if isinstance(e, Send) and isinstance(e.message, kind)
    ]


def test_start_up_brings_services_up_one_after_the_other() -> None:
    rig = Rig()
    quick = RestartPolicy(max_restarts=0, window_s=60)
    plan = [
        ServiceConfig("inference/x", Kind.INFERENCE, {"pipeline": "x"}, quick),
        ServiceConfig("decode", Kind.DECODE, restart=quick),
        ServiceConfig("signalling", Kind.SIGNALLING, restart=quick),
    ]
    spawned = rig.apply(rig.core.handle(Start(plan), 0.0))
    assert [e.spec.name for e in spawned] == ["inference/x"] and rig.core.phase == "starting"
    # A pipeline that fails to load is its status: start-up goes on.
    nexts = rig.apply(rig.exited(rig.core.children["inference/x"].pid or 0, 1, 1.0))
    assert [e.spec.name for e in nexts if isinstance(e, Spawn)] == ["decode"]
    rig.hello_ready("decode")  # ready: signalling starts
    assert rig.core.children["signalling"].state is State.STARTING
    # A service the run needs, given up on: the run ends, saying why.
    effects = rig.exited(rig.core.children["signalling"].pid or 0, 1, 2.0)
    assert effects == [StartupFailed("signalling failed to start: signalling died (exit code 1)")]
    assert rig.core.phase == "starting"


def test_start_up_ends_running_once_all_are_ready() -> None:
    rig = Rig()
    rig.add("a")
    assert rig.core.phase == "running"


def test_a_hello_must_prove_pid_and_secret() -> None:
    rig = Rig()
    rig.start(ServiceConfig("src", Kind.TESTSRC))
    child = rig.core.children["src"]
    assert child.state is State.STARTING and child.pid == 101
    assert rig.control(b"x", p.Hello("src", 101, "wrong"), 0.0) == []
    assert rig.control(b"y", p.Hello("src", 999, SECRET), 0.0) == []
    assert child.route is None and rig.core.rejected == 2
    rig.control(b"x", p.Ready("src"), 0.0)  # an unproven peer's Ready changes nothing
    assert child.state is State.STARTING and rig.core.rejected == 3
    rig.hello_ready("src")
    assert child.state is State.READY and child.route == b"src"


def test_heartbeats_go_to_ready_children_and_a_silent_media_stage_is_killed_once() -> None:
    rig = Rig(media_heartbeat_timeout_s=1.5)
    rig.add("decode", kind="decode")
    beats = sent(rig.tick(0.0), p.Heartbeat)
    assert beats == [(b"decode", p.Heartbeat(seq=1))]
    assert rig.tick(0.5) == []  # the next heartbeat is due at 1.0
    assert [m.seq for _, m in sent(rig.tick(1.0), p.Heartbeat)] == [2]
    assert not any(isinstance(e, Kill) for e in rig.tick(1.4))
    effects = rig.tick(1.6)  # first heartbeat unanswered for 1.6 s > 1.5 s
    assert Kill(101) in effects
    assert Kill(101) not in rig.tick(1.7)  # killed once; its exit is awaited
    assert "no heartbeat answered" in rig.core.children["decode"].kill_reason


def test_an_answering_child_is_never_killed() -> None:
    rig = Rig(media_heartbeat_timeout_s=1.5)
    rig.add("encode", kind="encode")
    for step in range(20):
        t = step * 1.0
        rig.tick(t)
        ack = p.HeartbeatAck(
            seq=step + 1, frames_done=step, frames_waiting=0, rejected=0, sessions=0
        )
        rig.control(b"encode", ack, t + 0.1)
    assert rig.core.children["encode"].state is State.READY
    assert not rig.core.children["encode"].kill_reason


def test_a_long_model_call_is_judged_by_its_history_and_a_frozen_one_by_its_silence() -> None:
    rig = Rig(model_heartbeat_timeout_s=2.0, stall_timeout_s=1.0, model_call_limit_factor=4.0,
              model_first_call_timeout_s=60.0)  # fmt: skip
    rig.add("inference/slow", kind="inference")
    route = b"inference/slow"
    child = rig.core.children["inference/slow"]

    def beat(t: float, running: float, longest: float, done: int) -> list[Any]:
        effects = rig.tick(t)
        for _, hb in sent(effects, p.Heartbeat):
            ack = p.HeartbeatAck(hb.seq, done, 3, 0, 1, None, running, longest, done)
            rig.control(route, ack, t)
        return effects

    # The first call runs 40 s (it compiles) with frames waiting: liveness answered all along.
    for t in range(41):
        assert not any(isinstance(e, Kill) for e in beat(float(t), float(t), 0.0, 0)), t
    # Calls of 10 s each, then one running past 4 × 10 s: stuck.
    for t in range(41, 80):
        assert not any(isinstance(e, Kill) for e in beat(float(t), (t - 41) % 10 + 0.5, 10.0, 3))
    for t in range(80, 121):
        effects = beat(float(t), float(t - 80), 10.0, 7)
        assert not any(isinstance(e, Kill) for e in effects), t
    effects = beat(121.0, 41.0, 10.0, 7)
    assert Kill(child.pid or 0) in effects
    assert child.kill_reason == (
        "a model call has run for 41.0 s, over 40.0 s (4× its longest recent call, 10.0 s): stuck"
    )
    # Restarted, the new process is judged on its own calls, not the killed one's last report
    # (it was killed again 0.15 s after each ready, for good).
    old_pid = child.pid
    rig.apply(rig.core.handle(Exited(old_pid or 0, -9), 121.5))
    rig.apply(rig.tick(122.0))
    assert child.pid not in (None, old_pid)
    rig.hello_ready("inference/slow")
    for at in (122.2, 123.0, 124.0):
        assert not any(isinstance(e, Kill) for e in rig.tick(at)), child.kill_reason


def test_a_frozen_model_process_is_killed_by_the_heartbeat_limit() -> None:
    rig = Rig(model_heartbeat_timeout_s=2.0)
    rig.add("inference/x", kind="inference")
    child = rig.core.children["inference/x"]
    rig.tick(0.0)  # a heartbeat goes out and is never answered (SIGSTOP)
    assert not any(isinstance(e, Kill) for e in rig.tick(2.0))
    assert Kill(child.pid or 0) in rig.tick(2.1)
    assert child.kill_reason == "no heartbeat answered for 2.1 s: the process is frozen"


def test_a_first_model_call_has_its_own_limit() -> None:
    rig = Rig(model_first_call_timeout_s=30.0, heartbeat_interval_s=1.0)
    rig.add("inference/x", kind="inference")
    child = rig.core.children["inference/x"]
    for t in range(32):
        for _, hb in sent(rig.tick(float(t)), p.Heartbeat):
            ack = p.HeartbeatAck(hb.seq, 0, 1, 0, 1, None, float(t), 0.0, 0)
            rig.control(b"inference/x", ack, float(t))
    assert child.kill_reason == (
        "its first model call has run for 31 s, over model_first_call_timeout_s (30 s): stuck"
    )


def test_a_crash_restarts_with_backoff_until_the_budget_is_spent() -> None:
    rig = Rig()
    rig.add("src")
    rig.now = 10.0
    assert rig.exited(101, -9, 10.0) == []
    child = rig.core.children["src"]
    assert child.state is State.RESTARTING and child.restart_due == pytest.approx(10.5)
    assert "killed by SIGKILL" in child.last_error
    assert not any(isinstance(e, Spawn) for e in rig.tick(10.4))
    assert any(isinstance(e, Spawn) for e in rig.tick(10.5))
    assert child.state is State.STARTING and child.pid == 102
    rig.exited(102, 1, 11.0)
    assert child.restart_due == pytest.approx(12.0)  # backoff doubles
    rig.tick(12.0)
    rig.exited(103, 1, 12.5)  # a third failure within the window: given up
    assert child.state is State.FAILED and child.restarts == 2


def test_a_process_that_cannot_be_started_is_tried_again_later() -> None:
    rig = Rig()
    rig.add("src")
    rig.exited(101, -9, 0.0)
    rig.now = 0.5
    assert [e for e in rig.core.handle(Tick(), 0.5) if isinstance(e, Spawn)]
    # fork failed (EAGAIN, EMFILE): no pid; the supervisor lives and tries again with backoff.
    assert rig.spawn_failed("src", "[Errno 24] Too many open files", 0.5) == []
    child = rig.core.children["src"]
    assert child.state is State.RESTARTING and child.pid is None
    assert child.last_error == "src could not be started: [Errno 24] Too many open files"
    assert any(isinstance(e, Spawn) for e in rig.tick(child.restart_due))


def test_session_rings_wiring_and_a_stage_that_comes_back() -> None:
    rig = Rig()
    for name in ("src", "mid", "sink"):
        rig.add(name)
    reply = rig.open(["src", "mid", "sink"], owner="owner")
    assert reply.stages == ["src", "mid", "sink"]
    assert reply.rings == ["ring.s1.0", "ring.s1.1"] and rig.rings.live["ring.s1.0"] == 64 * 32 * 3
    starts = dict(sent(rig.opened_effects, p.StartSession))
    assert starts[b"src"].input_ring is None and starts[b"src"].output_ring == "ring.s1.0"
    assert starts[b"mid"].input_ring == "ring.s1.0" and starts[b"mid"].downstream == "sink"
    assert starts[b"sink"].output_ring is None and starts[b"sink"].downstream == "signalling"
    # mid crashes and restarts: once Ready again it is given the session anew.
    rig.exited(rig.core.children["mid"].pid or 0, -11, 1.0)
    rig.tick(2.0)
    mid = rig.core.children["mid"]
    route = b"mid2"
    rig.control(route, p.Hello("mid", mid.pid or 0, SECRET), 2.0)
    again = sent(rig.control(route, p.Ready("mid"), 2.0), p.StartSession)
    assert again == [(route, starts[b"mid"])]
    status = rig.core.status(3.0)
    assert [r.producer for r in status.rings] == ["src", "mid"] and status.sessions == ["s1"]
    closed = rig.admin(p.CloseSession("s1"), 3.0)
    assert closed[0] == p.Ack() and len(sent(closed[1], p.EndSession)) == 3
    assert rig.rings.live == {} and sorted(rig.rings.freed) == reply.rings


def test_an_inference_crash_fails_its_sessions_and_an_owner_crash_closes_them() -> None:
    rig = Rig()
    rig.add("owner")
    rig.add("inference/x", kind="inference")
    rig.add("sink")
    rig.open(["inference/x", "sink"], owner="owner")
    effects = rig.exited(rig.core.children["inference/x"].pid or 0, -9, 1.0)
    ((route, failed),) = sent(effects, p.SessionFailed)
    assert route == b"owner" and failed.service == "inference/x"
    assert "inference/x died (killed by SIGKILL)" in failed.reason
    effects = rig.exited(rig.core.children["owner"].pid or 0, 1, 2.0)
    assert [r for r, _ in sent(effects, p.EndSession)] == [b"sink"]  # inference/x is down
    assert rig.core.sessions.sessions == {} and rig.rings.live == {}


def test_unload_stops_then_kills_and_a_failed_load_can_be_asked_again() -> None:
    rig = Rig(stop_timeout_s=3.0)
    loads = [p.PipelineLoad("passthrough")]
    reply, effects = rig.admin(p.LoadPipelines(loads), 0.0)
    assert reply == p.Ack() and [e.spec.name for e in rig.apply(effects)] == [
        "inference/passthrough"
    ]
    child = rig.core.children["inference/passthrough"]
    rig.exited(child.pid or 0, 1, 1.0)  # died while loading: the pipeline's error
    assert child.state is State.FAILED
    assert rig.core.pipelines.states()[0].status == "error"
    _, effects = rig.admin(p.LoadPipelines(loads), 2.0)  # asked again: tried once more
    rig.apply(effects)
    assert child.state is State.STARTING
    rig.hello_ready("inference/passthrough")
    assert rig.core.pipelines.states()[0].status == "loaded"
    _, effects = rig.admin(p.LoadPipelines([]), 5.0)
    assert sent(effects, p.Stop) == [(b"inference/passthrough", p.Stop(reason="unloaded"))]
    assert child.state is State.STOPPING and rig.core.pipelines.states() == []
    assert Kill(child.pid or 0) not in rig.tick(7.9)
    assert Kill(child.pid or 0) in rig.tick(8.1)  # ignored Stop for longer than 3 s
    rig.exited(child.pid or 0, -9, 8.2)
    assert "inference/passthrough" not in rig.core.children


def test_a_load_changing_only_session_settings_keeps_the_process() -> None:
    rig = Rig()

    def load(**params: Any) -> list[Any]:
        loads = [p.PipelineLoad("moondream", params, load_keys=["compile_model"])]
        reply, effects = rig.admin(p.LoadPipelines(loads), 0.0)
        assert reply == p.Ack()
        return rig.apply(effects)

    assert [e.spec.name for e in load(feature="detect") if isinstance(e, Spawn)] == ["overlay"]
    rig.hello_ready("overlay")
    pid = rig.core.children["overlay"].pid
    # Scope's UI sends a node's settings with each load: the model is not loaded again.
    assert load(feature="caption", max_tokens=16) == []
    assert rig.core.children["overlay"].pid == pid
    (state,) = rig.core.pipelines.states()
    assert state.load_params == {"feature": "caption", "max_tokens": 16}
    # A load-time key does reload it.
    assert sent(load(feature="caption", compile_model=True), p.Stop) == [
        (b"overlay", p.Stop(reason="unloaded"))
    ]


def test_bad_requests_are_refused_with_the_reason() -> None:
    rig = Rig()
    rig.add("src")
    reply, _ = rig.admin(p.OpenSession("s1", 64, 32, stages=["src", "gone"]), 0.0)
    assert isinstance(reply, p.Rejected) and "unknown stage(s): gone" in reply.reason
    reply, _ = rig.admin(p.OpenSession("s1", 64, 32, pipeline_ids=["krea"]), 0.0)
    assert isinstance(reply, p.Rejected) and reply.why == "not_loaded"
    assert reply.reason == "Pipeline not loaded. Please load pipeline first."
    reply, _ = rig.admin(p.OpenSession("s 1", 64, 32, stages=["src"]), 0.0)
    assert isinstance(reply, p.Rejected) and "session_id" in reply.reason
    reply, _ = rig.admin(p.LoadPipelines([p.PipelineLoad("../x")]), 0.0)
    assert isinstance(reply, p.Rejected) and "invalid pipeline id" in reply.reason
    assert rig.admin(p.Shutdown(reason="bye"), 0.0) == (p.Ack(), [StopRequested("bye")])
    assert rig.rings.live == {}


def test_a_session_without_room_for_its_rings_is_refused_and_the_others_go_on() -> None:
    rig = Rig()
    for name in ("src", "mid", "sink"):
        rig.add(name)
    rig.open(["src", "mid", "sink"])  # two rings of 4 × 64×32×3 bytes
    ring = 4 * 64 * 32 * 3
    rig.rings.capacity = 2 * ring + ring  # room for one more ring, not two
    big = p.OpenSession("s2", 64, 32, stages=["src", "mid", "sink"], sink="signalling")
    reply, effects = rig.admin(big, 0.0)
    assert isinstance(reply, p.Rejected) and reply.why == "unavailable"
    assert reply.reason == (
        f"no room in /dev/shm for a 64×32 session: {2 * ring / 2**20:.1f} MB needed, "
        f"{ring / 2**20:.1f} MB free"
    )
    assert effects == [] and list(rig.core.sessions.sessions) == ["s1"]
    assert len(rig.rings.live) == 2  # s1's, untouched
    # Space taken between the check and the ring (another process): the same answer, nothing
    # half made.
    rig.rings.capacity = 2**40
    rig.rings.fail_next = RingError("no room in /dev/shm for ring s2.1: size 28672 bytes")
    reply, _ = rig.admin(big, 0.0)
    assert isinstance(reply, p.Rejected) and reply.why == "unavailable"
    assert reply.reason.startswith("no room in /dev/shm for a 64×32 session")
    assert list(rig.core.sessions.sessions) == ["s1"] and len(rig.rings.live) == 2


def test_a_dreams_worker_is_a_plain_child_its_owner_hears_of() -> None:
    rig = Rig(stop_timeout_s=3.0)
    rig.add("signalling", kind="signalling")
    start = p.StartWorker("dreams", ["--connect", "ws://x/ws/gpu"], token="t", owner="signalling")
    reply, effects = rig.admin(start, 0.0)
    (spawn,) = rig.apply(effects)
    assert reply == p.Ack() and spawn.spec.options == {"args": start.args, "token": "t"}
    worker = rig.core.children["dreams-worker/dreams"]
    assert worker.state is State.READY  # no Hello: up once started
    for t in (1.0, 2.0, 30.0, 60.0):  # no heartbeats, so never killed for silence
        effects = rig.tick(t)
        assert Kill(worker.pid or 0) not in effects
        assert not [e for e in sent(effects, p.Heartbeat) if e[0] != b"signalling"]
        ack = p.HeartbeatAck(seq=0, frames_done=0, frames_waiting=0, rejected=0, sessions=0)
        rig.control(b"signalling", ack, t)
    effects = rig.exited(worker.pid or 0, -9, 61.0)
    assert sent(effects, p.WorkerExited) == [
        (
            b"signalling",
            p.WorkerExited("dreams-worker/dreams", "dreams-worker/dreams died (killed by SIGKILL)"),
        )
    ]
    assert "dreams-worker/dreams" not in rig.core.children  # not restarted: the hub decides
    rig.apply(rig.admin(start, 62.0)[1])
    pid = rig.core.children["dreams-worker/dreams"].pid or 0
    reply, effects = rig.admin(p.StopWorker("dreams"), 63.0)
    assert effects == [Kill(pid, signal.SIGTERM)]
    assert Kill(pid) in rig.tick(66.5)  # still there after the stop deadline
    assert rig.exited(pid, -9, 66.6) == []  # asked for: no news to the owner
    assert rig.admin(p.StopWorker("dreams"), 67.0) == (p.Ack(), [])
    assert isinstance(rig.admin(p.StartWorker("../x", []), 67.0)[0], p.Rejected)
    rig.apply(rig.admin(start, 68.0)[1])  # at shutdown: Stop to services, SIGTERM to it
    effects = rig.core.handle(Shutdown("bye"), 69.0)
    assert sent(effects, p.Stop) == [(b"signalling", p.Stop(reason="bye"))]
    assert Kill(rig.core.children["dreams-worker/dreams"].pid or 0, signal.SIGTERM) in effects


def test_sessions_spread_over_devices_and_a_crash_stops_only_its_own() -> None:
    rig = Rig(devices=["cuda:0", "cuda:1"], media=True)
    rig.add("owner")
    rig.start(ServiceConfig("encode", Kind.ENCODE, restart=POLICY))
    rig.hello_ready("encode")
    _, effects = rig.admin(p.LoadPipelines([p.PipelineLoad("testcard")]), 0.0)
    spawned = rig.apply(effects)
    names = ["inference/testcard@cuda:0", "inference/testcard@cuda:1"]
    assert [e.spec.name for e in spawned] == names
    assert [e.spec.options["device"] for e in spawned] == ["cuda:0", "cuda:1"]
    assert rig.core.pipelines.states()[0].status == "loading"
    rig.hello_ready(names[0])
    assert rig.core.pipelines.states()[0].status == "loaded"  # sessions can go to cuda:0
    rig.hello_ready(names[1])
    assert rig.core.pipelines.states()[0].status == "loaded"
    gib = 2**30
    for name, free in zip(names, (4 * gib, 12 * gib), strict=True):  # cuda:1 has more room
        ack = p.HeartbeatAck(1, 0, 0, 0, 0, memory_free_bytes=free)
        rig.control(name.encode(), ack, 0.5)

    def open_text(session_id: str) -> list[str]:
        req = p.OpenSession(
            session_id, 64, 32, pipeline_ids=["testcard"], modes=["text"], owner="owner"
        )
        reply, _ = rig.admin(req, 1.0)
        assert isinstance(reply, p.SessionOpened), reply
        return reply.stages

    assert open_text("a") == [names[1], "encode"]  # the most free memory
    for name in names:  # equal room now: the fewer sessions
        rig.control(name.encode(), p.HeartbeatAck(2, 0, 0, 0, 0, memory_free_bytes=gib), 1.0)
    assert open_text("b") == [names[0], "encode"]
    effects = rig.exited(rig.core.children[names[1]].pid or 0, -9, 2.0)
    assert [m.session_id for _, m in sent(effects, p.SessionFailed)] == ["a"]
    assert rig.core.pipelines.states()[0].status == "loaded"  # cuda:0 still serves
    status = {s.name: s for s in rig.core.status(3.0).services}
    assert status[names[0]].device == "cuda:0" and status[names[0]].memory_free_bytes == gib


def test_one_request_opens_a_session_settled_from_the_loaded_pipeline() -> None:
    """The supervisor plans the chain, takes the size the pipeline was loaded at, the first of
    the offer's modes it supports, and the client's parameters over the loaded session
    settings: the stages start with them and the answer says what was chosen."""
    rig = Rig(media=True)
    rig.add("owner")
    rig.start(ServiceConfig("encode", Kind.ENCODE, restart=POLICY))
    rig.hello_ready("encode")
    load = {"height": 64, "width": 96, "prompts": [{"text": "loaded", "weight": 1.0}]}
    rig.apply(rig.admin(p.LoadPipelines([p.PipelineLoad("testcard", load)]), 0.0)[1])
    waiting = p.OpenSession("early", owner="owner", modes=["video", "text"])
    reply, _ = rig.admin(waiting, 0.1)
    assert reply == p.Rejected(
        "Pipeline is still loading. Wait for status 'loaded'.", why="not_loaded"
    )
    rig.hello_ready("inference/testcard")

    # A camera offered to a text-only generator: text, the offer's second choice.
    # Scope's UI repeats the load settings: the same value passes quietly, another is reported.
    params = {"paused": True, "volume": 3, "height": 64, "width": 100}
    offer = p.OpenSession("s1", owner="owner", modes=["video", "text"], params=params)
    reply, effects = rig.admin(offer, 1.0)
    assert isinstance(reply, p.SessionOpened), reply
    assert (reply.pipeline_ids, reply.width, reply.height, reply.mode) == (
        ["testcard"],
        96,
        64,
        "text",
    )
    assert reply.stages == ["inference/testcard", "encode"]
    assert reply.params == {"paused": True, "prompts": [{"text": "loaded", "weight": 1.0}]}
    assert reply.unknown == ["volume"] and reply.load_time == ["width"]
    starts = sent(effects, p.StartSession)
    assert [route for route, _ in starts] == [b"inference/testcard", b"encode"]
    assert all(
        (m.width, m.height, m.mode, m.params) == (96, 64, "text", reply.params) for _, m in starts
    )
    # A bad value is refused naming it, an offer that only sends video likewise: no session.
    bad = p.OpenSession("s2", owner="owner", modes=["text"], params={"paused": "sometimes"})
    reply, effects = rig.admin(bad, 1.0)
    assert isinstance(reply, p.Rejected) and reply.why == "invalid" and effects == []
    assert reply.reason.startswith("paused: ") and reply.problems == [reply.reason]
    reply, _ = rig.admin(p.OpenSession("s3", owner="owner", modes=["video"]), 1.0)
    problem = "mode: testcard does not support video input"
    assert reply == p.Rejected(problem, why="invalid", problems=[problem])
    reply, _ = rig.admin(p.OpenSession("s4", pipeline_ids=["longlive"], modes=["text"]), 1.0)
    assert isinstance(reply, p.Rejected) and reply.why == "invalid"
    assert reply.reason.startswith("pipeline_ids: longlive not loaded")
    assert list(rig.core.sessions.sessions) == ["s1"]
