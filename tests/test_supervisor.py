"""The supervisor with real processes and sockets: start/stop, restarts, crash cleanup."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from conftest import SupervisorRun, pid_alive, wait_until

from services import protocol as p
from services.runtime import admin_endpoint, control_endpoint, inbox_endpoint
from shm.ring import segments_of_run

pytestmark = pytest.mark.timeout(120)

CHAIN = """
pipelines = ["passthrough"]
[[services]]
name = "testsrc"
kind = "testsrc"
options = { fps = 60 }
[[services]]
name = "testsink"
kind = "testsink"
"""
STAGES = ["testsrc", "inference/passthrough", "testsink"]
Start = Callable[..., SupervisorRun]


def open_chain(run: SupervisorRun, session_id: str = "s1") -> None:
    reply = run.request(p.OpenSession(session_id=session_id, stages=STAGES, width=128, height=96))
    assert isinstance(reply, p.SessionOpened), f"{reply}\n{run.status()}\n{run.log()}"


def sink_frames(run: SupervisorRun) -> int:
    return run.service("testsink").frames_done


def wait_frames_flow(run: SupervisorRun, timeout_s: float = 10, more_than: int = 10) -> None:
    before = sink_frames(run)
    wait_until(lambda: sink_frames(run) > before + more_than, timeout_s, "frames through the chain")


def test_start_stop_clean(start_supervisor: Start) -> None:
    run = start_supervisor(CHAIN)
    assert run.run_dir is not None
    run_id = run.run_dir.name
    pids = run.child_pids()
    assert len(pids) == 6  # decode, encode, inference/passthrough, testsrc, testsink, signalling
    open_chain(run)
    wait_frames_flow(run)
    assert segments_of_run(run_id)
    assert run.stop(signal.SIGTERM) == 0
    assert not any(pid_alive(pid) for pid in pids)
    assert segments_of_run(run_id) == []
    assert not run.run_dir.exists()
    assert "corrupt" not in run.log()


def test_ctrl_c_and_cli_status_stop(start_supervisor: Start) -> None:
    run = start_supervisor(CHAIN)
    cli = [sys.executable, "-m", "supervisor.cli"]
    out = subprocess.run([*cli, "status"], env=run.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    for name in ["inference/passthrough", "testsrc", "testsink", "signalling"]:
        assert name in out.stdout
    assert "ready" in out.stdout
    out = subprocess.run([*cli, "stop"], env=run.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert run.proc is not None
    assert run.proc.wait(20) == 0
    # And Ctrl-C (SIGINT) stops a second run just as cleanly.
    run2 = start_supervisor(CHAIN)
    pids = run2.child_pids()
    assert run2.stop(signal.SIGINT) == 0
    assert not any(pid_alive(pid) for pid in pids)


def test_status_says_starting_until_every_service_is_up(
    start_supervisor: Start, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tools (and these tests) wait for ``running``: while services still come up in order,
    status must say ``starting``, or a client would talk to a server without its API."""
    gate = short_tmp / "gate"
    monkeypatch.setenv("DREAMWIRE_PIPELINES", "gatedpass=slow_pipeline:GATEDPASS")
    monkeypatch.setenv("DREAMWIRE_TEST_LOAD_GATE", str(gate))
    run = start_supervisor(CHAIN.replace('["passthrough"]', '["gatedpass"]'), wait=False)

    def loading() -> p.StatusReport | None:
        report = run.answering()
        return report if report is not None and report.services else None

    report = wait_until(loading, 30, "the supervisor to start the gated pipeline")
    assert report.phase == "starting"
    assert [s.name for s in report.services] == ["inference/gatedpass"]
    cli = [sys.executable, "-m", "supervisor.cli", "status"]
    out = subprocess.run(cli, env=run.env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert " starting " in out.stdout.splitlines()[0]
    gate.touch()

    def running() -> p.StatusReport | None:
        report = run.status()
        return report if report.phase == "running" else None

    report = wait_until(running, 30, "every service to be up")
    assert {s.name for s in report.services} >= {"inference/gatedpass", "signalling"}
    assert all(s.state == "ready" for s in report.services)
    assert run.stop() == 0


@pytest.mark.parametrize(
    "victim", ["testsrc", "inference/passthrough", "testsink", "decode", "encode", "signalling"]
)
def test_kill_9_child_comes_back(start_supervisor: Start, victim: str) -> None:
    run = start_supervisor(CHAIN)
    open_chain(run)
    wait_frames_flow(run)
    old = run.service(victim)
    assert old.pid is not None
    killed_at = time.monotonic()
    os.kill(old.pid, signal.SIGKILL)

    def back() -> bool:
        s = run.service(victim)
        return s.state == "ready" and s.pid != old.pid

    wait_until(back, 3.0, f"{victim} to be back and ready")
    assert time.monotonic() - killed_at < 3.0
    assert run.service(victim).restarts == 1
    wait_frames_flow(run)
    if victim == "signalling":
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{run.port}/health", timeout=5) as resp:
            assert resp.status == 200
    assert run.stop() == 0


def test_supervisor_sigkill_no_orphans_next_start_cleans(
    start_supervisor: Start,
) -> None:
    run = start_supervisor(CHAIN)
    open_chain(run)
    wait_frames_flow(run)
    assert run.run_dir is not None
    run_id = run.run_dir.name
    pids = run.child_pids()
    assert segments_of_run(run_id)
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    killed_at = time.monotonic()
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 2.0, "children to exit")
    assert time.monotonic() - killed_at <= 2.0
    # The crashed run left its segments and sockets; the next start reclaims them.
    assert segments_of_run(run_id)
    assert run.run_dir.exists()
    run2 = start_supervisor(CHAIN)
    assert segments_of_run(run_id) == []
    assert not run.run_dir.exists()
    assert "reclaimed leftovers" in run2.log()
    assert run2.stop() == 0, run2.log()


