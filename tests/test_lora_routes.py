"""The LoRA file routes in Scope's shapes: listing, and ``POST /api/v1/lora/download`` from a
local fake hub (the endpoints huggingface_hub uses), resumable, keeping only real LoRAs."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_api_routes import InMemoryBackend
from test_models_download import FakeHub

from services.models import downloads
from signalling.api import ApiConfig, add_api_routes
from signalling.api.state import StudioState

torch = pytest.importorskip("torch")
from safetensors.torch import save  # noqa: E402

pytestmark = pytest.mark.timeout(60)
pytest_plugins = ["test_models_download"]  # its fake hub fixture, ``hub``

REPO = "someone/styles"


def lora_bytes(seed: int = 0) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    key = "diffusion_model.blocks.0.self_attn.q"
    return save(
        {
            f"{key}.lora_down.weight": torch.randn(4, 64, generator=gen),
            f"{key}.lora_up.weight": torch.randn(64, 4, generator=gen),
            f"{key}.alpha": torch.tensor(4.0),
        }
    )


@pytest.fixture
async def client(
    tmp_path: Path,
    hub: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[TestClient[Any, Any]]:
    from aiohttp import web

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    hub.repos[REPO] = {
        "ink.safetensors": lora_bytes(),
        "v2/ink.safetensors": lora_bytes(1),
        "checkpoint.safetensors": save({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}),
        "style.pt": b"\x80\x04pickle",
    }
    app = web.Application()
    add_api_routes(app, InMemoryBackend(), ApiConfig(), studio=StudioState(models_dir=tmp_path))
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def download(client: TestClient[Any, Any], **body: Any) -> tuple[int, Any]:
    resp = await client.post("/api/v1/lora/download", json={"source": "huggingface", **body})
    return resp.status, await resp.json()


async def test_a_lora_downloads_into_the_lora_folder_and_is_listed(
    client: TestClient[Any, Any],
    hub: FakeHub,
    tmp_path: Path,
) -> None:
    data = hub.repos[REPO]["ink.safetensors"]
    status, body = await download(client, repo_id=REPO, hf_filename="ink.safetensors")
    assert status == 200, body
    target = tmp_path / "loras" / "ink.safetensors"
    assert body == {
        "filename": "ink.safetensors",
        "path": str(target),
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
    }
    assert target.read_bytes() == data
    for route in ("/api/v1/loras", "/api/v1/lora/list"):
        listed = (await (await client.get(route)).json())["lora_files"]
        assert [(f["name"], f["path"]) for f in listed] == [("ink", str(target))]
    # Asked again (with the hash it has): the file is there, nothing is fetched.
    gets = len(hub.gets)
    status, again = await download(
        client, repo_id=REPO, hf_filename="ink.safetensors", expected_sha256=body["sha256"]
    )
    assert (status, again, len(hub.gets)) == (200, body, gets)


async def test_a_file_in_a_subfolder_of_the_repository(
    client: TestClient[Any, Any],
    hub: FakeHub,
    tmp_path: Path,
) -> None:
    status, body = await download(
        client, repo_id=REPO, hf_filename="ink.safetensors", subfolder="v2"
    )
    assert status == 200, body
    assert (tmp_path / "loras" / "ink.safetensors").read_bytes() == hub.repos[REPO][
        "v2/ink.safetensors"
    ]


@pytest.mark.parametrize(
    ("body", "code", "detail"),
    [
        ({"hf_filename": "checkpoint.safetensors"}, 400, "a checkpoint, not a LoRA"),
        ({"hf_filename": "ink.safetensors", "expected_sha256": "0" * 64}, 400, "not the expected"),
        ({"hf_filename": "style.pt"}, 400, "only .safetensors"),
        ({"hf_filename": "ink.safetensors", "repo_id": "someone/else"}, 502, "not found"),
        ({"source": "civitai", "hf_filename": "ink.safetensors"}, 400, "downloads LoRAs from"),
        ({"hf_filename": None}, 400, "hf_filename: required"),
    ],
    ids=["checkpoint", "hash", "pickle", "no-repo", "civitai", "no-file"],
)
async def test_what_is_not_a_lora_changes_nothing(
    client: TestClient[Any, Any], tmp_path: Path, body: dict[str, Any], code: int, detail: str
) -> None:
    status, answer = await download(client, **{"repo_id": REPO, **body})
    assert status == code and detail in answer["detail"], answer
    folder = tmp_path / "loras"
    assert not folder.exists() or not any(folder.iterdir())
    staged = tmp_path / ".partial" / "loras"
    assert not staged.exists() or not any(staged.iterdir())


def test_an_interrupted_download_resumes_with_a_range_request(
    hub: FakeHub,
    tmp_path: Path,
) -> None:
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    data = lora_bytes()
    hub.repos[REPO] = {"ink.safetensors": data}
    part = tmp_path / ".partial" / REPO / "ink.safetensors.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])  # what an interrupted run left, with the file's ETag
    url = hf_hub_url(REPO, "ink.safetensors", endpoint=hub.url)
    part.with_name(part.name + ".etag").write_text(
        get_hf_file_metadata(url, endpoint=hub.url).etag or ""
    )
    got = downloads.download_lora(REPO, "ink.safetensors", tmp_path, endpoint=hub.url)
    assert hub.ranges == [("ink.safetensors", "bytes=1000-")]
    assert got.path.read_bytes() == data and got.size_bytes == len(data)
    progress = downloads.read_progress("lora-ink", tmp_path)
    assert progress is not None and progress["state"] == "done"
