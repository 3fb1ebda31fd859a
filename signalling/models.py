"""Model files and hardware, as the HTTP API reports them (no torch in this process)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

from signalling.api.errors import DownloadInProgress
from signalling.api.types import GpuInfo, HardwareInfoResponse, ModelsStatusResponse

logger = logging.getLogger(__name__)

#: How long a GPU list (free memory included) is reused before nvidia-smi is asked again.
GPU_PROBE_INTERVAL_S = 2.0


class ModelsLink:
    """Downloads run as ``download_models`` subprocesses; their progress is read from disk."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self._downloads: dict[str, subprocess.Popen[bytes]] = {}
        self._gpus: list[GpuInfo] = []
        self._probed_at = -GPU_PROBE_INTERVAL_S

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
        now = time.monotonic()
        if now - self._probed_at > GPU_PROBE_INTERVAL_S:  # free memory moves; nvidia-smi is slow
            self._probed_at = now
            self._gpus = probe_gpus()
        first = self._gpus[0].memory_total_gb if self._gpus else None
        return HardwareInfoResponse(vram_gb=first, gpus=list(self._gpus))

    async def close(self) -> None:
        for proc in self._downloads.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self._downloads.values():
            await asyncio.to_thread(proc.wait)


def probe_gpus() -> list[GpuInfo]:
    """Every GPU via nvidia-smi (no CUDA libraries in signalling); [] without one."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [
                exe,
                "--query-gpu=index,name,memory.total,memory.free",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
        gpus = []
        for line in out.splitlines():
            if not line.strip():
                continue
            index, name, total, free = (part.strip() for part in line.split(","))
            gpus.append(
                GpuInfo(
                    index=int(index),
                    name=name,
                    memory_total_gb=round(float(total) / 1024, 1),
                    memory_free_gb=round(float(free) / 1024, 1),
                )
            )
        return gpus
    except (OSError, ValueError, subprocess.SubprocessError):
        return []
