"""``WS /ws/gpu``: the token, the binary protocol, and workers that break it."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from types import SimpleNamespace
from typing import Any
from unittest import mock

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from dreams_helpers import decode_number, dreams_config, numbered_webp, serve_dreams

from dreams.wire import MsgType
from signalling.dreams import AUTH_TOKEN_ENV, ExternalWorker
from signalling.dreams.config import DreamsConfig, resolve_auth_token
from signalling.dreams.routes import _authorize_worker

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token"


async def test_token_missing_or_wrong_is_refused_right_one_accepted() -> None:
    config = dreams_config(auth_token=TOKEN)
    async with serve_dreams(config, ExternalWorker()) as (client, hub):
        with pytest.raises(aiohttp.WSServerHandshakeError) as missing:
            await client.ws_connect("/ws/gpu")
        assert missing.value.status == 401
        for header in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN):
            with pytest.raises(aiohttp.WSServerHandshakeError) as wrong:
                await client.ws_connect("/ws/gpu", headers={"Authorization": header})
            assert wrong.value.status in (401, 403)
        assert hub.worker is None

        async with client.ws_connect("/ws/gpu", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            first = await ws.receive(timeout=5)
            assert first.data == bytes([MsgType.PAUSE])  # nobody watches: paused
            assert hub.worker is not None

        # The real worker with a wrong token gives up at once with exit status 2.
        url = str(client.make_url("/ws/gpu"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dreams.worker",
            "--connect",
            url,
            env={"PATH": "/usr/bin:/bin", AUTH_TOKEN_ENV: "wrong"},
            stderr=subprocess.DEVNULL,
        )
        assert await asyncio.wait_for(proc.wait(), 30) == 2


def _request_from(host: str, headers: dict[str, str] | None = None) -> web.Request:
    transport = mock.Mock()
    transport.get_extra_info.side_effect = lambda name, default=None: (
        (host, 40000) if name == "peername" else default
    )
    return make_mocked_request("GET", "/ws/gpu", headers=headers, transport=transport)


def test_without_a_token_only_loopback_workers_are_accepted() -> None:
    idle: Any = SimpleNamespace(worker=None)
    assert _authorize_worker(_request_from("127.0.0.1"), "", idle) is None
    assert _authorize_worker(_request_from("::1"), "", idle) is None
    refused = _authorize_worker(_request_from("10.1.2.3"), "", idle)
    assert refused is not None and refused.status == 403
    right = _request_from("10.1.2.3", {"Authorization": f"Bearer {TOKEN}"})
    assert _authorize_worker(right, TOKEN, idle) is None


def test_a_browser_page_or_a_second_unauthenticated_worker_is_refused() -> None:
    idle: Any = SimpleNamespace(worker=None)
    busy: Any = SimpleNamespace(worker=object())
    page = _request_from("127.0.0.1", {"Origin": "http://127.0.0.1:8000"})
    for token in ("", TOKEN):
        refused = _authorize_worker(page, token, idle)
        assert refused is not None and refused.status == 403
    # Without a token nothing proves who a loopback worker is: it never displaces a live one.
    second = _authorize_worker(_request_from("127.0.0.1"), "", busy)
    assert second is not None and second.status == 409
    # With the token, a new worker may take over (a restarted worker reconnecting).
    again = _request_from("127.0.0.1", {"Authorization": f"Bearer {TOKEN}"})
    assert _authorize_worker(again, TOKEN, busy) is None


def test_the_local_worker_gets_a_token_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DREAM_GEN_AUTH_TOKEN", raising=False)
    first, second = resolve_auth_token(DreamsConfig()), resolve_auth_token(DreamsConfig())
    assert len(first) >= 32 and first != second
    assert resolve_auth_token(DreamsConfig(auth_token="")) == ""


async def test_frames_larger_than_the_resolution_allows_close_the_worker() -> None:
    config = dreams_config(width=16, height=16)  # 768 bytes of pixels
    async with serve_dreams(config, ExternalWorker()) as (client, hub):
        async with client.ws_connect("/ws/gpu") as ws:
            await ws.receive(timeout=5)
            await ws.send_bytes(b"\x01" + b"x" * 5000)
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert hub.cache.recent(30) == []


BAD_MESSAGES: list[tuple[str, str | bytes]] = [
    ("text", "hello"),
    ("empty", b""),
    ("unknown type", b"\x7f"),
    ("hub-to-worker type", bytes([MsgType.PAUSE])),
    ("frame not webp", b"\x01" + b"GIF89a" * 10),
    ("truncated webp", b"\x01" + numbered_webp(1)[:-20]),
    ("status not json", b"\x04{nope"),
    ("status not an object", b"\x04[1, 2]"),
    ("status wrong type", b'\x04{"target_fps": "fast"}'),
    ("status bad fps", b'\x04{"target_fps": -1}'),
    ("state not msgpack", b"\x02\xc1"),
    ("oversized", b"\x03" + b"x" * 5000),
]


async def test_malformed_worker_messages_close_that_worker_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="signalling.dreams")
    config = dreams_config(max_worker_message_bytes=4096)
    async with serve_dreams(config, ExternalWorker()) as (client, hub):
        for name, message in BAD_MESSAGES:
            caplog.clear()
            async with client.ws_connect("/ws/gpu") as ws:
                assert (await ws.receive(timeout=5)).data == bytes([MsgType.PAUSE])
                link = hub.worker
                assert link is not None
                if isinstance(message, str):
                    await ws.send_str(message)
                else:
                    await ws.send_bytes(message)
                closing = await ws.receive(timeout=5)
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), name
            await asyncio.wait_for(link.closed.wait(), 5)
            assert hub.worker is None, name
            assert any("closed worker" in r.getMessage() for r in caplog.records), name

        # The hub is fine: a well-behaved worker streams, numbered as its status says.
        async with client.ws_connect("/ws/gpu") as ws:
            await ws.receive(timeout=5)
            await ws.send_bytes(b"\x04" + json.dumps({"frame_number": 42, "keyframe": 7}).encode())
            await ws.send_bytes(b"\x01" + numbered_webp(42))
            await ws.send_bytes(b"\x01" + numbered_webp(43))  # bare frame: next number
            frame = await hub.next_frame(42, timeout_s=5)
            assert frame is not None
            async with client.get("/api/dreams/current") as resp:
                assert resp.status == 200
                assert resp.headers["X-Keyframe-Number"] == "7"
                assert decode_number(await resp.read()) == int(resp.headers["X-Frame-Number"])
            assert (await hub.next_frame(42, timeout_s=5)) is not None
            assert hub.last_number == 43
        async with client.get("/api/dreams/health") as resp:
            assert resp.status in (200, 503)


async def test_external_worker_is_resumed_paused_and_gets_its_state_back() -> None:
    config = dreams_config(grace_period_s=0.2)
    async with serve_dreams(config, ExternalWorker()) as (client, hub):
        async with client.ws_connect("/ws/gpu") as gpu:
            assert (await gpu.receive(timeout=5)).data == bytes([MsgType.PAUSE])
            async with client.ws_connect("/ws/dreams"):
                assert (await gpu.receive(timeout=5)).data == bytes([MsgType.RESUME])
                await gpu.send_bytes(b"\x01" + numbered_webp(1))
                await hub.wait_state("ready", timeout_s=5)
            # The viewer left: after the grace period, save state, then pause (not shut down:
            # this worker's life is not the hub's).
            assert (await gpu.receive(timeout=5)).data == bytes([MsgType.SAVE_STATE])
            state = msgspec.msgpack.encode({"prompt": "p", "seed": 7, "frame_number": 2})
            await gpu.send_bytes(b"\x02" + state)
            assert (await gpu.receive(timeout=5)).data == bytes([MsgType.PAUSE])
            await hub.wait_state("idle", timeout_s=5)
        # A worker that connects later gets the state back, then waits paused.
        async with client.ws_connect("/ws/gpu") as gpu:
            assert (await gpu.receive(timeout=5)).data == bytes([MsgType.LOAD_STATE]) + state
            assert (await gpu.receive(timeout=5)).data == bytes([MsgType.PAUSE])
