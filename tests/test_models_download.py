"""Model downloads against a local fake hub speaking the endpoints huggingface_hub uses."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from conftest import free_port, wait_until

from services.inference import registry
from services.models import downloads
from services.models.store import is_complete

pytestmark = pytest.mark.timeout(90)

COMMIT = "a" * 40
PIPELINE = "streamdiffusion"


def _files_for(repo: str, big: int) -> dict[str, bytes]:
    """Every file the pipeline's artifact patterns select in ``repo``, plus one that they skip."""
    if repo == "madebyollin/taesd":
        return {
            "config.json": b'{"_class_name": "AutoencoderTiny"}',
            "diffusion_pytorch_model.safetensors": os.urandom(big // 4),
            "taesd_decoder.pth": b"not wanted",
        }
    return {
        "model_index.json": b"{}",
        "scheduler/scheduler_config.json": b"{}",
        "text_encoder/config.json": b"{}",
        "text_encoder/model.fp16.safetensors": os.urandom(big // 4),
        "tokenizer/vocab.json": b"{}",
        "tokenizer/merges.txt": b"",
        "unet/config.json": b"{}",
        "unet/diffusion_pytorch_model.fp16.safetensors": os.urandom(big),
        "unet/diffusion_pytorch_model.safetensors": b"fp32 weights: not wanted",
    }


@dataclass
class FakeHub:
    repos: dict[str, dict[str, bytes]]
    port: int = 0
    gated: set[str] = field(default_factory=set)
    #: Bytes per second for file bodies (0 = as fast as possible).
    rate_bps: int = 0
    ranges: list[tuple[str, str]] = field(default_factory=list)
    gets: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _refuse(self, repo: str) -> web.Response | None:
        if repo in self.gated:
            return web.Response(
                status=401,
                headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"},
                text="gated",
            )
        if repo not in self.repos:
            return web.Response(
                status=401,
                headers={"X-Error-Code": "RepoNotFound", "X-Error-Message": "not found"},
                text="not found",
            )
        return None

    async def tree(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if (refusal := self._refuse(repo)) is not None:
            return refusal
        entries = [
            {"type": "file", "path": path, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            for path, data in self.repos[repo].items()
        ]
        return web.json_response(entries)

    async def resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['org']}/{request.match_info['name']}"
        if (refusal := self._refuse(repo)) is not None:
            return refusal
        path = request.match_info["path"]
        data = self.repos[repo].get(path)
        if data is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound"})
        headers = {
            "X-Repo-Commit": COMMIT,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(status=200, headers=headers)
        self.gets.append(path)
        start, status = 0, 200
        if rng := request.headers.get("Range"):
            self.ranges.append((path, rng))
            start = int(rng.removeprefix("bytes=").split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        headers["Content-Length"] = str(len(body))
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        chunk = 64 * 1024
        for i in range(0, len(body), chunk):
            await resp.write(body[i : i + chunk])
            if self.rate_bps:
                await asyncio.sleep(chunk / self.rate_bps)  # throttles the server, not the test
        await resp.write_eof()
        return resp


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    big = 256 * 1024
    fake = FakeHub(
        {repo.repo_id: _files_for(repo.repo_id, big) for repo in registry.get(PIPELINE).artifacts}
    )
    fake.port = free_port()
    app = web.Application()
    app.router.add_route("GET", "/api/models/{org}/{name}/tree/{rev}", fake.tree)
    app.router.add_route("*", "/{org}/{name}/resolve/{rev}/{path:.+}", fake.resolve)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app)
    started = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", fake.port).start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name="fake-hub", daemon=True)
    thread.start()
    assert started.wait(10)
    yield fake
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def _check_files(hub: FakeHub, models_dir: Path) -> None:
    spec = registry.get(PIPELINE)
    for artifact in spec.artifacts:
        assert is_complete(models_dir, artifact.repo_id)
        for path, data in hub.repos[artifact.repo_id].items():
            target = models_dir / artifact.repo_id / path
            if "not wanted" in data.decode(errors="replace"):
                assert not target.exists(), path
            else:
                assert target.read_bytes() == data, path


def test_download_fetches_selected_files_with_progress(hub: FakeHub, tmp_path: Path) -> None:
    assert not downloads.is_downloaded(PIPELINE, tmp_path)
    assert downloads.models_status(PIPELINE, tmp_path) == {"downloaded": False, "progress": None}
    downloads.download(PIPELINE, tmp_path, endpoint=hub.url)
    _check_files(hub, tmp_path)
    status = downloads.models_status(PIPELINE, tmp_path)
    assert status["downloaded"] is True
    progress = status["progress"]
    assert progress["state"] == "done"
    assert progress["percentage"] == 100.0
    assert progress["downloaded_bytes"] == progress["total_bytes"] > 256 * 1024
    assert progress["error"] is None
    # A second run finds everything complete and fetches nothing.
    gets = len(hub.gets)
    downloads.download(PIPELINE, tmp_path, endpoint=hub.url)
    assert len(hub.gets) == gets


def test_interrupted_download_resumes_with_a_range_request(hub: FakeHub, tmp_path: Path) -> None:
    # huggingface_hub writes in 10 MiB chunks: a file of a few chunks, served slowly.
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    hub.repos["stabilityai/sd-turbo"][unet] = os.urandom(24 * 2**20)
    hub.rate_bps = 8 * 2**20
    part = tmp_path / ".partial" / "stabilityai" / "sd-turbo" / f"{unet}.part"
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    cmd = [sys.executable, "-m", "services.models.cli", "--pipeline", PIPELINE]
    cmd += ["--models-dir", str(tmp_path), "--endpoint", hub.url, "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def part_way() -> bool:
            return part.exists() and part.stat().st_size >= 10 * 2**20

        wait_until(part_way, 30, "the download to be part way through the UNet")
        progress = downloads.read_progress(PIPELINE, tmp_path)
        assert progress is not None and progress["state"] == "downloading"
        assert progress["current_file"] == f"stabilityai/sd-turbo/{unet}"
        assert 0 < progress["percentage"] < 100
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
    progress = downloads.read_progress(PIPELINE, tmp_path)
    assert progress is not None and progress["state"] == "interrupted"
    assert not downloads.is_downloaded(PIPELINE, tmp_path)
    hub.rate_bps = 0
    hub.ranges.clear()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    _check_files(hub, tmp_path)
    resumed = [path for path, rng in hub.ranges if rng != "bytes=0-"]
    assert unet in resumed, hub.ranges
    progress = downloads.read_progress(PIPELINE, tmp_path)
    assert progress is not None and progress["state"] == "done"


def test_gated_repo_gives_a_clear_message(hub: FakeHub, tmp_path: Path) -> None:
    hub.gated.add("stabilityai/sd-turbo")
    with pytest.raises(downloads.DownloadError) as info:
        downloads.download(PIPELINE, tmp_path, endpoint=hub.url)
    message = str(info.value)
    assert "stabilityai/sd-turbo" in message and "HF_TOKEN" in message
    progress = downloads.read_progress(PIPELINE, tmp_path)
    assert progress is not None and progress["state"] == "error" and progress["error"] == message


def test_cli_reports_refusal_and_no_network(hub: FakeHub, tmp_path: Path) -> None:
    hub.gated.add("madebyollin/taesd")
    cmd = [sys.executable, "-m", "services.models.cli", "--pipeline", PIPELINE]
    cmd += ["--models-dir", str(tmp_path), "--quiet"]
    out = subprocess.run([*cmd, "--endpoint", hub.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "madebyollin/taesd" in out.stderr and "HF_TOKEN" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_network_gives_a_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.utils._pagination as pagination

    # huggingface_hub retries a refused connection for ~20 s (1, 2, 4, 8, 8 s): once is enough.
    monkeypatch.setattr(
        pagination, "http_backoff", functools.partial(pagination.http_backoff, max_retries=0)
    )
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(downloads.DownloadError) as info:
        downloads.download(PIPELINE, tmp_path, endpoint=dead)
    assert str(info.value).startswith(f"cannot reach the model hub at {dead}")


def test_unknown_pipeline_and_models_not_downloaded_message(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.models.cli", "--pipeline", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "unknown pipeline" in out.stderr
    with pytest.raises(downloads.ModelsNotDownloaded) as info:
        downloads.require_models(registry.get("dream"), tmp_path)
    assert str(info.value) == (
        "models for dream are not downloaded: run download_models --pipeline dream"
    )
    # Pipelines without artifacts are always "downloaded".
    assert downloads.is_downloaded("passthrough", tmp_path)
    json.dumps(downloads.models_status("passthrough", tmp_path))


async def test_a_finished_download_process_is_reaped(tmp_path: Path) -> None:
    from signalling.models import ModelsLink

    link = ModelsLink(tmp_path)
    link.start_download("passthrough")  # nothing to fetch: the process exits at once
    pid = link._downloads["passthrough"].pid
    # The kernel's process table has no event to await: a bounded look, 30 s at most.
    for _ in range(300):
        if not Path(f"/proc/{pid}").exists():  # noqa: ASYNC240 - a /proc lookup, not file I/O
            break
        await asyncio.sleep(0.1)
    else:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]  # noqa: ASYNC240
        raise AssertionError(f"download process {pid} still there (state {state})")
    await link.close()
