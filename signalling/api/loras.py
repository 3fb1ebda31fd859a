"""LoRA files, as Scope's UI lists and fetches them: ``GET /api/v1/loras`` (0.2),
``GET /api/v1/lora/list`` (0.1) and ``POST /api/v1/lora/download``.

The list is what is really in ``<models_dir>/loras`` that a load can use (``.safetensors``; a
pickle never loads here). A download fetches one file from a Hugging Face repository through
the model downloads' resumable path (``services.models.downloads.download_lora``) and keeps it
only if it is a LoRA with the expected hash.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Literal

import msgspec
from aiohttp import web

from services.inference.lora_files import LoraFileError, lora_dir
from signalling.api.errors import ApiError, InvalidParameters, NotSupported
from signalling.api.openapi import Operation, Resp
from signalling.api.state import api_state, decode_body, json_response
from signalling.api.studio_types import LoraFile, LorasResponse
from signalling.api.types import ErrorResponse

#: What a load can use (``services.inference.lora_files``).
LORA_SUFFIX = ".safetensors"


class DownloadFailed(ApiError):
    """The hub could not be reached or refused the file; the detail says which."""

    status = 502
    code = "download_failed"


class LoraDownloadRequest(msgspec.Struct, kw_only=True):
    """``POST /api/v1/lora/download`` (Scope 0.2's shape; unknown keys are ignored)."""

    source: Literal["huggingface", "civitai", "url"] = "huggingface"
    repo_id: str | None = None
    hf_filename: str | None = None
    subfolder: str | None = None
    revision: str = "main"
    expected_sha256: str | None = None


class LoraDownloadResponse(msgspec.Struct, kw_only=True):
    filename: str
    path: str
    sha256: str
    size_bytes: int


_DOWNLOAD = msgspec.json.Decoder(LoraDownloadRequest)


def list_loras(models_dir: Path | None) -> LorasResponse:
    """The LoRA files under ``<models_dir>/loras``, subfolders as ``folder``."""
    if models_dir is None:
        return LorasResponse(lora_files=[])
    root = lora_dir(models_dir)
    files = []
    for path in sorted(root.rglob(f"*{LORA_SUFFIX}")) if root.is_dir() else []:
        if not path.is_file():
            continue
        folder = path.parent.relative_to(root).as_posix()
        files.append(
            LoraFile(
                name=path.stem,
                path=str(path),
                size_mb=round(path.stat().st_size / 2**20, 3),
                folder=None if folder == "." else folder,
                read_only=False,
            )
        )
    return LorasResponse(lora_files=files)


async def loras(request: web.Request) -> web.StreamResponse:
    return json_response(await asyncio.to_thread(list_loras, api_state(request).studio.models_dir))


async def lora_list(request: web.Request) -> web.StreamResponse:
    """Scope 0.1's path for the same list."""
    return await loras(request)


async def download_lora(request: web.Request) -> web.StreamResponse:
    from services.models.downloads import DownloadError
    from services.models.downloads import download_lora as fetch

    body = await decode_body(request, _DOWNLOAD)
    models_dir = api_state(request).studio.models_dir
    if models_dir is None:
        raise NotSupported("this server has no models directory to keep LoRAs in")
    if body.source != "huggingface":
        raise NotSupported(
            f"source {body.source}: dreamwire downloads LoRAs from Hugging Face (repo_id, "
            f"hf_filename); put other files in {lora_dir(models_dir)} yourself"
        )
    if not body.repo_id or not body.hf_filename:
        missing = "repo_id" if not body.repo_id else "hf_filename"
        raise InvalidParameters(f"{missing}: required for a Hugging Face download")
    try:
        got = await asyncio.to_thread(
            fetch,
            body.repo_id,
            body.hf_filename,
            models_dir,
            subfolder=body.subfolder,
            revision=body.revision,
            expected_sha256=body.expected_sha256,
            endpoint=os.environ.get("HF_ENDPOINT"),  # read now, not at huggingface_hub's import
        )
    except LoraFileError as exc:
        raise InvalidParameters(str(exc)) from None
    except DownloadError as exc:
        raise DownloadFailed(str(exc)) from None
    return json_response(
        LoraDownloadResponse(
            filename=got.path.name, path=str(got.path), sha256=got.sha256, size_bytes=got.size_bytes
        )
    )


def lora_operations(tag: str) -> list[Operation]:
    ok = {200: Resp("LoRA files", LorasResponse)}
    refused = "Not a LoRA, wrong hash, or a source other than huggingface"
    return [
        Operation(
            "GET",
            "/api/v1/loras",
            loras,
            "LoRA files in the models directory's loras/",
            tag,
            responses=ok,
        ),
        Operation(
            "GET", "/api/v1/lora/list", lora_list, "LoRA files (Scope 0.1)", tag, responses=ok
        ),
        Operation(
            "POST",
            "/api/v1/lora/download",
            download_lora,
            "Fetch a LoRA file from a Hugging Face repository into loras/ (answers when it is "
            "there; resumes an interrupted one)",
            tag,
            request=LoraDownloadRequest,
            responses={
                200: Resp("The file, checked", LoraDownloadResponse),
                400: Resp(refused, ErrorResponse),
                502: Resp("The hub could not be reached or refused", ErrorResponse),
            },
        ),
    ]
