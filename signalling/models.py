"""Model files and hardware, as the HTTP API reports them (no torch in this process)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from signalling.api.errors import DownloadInProgress
from signalling.api.types import HardwareInfoResponse, ModelsStatusResponse

logger = logging.getLogger(__name__)


class ModelsLink:
    """Downloads run as ``download_models`` subprocesses; their progress is read from disk."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._downloads: dict[str, subprocess.Popen[bytes]] = {}
        self._vram_gb: float | None = None
        self._probed = False

    def status(self, pipeline_id: str) -> ModelsStatusResponse:
        from services.models import downloads

        progress = downloads.read_progress(pipeline_id, self.models_dir)
        return ModelsStatusResponse(
            downloaded=downloads.is_downloaded(pipeline_id, self.models_dir),
            progress=progress,
        )

    def start_download(self, pipeline_id: str) -> None:
        proc = self._downloads.get(pipeline_id)
        if proc is not None and proc.poll() is None:
            raise DownloadInProgress(pipeline_id)
        self._downloads[pipeline_id] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.models.cli",
                "--pipeline",
                pipeline_id,
                "--models-dir",
                str(self.models_dir),
                "--quiet",
            ],
            stdin=subprocess.DEVNULL,
        )
        logger.info("downloading models for %s", pipeline_id)
        # Reaped the moment it exits (a thread waits on it), so no zombie is left behind.
        asyncio.get_running_loop().run_in_executor(None, self._downloads[pipeline_id].wait)

    def hardware_info(self) -> HardwareInfoResponse:
        if not self._probed:
            self._probed = True
            self._vram_gb = _probe_vram_gb()
        return HardwareInfoResponse(vram_gb=self._vram_gb)

    async def close(self) -> None:
        for proc in self._downloads.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._downloads.values():
            await asyncio.to_thread(proc.wait)


def _probe_vram_gb() -> float | None:
    """Total memory of the first GPU via nvidia-smi (no CUDA libraries in signalling)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        return round(float(out.splitlines()[0]) / 1024, 1)
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None