def test_crash_loop_is_marked_failed_not_restarted_forever(short_tmp: Path) -> None:
    config = """
signalling = false
[[services]]
name = "good"
kind = "testsink"
[[services]]
name = "flaky"
kind = "testsrc"
options = { fail_on_start = "boom: no GPU" }
restart = { max_restarts = 2, window_s = 60, backoff_initial_s = 0.05 }
"""
    run = SupervisorRun(short_tmp, config)
    proc = subprocess.run(run.args, env=run.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "flaky failed to start: flaky died (exit code 1): RuntimeError: boom: no GPU" in (
        proc.stderr
    )
    assert proc.stderr.count("restarting in") == 2
    assert "not restarting it" in proc.stderr
    assert list((short_tmp / "run").iterdir()) == []


def test_garbage_is_rejected_and_services_keep_answering(start_supervisor: Start) -> None:
    run = start_supervisor(CHAIN)
    open_chain(run)
    wait_frames_flow(run)
    assert run.run_dir is not None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    codec = p.inbox_codec()
    wrong = [
        b"\x00\xffgarbage",
        b"",
        codec.encode(p.FrameReady(session_id="nope", ring="x", seq=1)),  # unknown session
        codec.encode(p.BitrateChanged(session_id="s1", bitrate_bps=5)),  # wrong kind for stage
        codec.encode(p.FramesDropped(session_id="s1", stage="nope", count=-5)),  # not a report
    ]
    try:
        for name in [
            "testsrc",
            "inference/passthrough",
            "testsink",
            "decode",
            "encode",
            "signalling",
        ]:
            push = ctx.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 1000)
            push.connect(inbox_endpoint(run.run_dir, name))
            for raw in wrong:
                push.send(raw)
            if name == "testsrc":  # a live session, but testsrc reads no ring for it
                push.send(codec.encode(p.FrameReady(session_id="s1", ring="x", seq=1)))
            push.close()
        # The supervisor's own sockets: a service impostor and a garbage admin request.
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 1000)
        dealer.setsockopt(zmq.IDENTITY, b"impostor")
        dealer.connect(control_endpoint(run.run_dir))
        dealer.send(b"\x93garbage")
        dealer.send(p.supervisor_control_codec().encode(p.Stop()))  # wrong direction
        dealer.close()
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(admin_endpoint(run.run_dir))
        req.send(b"{not msgpack")
        assert req.poll(5000)
        reply = p.admin_client_codec().decode(req.recv())
        assert isinstance(reply, p.Rejected) and reply.reason
        req.close()
    finally:
        ctx.term()

    def all_rejected() -> bool:
        report = run.status()
        per = {s.name: s.rejected for s in report.services}
        return (
            report.rejected >= 3
            and all(per[n] >= len(wrong) - 1 for n in per)
            and per["testsrc"] >= len(wrong)
        )

    wait_until(all_rejected, 10, "every service to count the rejected messages")
    assert all(s.state == "ready" and s.restarts == 0 for s in run.status().services)
    wait_frames_flow(run)
    assert "rejected" in run.log()
    assert run.stop() == 0


