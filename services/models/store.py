"""The models directory: one folder per Hugging Face repository, a marker when complete.

Layout (default ``~/.dreamwire/models``, env ``DREAMWIRE_MODELS_DIR``, or the config's
``models_dir``)::

    <models_dir>/
      stabilityai/sd-turbo/            the repository's files, as on the hub
        .dreamwire-complete            written last by the downloader (JSON: files, bytes)
      madebyollin/taesd/
      .progress/<pipeline_id>.json     download progress, read by signalling
      .partial/<repo>/<file>.part      bytes of an interrupted download (resumed next time)

Torch-free: signalling imports it to answer ``/api/v1/models/status``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

MODELS_DIR_ENV = "DREAMWIRE_MODELS_DIR"
COMPLETE_MARKER = ".dreamwire-complete"
PROGRESS_DIR = ".progress"
PARTIAL_DIR = ".partial"


def default_models_dir() -> Path:
    if env := os.environ.get(MODELS_DIR_ENV):
        return Path(env).expanduser()
    return Path.home() / ".dreamwire" / "models"


def resolve_models_dir(models_dir: str | Path | None) -> Path:
    return Path(models_dir).expanduser() if models_dir else default_models_dir()


def repo_dir(models_dir: str | Path, repo_id: str) -> Path:
    if ".." in repo_id.split("/") or repo_id.startswith("/"):
        raise ValueError(f"invalid repository id {repo_id!r}")
    return Path(models_dir) / repo_id


def is_complete(models_dir: str | Path, repo_id: str) -> bool:
    return (repo_dir(models_dir, repo_id) / COMPLETE_MARKER).is_file()


def mark_complete(models_dir: str | Path, repo_id: str, files: list[str] | None = None) -> None:
    path = repo_dir(models_dir, repo_id) / COMPLETE_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"files": files or [], "completed_at": time.time()}))
