"""A short run of the load benchmark: many WebSocket viewers, every one gets every frame."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
VIEWERS = 50
SECONDS = 5
FPS = 5.0


def test_fifty_viewers_get_every_frame() -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_dreams.py"),
            *("--viewers", str(VIEWERS), "--seconds", str(SECONDS), "--fps", str(FPS)),
            *("--width", "512", "--height", "256", "--json"),
        ],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
        cwd=ROOT,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["viewers"] == VIEWERS
    assert report["frames_expected_per_viewer"] >= FPS * SECONDS / 2, report
    assert report["viewers_missing_frames"] == 0, report
    assert report["frames_missing_total"] == 0, report
    assert report["viewers_out_of_order"] == 0, report
    # Steady playback near the target rate (loose: a busy CI machine slows the generator).
    assert report["fps_mean"] >= FPS / 2, report
    assert result.returncode == 0, result.stderr[-3000:]
