"""Fetch a pipeline's model files from the Hugging Face hub into the models directory.

Used by the ``download_models`` command (:mod:`services.models.cli`) and, through it, by
``POST /api/v1/models/download`` (signalling runs the command as a subprocess). Everything goes
through ``huggingface_hub`` (its endpoint, token, headers, errors): the file list from the
repository tree, each file's metadata from ``HEAD .../resolve/...``, the bytes with its
``http_get``.

* **Progress** is a JSON file, ``<models_dir>/.progress/<pipeline_id>.json``, rewritten
  atomically a few times a second: ``state`` (``downloading | done | error``), ``percentage``,
  ``downloaded_bytes``, ``total_bytes``, ``current_file``, ``error``, ``pid``. Any process
  reads it with :func:`read_progress` (a ``downloading`` file whose writer died reads as
  ``interrupted``).
* **Resume**: bytes go to ``<models_dir>/.partial/<repo>/<file>.part`` and are moved in place
  when complete; the next run continues a ``.part`` with an HTTP range request (restarting it
  if the file changed on the hub: its ETag is kept beside it). Complete files are skipped.
* **Refusals** become one clear sentence (:class:`DownloadError`): a gated or private
  repository needs a token (``HF_TOKEN``), no network names the endpoint.

Torch-free. Importing ``huggingface_hub`` is deferred to the download itself, so signalling's
status answers stay light.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.inference import registry
from services.inference.lora_files import LORA_DIR, LoraFileError, check_lora_file, lora_dir
from services.inference.pipeline import Artifact, PipelineSpec
from services.models.store import (
    PARTIAL_DIR,
    PROGRESS_DIR,
    is_complete,
    mark_complete,
    repo_dir,
)
from services.runtime import pid_alive

logger = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25


class DownloadError(RuntimeError):
    """A download that cannot go on; the message is meant for the user as is."""


class ModelsNotDownloaded(RuntimeError):
    def __init__(self, pipeline_id: str) -> None:
        super().__init__(
            f"models for {pipeline_id} are not downloaded: "
            f"run download_models --pipeline {pipeline_id}"
        )
        self.pipeline_id = pipeline_id


# ---------------------------------------------------------------- status


def is_downloaded(pipeline_id: str, models_dir: str | Path) -> bool:
    spec = registry.get(pipeline_id)
    return all(is_complete(models_dir, a.repo_id) for a in spec.artifacts)


def require_models(spec: PipelineSpec, models_dir: str | Path) -> None:
    """Raise :class:`ModelsNotDownloaded` unless every artifact of ``spec`` is complete."""
    if not all(is_complete(models_dir, a.repo_id) for a in spec.artifacts):
        raise ModelsNotDownloaded(spec.id)


def progress_path(pipeline_id: str, models_dir: str | Path) -> Path:
    return Path(models_dir) / PROGRESS_DIR / f"{pipeline_id}.json"


def read_progress(pipeline_id: str, models_dir: str | Path) -> dict[str, Any] | None:
    """The last progress written for this pipeline, or None when no download ever ran."""
    try:
        data: dict[str, Any] = json.loads(progress_path(pipeline_id, models_dir).read_text())
    except (OSError, ValueError):
        return None
    if data.get("state") == "downloading" and not pid_alive(int(data.get("pid", 0))):
        data["state"] = "interrupted"
    return data


def models_status(pipeline_id: str, models_dir: str | Path) -> dict[str, Any]:
    """``{"downloaded": bool, "progress": {...} | None}`` for ``/api/v1/models/status``."""
    return {
        "downloaded": is_downloaded(pipeline_id, models_dir),
        "progress": read_progress(pipeline_id, models_dir),
    }


# ---------------------------------------------------------------- progress


class Progress:
    """Bytes done over bytes total, written to the progress file and an optional bar."""

    def __init__(self, pipeline_id: str, models_dir: Path, show_bar: bool) -> None:
        self.pipeline_id = pipeline_id
        self.path = progress_path(pipeline_id, models_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total = 0
        self.done = 0
        self.current_file = ""
        self.state = "downloading"
        self.error: str | None = None
        self._written_at = 0.0
        self._bar: Any = None
        self._show_bar = show_bar

    def start(self, total: int) -> None:
        self.total = total
        if self._show_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, desc=f"{self.pipeline_id} models"
            )
        self.write(force=True)

    def file(self, name: str) -> None:
        self.current_file = name
        self.write(force=True)

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        self.write()

    def finish(self, error: str | None = None) -> None:
        self.state = "error" if error else "done"
        self.error = error
        if error is None:
            self.current_file = ""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.write(force=True)

    def snapshot(self) -> dict[str, Any]:
        pct = 100.0 if self.total == 0 else min(100.0, 100.0 * self.done / self.total)
        if self.state == "done":
            pct = 100.0
        return {
            "pipeline_id": self.pipeline_id,
            "state": self.state,
            "percentage": round(pct, 1),
            "downloaded_bytes": self.done,
            "total_bytes": self.total,
            "current_file": self.current_file,
            "error": self.error,
            "pid": os.getpid(),
            "updated_at": time.time(),
        }

    def write(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._written_at < PROGRESS_INTERVAL_S:
            return
        self._written_at = now
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.snapshot()))
        os.replace(tmp, self.path)


class _FileBar:
    """What ``huggingface_hub``'s ``http_get`` drives as its progress bar for one file."""

    def __init__(self, progress: Progress, **_: Any) -> None:
        self._progress = progress

    def __enter__(self) -> _FileBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int | float = 1) -> None:
        self._progress.advance(int(n))

    def close(self) -> None:
        return None


