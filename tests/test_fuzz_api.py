"""The API fuzzed from its own OpenAPI document and with hostile bodies (``scripts/fuzz_api.py``):
no 5xx, no crash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz_api.py"


def test_fuzzing_finds_no_server_error() -> None:
    pytest.importorskip("schemathesis")
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--examples", "60", "--time-limit", "200"],
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-4000:]
    assert " passed" in out.stdout and "ST101" not in out.stdout, out.stdout[-4000:]
    # The hostile bodies (deep nesting, type confusion, oversize) ran too, without a 5xx.
    hostile = out.stdout[out.stdout.index("hostile bodies: ") :]
    assert hostile.rstrip().endswith(", 0 server errors"), hostile
