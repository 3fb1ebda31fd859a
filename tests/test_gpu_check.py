"""``scripts/gpu_check.py --cpu``: the GPU check's dry run on tiny models, so the script that
measures the GPU paths on a lent machine cannot rot between the sessions that have one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_gpu_check_dry_run_passes_and_writes_its_report(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu", "--out", str(tmp_path)],
        check=True,
        timeout=280,
        capture_output=True,
    )
    report = json.loads((tmp_path / "check.json").read_text())
    status = {r["check"]: r["status"] for r in report["checks"]}
    assert "fail" not in status.values(), report
    for name in ("dtypes", "streamdiffusionv2 (2 steps)", "longlive (4 steps)", "fp8 (1.3B)"):
        assert status[name] == "pass", report
    assert all(r["why"] for r in report["checks"] if r["status"] == "skip")
    assert "| longlive (4 steps) | pass |" in (tmp_path / "check.md").read_text()