# ---------------------------------------------------------------- download


@dataclass(frozen=True)
class RemoteFile:
    repo_id: str
    path: str
    size: int
    revision: str


def _explain(exc: BaseException, repo_id: str, endpoint: str) -> str:
    """One sentence for the user out of a huggingface_hub / network error."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return (
            f"access to {repo_id} is restricted: accept its terms on the hub, then set HF_TOKEN "
            "to a token of that account (or run `hf auth login`)"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return (
            f"{repo_id} was not found on {endpoint} or needs a token: check the name, or set "
            "HF_TOKEN to a token that can read it"
        )
    if isinstance(exc, hf_errors.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            return (
                f"the hub refused {repo_id} (HTTP {status}): a token is needed, set HF_TOKEN "
                "(or run `hf auth login`)"
            )
        return f"the hub answered HTTP {status} for {repo_id}: {exc}"
    if isinstance(exc, hf_errors.LocalEntryNotFoundError | hf_errors.OfflineModeIsEnabled):
        return f"cannot reach the model hub at {endpoint} (offline?): {exc}"
    if isinstance(exc, OSError) or "connect" in type(exc).__name__.lower():
        return (
            f"cannot reach the model hub at {endpoint}: check the network connection "
            f"(or HF_ENDPOINT) ({type(exc).__name__}: {exc})"
        )
    return f"downloading {repo_id} failed: {type(exc).__name__}: {exc}"


def _list_files(api: Any, artifact: Artifact) -> list[RemoteFile]:
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import filter_repo_objects

    entries = [
        e
        for e in api.list_repo_tree(artifact.repo_id, revision=artifact.revision, recursive=True)
        if isinstance(e, RepoFile)
    ]
    chosen = filter_repo_objects(
        entries, allow_patterns=list(artifact.patterns), key=lambda e: e.path
    )
    return [RemoteFile(artifact.repo_id, e.path, int(e.size), artifact.revision) for e in chosen]


def _fetch(
    remote: RemoteFile,
    models_dir: Path,
    progress: Progress,
    token: str | None,
    endpoint: str | None,
    final: Path | None = None,
) -> None:
    """One file to ``final`` (default: its place in the repository's folder), resumable."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    final = final or repo_dir(models_dir, remote.repo_id) / remote.path
    part = models_dir / PARTIAL_DIR / remote.repo_id / f"{remote.path}.part"
    etag_file = part.with_name(part.name + ".etag")
    if final.is_file() and final.stat().st_size == remote.size and not part.exists():
        progress.advance(remote.size)
        return
    progress.file(f"{remote.repo_id}/{remote.path}")
    url = hf_hub_url(remote.repo_id, remote.path, revision=remote.revision, endpoint=endpoint)
    meta = get_hf_file_metadata(url, token=token, endpoint=endpoint)
    size = meta.size if meta.size is not None else remote.size
    part.parent.mkdir(parents=True, exist_ok=True)
    resume = part.stat().st_size if part.exists() else 0
    old_etag = etag_file.read_text() if etag_file.exists() else None
    if resume and (old_etag != meta.etag or resume > size):
        logger.info("%s changed on the hub or is corrupt: starting over", remote.path)
        part.unlink()
        resume = 0
    etag_file.write_text(meta.etag or "")
    if resume:
        logger.info("resuming %s at %d of %d bytes", remote.path, resume, size)
        progress.advance(resume)
    with open(part, "ab") as f:
        http_get(
            meta.location,
            f,
            resume_size=resume,
            headers=build_hf_headers(token=token),
            expected_size=size,
            displayed_filename=remote.path,
            tqdm_class=functools.partial(_FileBar, progress),  # type: ignore[arg-type]
        )
    got = part.stat().st_size
    if got != size:
        raise DownloadError(f"{remote.repo_id}/{remote.path}: got {got} of {size} bytes")
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, final)
    etag_file.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive(pipeline_id: str, models_dir: Path) -> Iterator[None]:
    lock_path = models_dir / PROGRESS_DIR / f"{pipeline_id}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DownloadError(
                f"a download of {pipeline_id}'s models is already running"
            ) from None
        yield


