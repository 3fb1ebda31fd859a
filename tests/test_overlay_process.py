"""The overlay as a real process: testsrc → overlay → testsink under ``supervisor start``.

The stand-in model takes 200 ms a call and finds nothing, so frames leave the overlay byte for
byte as they came (testsink verifies every byte) and the model visibly runs beside the video.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import SupervisorRun, wait_until

from services import protocol as p

pytestmark = pytest.mark.timeout(90)

TESTS_DIR = Path(__file__).parent
STAGES = ["testsrc", "overlay", "testsink"]
Start = Callable[..., SupervisorRun]


def config(log_path: Path) -> str:
    return f"""
media = false
signalling = false
[[services]]
name = "testsrc"
kind = "testsrc"
options = {{ fps = 30 }}
[[services]]
name = "overlay"
kind = "overlay"
options = {{ model = "overlay_stand_in:StandInMoondream", model_options = {{ delay_s = 0.2, empty = true, log_path = "{log_path}" }} }}
[[services]]
name = "testsink"
kind = "testsink"
"""  # noqa: E501


def model_calls(log_path: Path) -> int:
    return len(log_path.read_text().splitlines()) if log_path.exists() else 0


def test_slow_model_does_not_slow_the_video_and_overlay_restarts(
    start_supervisor: Start, monkeypatch: pytest.MonkeyPatch, short_tmp: Path
) -> None:
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])
    )
    log_path = short_tmp / "model-calls.log"
    run = start_supervisor(config(log_path))
    params = {"feature": "detect", "inference_interval": 1}
    reply = run.request(
        p.OpenSession(session_id="s1", stages=STAGES, width=128, height=96, params=params)
    )
    assert isinstance(reply, p.SessionOpened), reply

    def sink() -> int:
        return run.service("testsink").frames_done

    def done() -> dict[str, int]:
        return {s.name: s.frames_done for s in run.status().services}

    wait_until(lambda: sink() > 15, 20, "frames through the overlay")
    first = done()
    last = wait_until(
        lambda: (d := done())["testsrc"] >= first["testsrc"] + 90 and d, 20, "90 more frames"
    )
    made = last["testsrc"] - first["testsrc"]
    passed = last["overlay"] - first["overlay"]
    # A 200 ms model would hold the video to 5 fps if the overlay waited for it; it does not
    # (counts come from heartbeats, so allow for their skew).
    assert passed >= 0.6 * made, (first, last)
    assert 3 <= model_calls(log_path) < last["overlay"] / 2
    assert "corrupt" not in run.log()

    old = run.service("overlay")
    assert old.pid is not None
    os.kill(old.pid, signal.SIGKILL)
    wait_until(
        lambda: (s := run.service("overlay")).state == "ready" and s.pid != old.pid,
        10,
        "overlay to come back",
    )
    before = sink()
    wait_until(lambda: sink() > before + 15, 20, "frames through the restarted overlay")
    assert run.stop() == 0