def test_a_frozen_stage_is_restarted(start_supervisor: Start) -> None:
    """A live process is not a live loop: a stage that stops answering is replaced."""
    run = start_supervisor("heartbeat_timeout_s = 1.5\n" + CHAIN)
    open_chain(run)
    wait_frames_flow(run)
    frozen = run.service("testsink").pid
    assert frozen is not None
    os.kill(frozen, signal.SIGSTOP)  # alive, but its loop answers nothing

    def replaced() -> bool:
        s = run.service("testsink")
        return s.state == "ready" and s.pid not in (None, frozen)

    wait_until(replaced, 15, "the frozen stage to be replaced")
    assert "no heartbeat answered for" in run.service("testsink").last_error
    assert not pid_alive(frozen)
    wait_frames_flow(run)
    assert run.stop() == 0


def test_a_held_up_supervisor_keeps_its_healthy_stages(start_supervisor: Start) -> None:
    """A supervisor that was itself held up (a loaded box, a debugger) for longer than the
    heartbeat and stall limits does not kill stages that were working all along."""
    run = start_supervisor("heartbeat_timeout_s = 1.0\nstall_timeout_s = 0.5\n" + CHAIN)
    open_chain(run)
    wait_frames_flow(run)
    before = {s.name: (s.pid, s.restarts) for s in run.status().services}
    assert run.proc is not None
    os.kill(run.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(2.5)  # the stimulus: a pause past both limits, not a wait for anything
    finally:
        os.kill(run.proc.pid, signal.SIGCONT)
    # Two status replies: the second comes after a full loop (timers included) since resuming.
    run.status()
    wait_frames_flow(run)
    after = {s.name: (s.pid, s.restarts) for s in run.status().services}
    assert after == before, run.log()
    assert "killing it" not in run.log()
    assert run.stop() == 0


def test_a_long_model_call_is_not_taken_for_a_frozen_process(
    start_supervisor: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call of this model takes 2 s with frames waiting: longer than the heartbeat limit
    # of model processes (1 s here) and than the stall limit (1 s). Its liveness thread answers
    # heartbeats during the calls, so it streams on; frozen (SIGSTOP), it is restarted.
    monkeypatch.setenv("DREAMWIRE_PIPELINES", "slowpass=slow_pipeline:SLOWPASS")
    run = start_supervisor(
        "stall_timeout_s = 1.0\nmodel_heartbeat_timeout_s = 1.0\n"
        + CHAIN.replace('pipelines = ["passthrough"]', 'pipelines = ["slowpass"]')
    )
    stages = ["testsrc", "inference/slowpass", "testsink"]
    reply = run.request(p.OpenSession(session_id="s1", stages=stages, width=128, height=96))
    assert isinstance(reply, p.SessionOpened), reply
    wait_until(lambda: sink_frames(run) >= 4, 30, "four slow calls' frames at the sink")
    slow = run.service("inference/slowpass")
    assert slow.restarts == 0 and slow.state == "ready", run.log()
    assert "killing it" not in run.log() and "corrupt" not in run.log()
    assert slow.pid is not None
    os.kill(slow.pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: run.service("inference/slowpass").pid != slow.pid, 15, "the frozen one killed"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(slow.pid, signal.SIGCONT)
    assert "no heartbeat answered for 1." in run.log() and "the process is frozen" in run.log()


@contextlib.contextmanager
def block_model_session(
    start_supervisor: Start, monkeypatch: pytest.MonkeyPatch, pipeline: str
) -> Iterator[tuple[SupervisorRun, Callable[[dict[str, Any]], None]]]:
    """A session through a ``slow_pipeline`` stand-in under tight limits (1 s heartbeats and
    stalls), and a way to send it parameters; afterwards, the model process was never killed."""
    monkeypatch.setenv("DREAMWIRE_PIPELINES", f"{pipeline}=slow_pipeline:{pipeline.upper()}")
    run = start_supervisor(
        "stall_timeout_s = 1.0\nmodel_heartbeat_timeout_s = 1.0\n"
        + CHAIN.replace('pipelines = ["passthrough"]', f'pipelines = ["{pipeline}"]')
    )
    stages = ["testsrc", f"inference/{pipeline}", "testsink"]
    reply = run.request(p.OpenSession(session_id="s1", stages=stages, width=128, height=96))
    assert isinstance(reply, p.SessionOpened), reply
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 1000)
    assert run.run_dir is not None
    push.connect(inbox_endpoint(run.run_dir, f"inference/{pipeline}"))
    codec = p.inbox_codec()
    try:
        yield run, lambda params: push.send(codec.encode(p.UpdateParameters("s1", params)))
    finally:
        push.close()
        ctx.term()
    service = run.service(f"inference/{pipeline}")
    assert service.restarts == 0 and service.state == "ready", run.log()
    assert "killing it" not in run.log()


def test_a_parameter_change_waiting_for_a_block_is_not_taken_for_a_frozen_process(
    start_supervisor: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A block model's parameter change waits for the session's block in flight (2 s here,
    # over the 1 s heartbeat limit): the liveness thread answers meanwhile, and the wait is
    # judged against the blocks made ahead, so the model streams on. (Scope's UI sends
    # parameters while longlive made blocks of 10 s on a CPU: the process was killed as frozen.)
    with block_model_session(start_supervisor, monkeypatch, "waitpass") as (run, send):
        wait_until(lambda: sink_frames(run) >= 10, 30, "frames at the sink")
        for paused in (True, False):
            send({"paused": paused})
        before = sink_frames(run)
        wait_until(lambda: sink_frames(run) >= before + 10, 30, "frames after the changes")


def test_a_parameter_change_waiting_for_a_first_block_is_not_taken_for_stuck(
    start_supervisor: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first block is made off the loop (3 s) while calls only gather frames; parameter
    # changes keep coming (Scope's UI unpauses as the session opens) and wait for that block.
    # The gathering calls are no history: judged by them (4 × 0 ms, so the 1 s floor) the
    # wait was killed as stuck; it gets a first call's allowance instead.
    with block_model_session(start_supervisor, monkeypatch, "firstwait") as (run, send):

        def unpaused_and_flowing() -> bool:
            send({"paused": False})
            return sink_frames(run) >= 10

        wait_until(unpaused_and_flowing, 30, "frames after the first block")


def test_a_stuck_model_call_is_killed_by_its_own_history(
    start_supervisor: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Calls of 0.6 s, then one that never ends: killed after 4 × 0.6 s (not 1 h, not the
    # first-call limit), with the reason.
    monkeypatch.setenv("DREAMWIRE_PIPELINES", "stuckpass=slow_pipeline:STUCKPASS")
    run = start_supervisor(
        "stall_timeout_s = 1.0\nmodel_heartbeat_timeout_s = 1.0\n"
        + CHAIN.replace('pipelines = ["passthrough"]', 'pipelines = ["stuckpass"]')
    )
    stages = ["testsrc", "inference/stuckpass", "testsink"]
    pid = run.service("inference/stuckpass").pid
    reply = run.request(p.OpenSession(session_id="s1", stages=stages, width=128, height=96))
    assert isinstance(reply, p.SessionOpened), reply
    wait_until(lambda: run.service("inference/stuckpass").pid != pid, 30, "the stuck call killed")
    assert "a model call has run for 2." in run.log() and "its longest recent call, 0.6 s" in (
        run.log()
    )


def test_a_run_whose_lock_is_in_another_dev_shm_is_left_alone(tmp_path: Path) -> None:
    """A second ``supervisor start`` in another mount namespace sees the same run base but not
    the other run's lock: it reclaims a run only when its supervisor is provably dead."""
    from supervisor.rundir import RUN_INFO, reclaim_stale

    live = tmp_path / "0live000"
    live.mkdir()
    (live / RUN_INFO).write_text(json.dumps({"pid": os.getpid()}))
    (live / "control.sock").write_text("")
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    dead = tmp_path / "0dead000"
    dead.mkdir()
    (dead / RUN_INFO).write_text(json.dumps({"pid": dead_pid.pid}))
    reclaimed = reclaim_stale(tmp_path)  # (dead runs' leftovers in /dev/shm go too)
    assert "0dead000" in reclaimed and "0live000" not in reclaimed
    assert live.is_dir() and (live / "control.sock").exists()
    assert not dead.exists()


def test_a_forged_service_identity_takes_over_nothing(start_supervisor: Start) -> None:
    run = start_supervisor(CHAIN)
    open_chain(run)
    wait_frames_flow(run)
    assert run.run_dir is not None
    sink = run.service("testsink")
    assert sink.pid is not None
    codec = p.service_control_codec()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        for identity in (b"testsink", f"testsink#{sink.pid}".encode(), b"testsink#1"):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 1000)
            dealer.setsockopt(zmq.IDENTITY, identity)
            dealer.connect(control_endpoint(run.run_dir))
            # The right name and pid, but not the run's secret; then a forged failure.
            dealer.send(codec.encode(p.Hello(service="testsink", pid=sink.pid, secret="guess")))
            dealer.send(codec.encode(p.ServiceFailed(service="testsink", reason="forged")))
            dealer.close()
    finally:
        ctx.term()
    # (ZeroMQ never lets the second "testsink#<pid>" connect: 4 messages arrive, all refused.)
    wait_until(lambda: run.status().rejected >= 4, 10, "the forged messages to be rejected")
    wait_frames_flow(run)  # the supervisor still talks to the real testsink
    after = run.service("testsink")
    assert (after.pid, after.restarts, after.state) == (sink.pid, 0, "ready")
    assert "testsink failed: forged" not in run.log()
    assert "rejected Hello" in run.log()