def download(
    pipeline_id: str,
    models_dir: str | Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    show_bar: bool = False,
) -> Path:
    """Download every artifact of a pipeline (what is complete is skipped); returns the dir.

    Raises :class:`DownloadError` with a message for the user; progress is in the progress
    file throughout (``state: error`` with the same message on failure).
    """
    spec = registry.get(pipeline_id)
    models_dir = Path(models_dir).expanduser()
    models_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive(pipeline_id, models_dir):
        progress = Progress(pipeline_id, models_dir, show_bar)
        try:
            _download_all(spec, models_dir, progress, token, endpoint)
        except DownloadError as exc:
            progress.finish(str(exc))
            raise
        except KeyboardInterrupt:
            progress.finish("interrupted")
            raise
        progress.finish()
    return models_dir


def _download_all(
    spec: PipelineSpec,
    models_dir: Path,
    progress: Progress,
    token: str | None,
    endpoint: str | None,
) -> None:
    from huggingface_hub import HfApi, constants

    api = HfApi(endpoint=endpoint, token=token)
    shown_endpoint = endpoint or constants.ENDPOINT
    plan: list[tuple[Artifact, list[RemoteFile]]] = []
    for artifact in spec.artifacts:
        if is_complete(models_dir, artifact.repo_id):
            continue
        try:
            files = _list_files(api, artifact)
        except Exception as exc:
            raise DownloadError(_explain(exc, artifact.repo_id, shown_endpoint)) from exc
        if not files:
            raise DownloadError(
                f"{artifact.repo_id} has no file matching {', '.join(artifact.patterns)}"
            )
        plan.append((artifact, files))
    progress.start(sum(f.size for _, files in plan for f in files))
    for artifact, files in plan:
        for remote in files:
            try:
                _fetch(remote, models_dir, progress, token, endpoint)
            except DownloadError:
                raise
            except Exception as exc:
                raise DownloadError(_explain(exc, artifact.repo_id, shown_endpoint)) from exc
        mark_complete(models_dir, artifact.repo_id, [f.path for f in files])
        logger.info("%s complete in %s", artifact.repo_id, repo_dir(models_dir, artifact.repo_id))


# ---------------------------------------------------------------- LoRA files


@dataclass(frozen=True)
class LoraDownload:
    """A LoRA file in the LoRA folder (``POST /api/v1/lora/download`` answers with it)."""

    path: Path
    sha256: str
    size_bytes: int


def download_lora(
    repo_id: str,
    filename: str,
    models_dir: str | Path,
    *,
    subfolder: str | None = None,
    revision: str = "main",
    expected_sha256: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> LoraDownload:
    """One LoRA file from a hub repository into ``<models_dir>/loras``, through the model
    downloads' progress file and resume. Only a file that is a LoRA (:func:`check_lora_file`)
    and has the expected hash arrives there: otherwise nothing changes and
    :class:`LoraFileError` says why. A file of that name already there is kept (returned as
    it is when its hash is the one expected)."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url

    models_dir = Path(models_dir).expanduser()
    name = Path(filename).name
    if Path(name).suffix.lower() != ".safetensors" or name != filename.strip("/").split("/")[-1]:
        raise LoraFileError(f"{filename}: only .safetensors LoRAs load here")
    target = lora_dir(models_dir) / name
    remote_path = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
    key = f"lora-{Path(name).stem}"
    shown_endpoint = endpoint or constants.ENDPOINT
    with _exclusive(key, models_dir):
        if target.is_file():
            return _checked_existing(target, expected_sha256)
        progress = Progress(key, models_dir, show_bar=False)
        staging = models_dir / PARTIAL_DIR / LORA_DIR / name
        try:
            url = hf_hub_url(repo_id, remote_path, revision=revision, endpoint=endpoint)
            size = get_hf_file_metadata(url, token=token, endpoint=endpoint).size or 0
            progress.start(size)
            remote = RemoteFile(repo_id, remote_path, size, revision)
            _fetch(remote, models_dir, progress, token, endpoint, final=staging)
        except DownloadError as exc:
            progress.finish(str(exc))
            raise
        except Exception as exc:
            message = _explain(exc, repo_id, shown_endpoint)
            progress.finish(message)
            raise DownloadError(message) from exc
        try:
            digest = _sha256(staging)
            if expected_sha256 and digest != expected_sha256.lower():
                raise LoraFileError(
                    f"{name}: sha256 {digest} is not the expected {expected_sha256.lower()}"
                )
            check_lora_file(name, staging)
        except LoraFileError as exc:
            staging.unlink(missing_ok=True)
            progress.finish(str(exc))
            raise
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, target)
        progress.finish()
        logger.info("LoRA %s from %s (%d bytes) in %s", name, repo_id, size, target.parent)
        return LoraDownload(target, digest, target.stat().st_size)


def _checked_existing(target: Path, expected_sha256: str | None) -> LoraDownload:
    digest = _sha256(target)
    if expected_sha256 and digest != expected_sha256.lower():
        raise LoraFileError(
            f"{target.name}: a different file of that name is already in {target.parent} "
            f"(sha256 {digest})"
        )
    return LoraDownload(target, digest, target.stat().st_size)


def _sha256(file: Path) -> str:
    with file.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
