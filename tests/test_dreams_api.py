"""The Dreams API as its page documents it, against a hub fed by a real worker process."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from typing import Any

import aiohttp
import pytest
from dreams_helpers import (
    HEIGHT,
    WIDTH,
    RecordingLauncher,
    decode_number,
    dreams_config,
    poll_frames,
    serve_dreams,
)

from signalling.dreams import ExternalWorker

pytestmark = pytest.mark.timeout(60)

RATE_LIMIT_BODY = {"detail": "Rate limit exceeded. Max 60 requests per 60s."}


async def test_viewers_get_increasing_frames_over_ws_polling_and_sse() -> None:
    config = dreams_config(cache_frames=5)
    async with serve_dreams(config) as (client, hub):
        base_url = str(client.make_url("")).rstrip("/")
        # The polling client (the page's Python example) in a thread, a WebSocket viewer here.
        polled: list[tuple[int, bytes]] = []
        poller = threading.Thread(
            target=lambda: polled.extend(poll_frames(base_url, 6, 30.0)), daemon=True
        )
        poller.start()
        ws_frames: list[int] = []
        texts: list[dict[str, Any]] = []
        async with client.ws_connect("/ws/dreams") as ws:
            while len(ws_frames) < 15:
                msg = await ws.receive(timeout=20)
                if msg.type == aiohttp.WSMsgType.BINARY:
                    assert msg.data[0] == 0x01
                    number = decode_number(msg.data[1:])
                    assert number is not None
                    ws_frames.append(number)
                else:
                    texts.append(json.loads(msg.data))
        await asyncio.to_thread(poller.join, 30)

        assert texts[0]["type"] == "status" and texts[0]["status"] == "starting"
        assert {"type": "config", "target_fps": 10.0} in texts
        assert any(t["type"] == "status" and t["status"] == "ready" for t in texts)
        # Every frame, in order, no gaps (the first may be the cached one).
        assert ws_frames == list(range(ws_frames[0], ws_frames[0] + 15))

        assert len(polled) == 6
        numbers = [n for n, _ in polled]
        assert numbers == sorted(set(numbers))
        drawn = [decode_number(data) for _, data in polled]
        assert drawn == sorted(set(drawn))  # type: ignore[type-var]
        # A frame may be released between the client's status and current requests.
        assert all(d is not None and d >= n for d, n in zip(drawn, numbers, strict=True))

        # current: the frame and its headers.
        async with client.get("/api/dreams/current") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "image/webp"
            number = int(resp.headers["X-Frame-Number"])
            assert decode_number(await resp.read()) == number
            assert int(resp.headers["X-Keyframe-Number"]) == (number - 1) // 5
            assert int(resp.headers["X-Generation-Time-Ms"]) >= 0
        # frame/{n}: cached → same headers; evicted (cache of 5) → 404.
        async with client.get(f"/api/dreams/frame/{number}") as resp:
            assert resp.status == 200
            assert resp.headers["X-Frame-Number"] == str(number)
            assert decode_number(await resp.read()) == number
        async with client.get("/api/dreams/frame/1") as resp:
            assert resp.status == 404
            assert "detail" in await resp.json()
        # frames/recent in both formats.
        async with client.get("/api/dreams/frames/recent?count=3") as resp:
            body = await resp.json()
            assert body["count"] == 3
            meta = body["frames"]
            assert [f["frame_number"] for f in meta] == sorted(f["frame_number"] for f in meta)
            assert set(meta[0]) == {
                "frame_number",
                "keyframe_number",
                "timestamp",
                "generation_time_ms",
                "size_bytes",
            }
        async with client.get("/api/dreams/frames/recent?count=2&format=urls") as resp:
            frames = (await resp.json())["frames"]
            prefix = "data:image/webp;base64,"
            assert frames[0]["data_url"].startswith(prefix)
            data = base64.b64decode(frames[0]["data_url"][len(prefix) :])
            assert decode_number(data) == frames[0]["frame_number"]
        async with client.get("/api/dreams/frames/recent?count=31") as resp:
            assert resp.status == 400

        # SSE: a status event at once, then frame events with base64 WebP.
        events: dict[str, list[dict[str, Any]]] = {"status": [], "frame": []}
        async with client.get("/api/dreams/sse") as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            event = ""
            while len(events["frame"]) < 3 or len(events["status"]) < 2:
                line = (await asyncio.wait_for(resp.content.readline(), 10)).decode().strip()
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    events[event].append(json.loads(line[len("data: ") :]))
        assert set(events["status"][0]) == {
            "status",
            "gpu_connected",
            "viewer_count",
            "frame_count",
        }
        assert events["status"][0]["gpu_connected"] is True
        sse_numbers = [f["frame_number"] for f in events["frame"]]
        assert sse_numbers == sorted(set(sse_numbers))
        for f in events["frame"]:
            assert decode_number(base64.b64decode(f["data"])) == f["frame_number"]

        status = hub.status()
        assert status["status"] == "ready"
        assert status["generation"]["resolution"] == [WIDTH, HEIGHT]
        assert status["gpu"]["provider"] == "local"
        assert status["cache"]["frames_cached"] == 5


async def test_codes_limits_and_health_without_a_generator() -> None:
    launcher = RecordingLauncher()
    config = dreams_config(max_connections_per_ip=2)
    async with serve_dreams(config, launcher) as (client, hub):
        # health: 200, and it does not wake the idle generator.
        for _ in range(70):  # nor is it rate limited
            async with client.get("/api/dreams/health") as resp:
                assert resp.status == 200
                body = await resp.json()
        assert body == {
            "status": "healthy",
            "gpu_connected": False,
            "viewer_count": 0,
            "frames_cached": False,
        }
        assert hub.state == "idle" and launcher.starts == 0

        # current before any frame: 204; and the access starts the generator.
        async with client.get("/api/dreams/current") as resp:
            assert resp.status == 204
        await asyncio.wait_for(launcher.started.wait(), 5)
        assert hub.state == "starting"

        # 60 requests a minute per IP (and endpoint), then 429 with the page's body.
        for _ in range(60):
            async with client.get("/api/dreams/status") as resp:
                assert resp.status == 200
        async with client.get("/api/dreams/status") as resp:
            assert resp.status == 429
            assert await resp.json() == RATE_LIMIT_BODY
            assert int(resp.headers["Retry-After"]) >= 1

        async with client.get("/api/dreams/embed") as resp:
            embed = await resp.json()
        base = str(client.make_url("")).rstrip("/")
        assert embed["image_url"] == f"{base}/api/dreams/current"
        assert embed["stream_url"] == base.replace("http", "ws", 1) + "/ws/dreams"
        assert embed["status_url"] == f"{base}/api/dreams/status"
        assert embed["resolution"] == {"width": WIDTH, "height": HEIGHT}
        assert f'src="{base}/dreams?embed=1"' in embed["iframe"]

        async with client.get("/api/dreams/embed", headers={"Host": 'x"><script>'}) as resp:
            assert "<script>" not in (await resp.json())["iframe"]

        # Long-lived connections are capped per IP (here 2): the next upgrade gets 429.
        first = await client.ws_connect("/ws/dreams")
        second = await client.ws_connect("/ws/dreams")
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws/dreams")
        assert refused.value.status == 429
        async with client.get("/api/dreams/sse") as resp:
            assert resp.status == 429 and "detail" in await resp.json()
        await first.close()
        await second.close()

        async with client.get("/dreams") as resp:
            page = await resp.text()
            assert resp.status == 200 and "/ws/dreams" in page and "<header>" in page
        async with client.get("/dreams?embed=1") as resp:
            assert "<header>" not in await resp.text()


async def test_viewer_messages_other_than_ping_are_ignored() -> None:
    async with serve_dreams(dreams_config(), ExternalWorker()) as (client, _hub):
        ws = await client.ws_connect("/ws/dreams")
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "status"
        assert json.loads((await ws.receive(timeout=5)).data)["type"] == "config"
        await ws.send_str('{"type": "subscribe"}')
        await ws.send_str("not json")
        await ws.send_bytes(b"\x01\x02")
        await ws.send_str('["ping"]')
        await ws.send_str('{"type": "ping"}')
        reply = await ws.receive(timeout=5)
        assert json.loads(reply.data) == {"type": "pong"}
        assert not ws.closed
        await ws.close()


async def test_limits_count_the_forwarded_client_behind_a_trusted_proxy() -> None:
    async def statuses(client: Any, forwarded_for: str, n: int) -> list[int]:
        codes = []
        for _ in range(n):
            headers = {"X-Forwarded-For": forwarded_for}
            async with client.get("/api/dreams/status", headers=headers) as resp:
                codes.append(resp.status)
        return codes

    # The test client connects from 127.0.0.1: as a trusted proxy, each forwarded client has
    # its own 60 requests; a spoofed left-most hop changes nothing.
    trusting = dreams_config(trusted_proxies=["127.0.0.0/8"])
    async with serve_dreams(trusting, RecordingLauncher()) as (client, _hub):
        assert await statuses(client, "203.0.113.7", 60) == [200] * 60
        assert await statuses(client, "198.51.100.1, 203.0.113.7", 1) == [429]
        assert await statuses(client, "198.51.100.9", 60) == [200] * 60
    # Without trusted proxies the header is anyone's to send: ignored.
    async with serve_dreams(dreams_config(), RecordingLauncher()) as (client, _hub):
        assert await statuses(client, "203.0.113.7", 60) == [200] * 60
        assert await statuses(client, "198.51.100.9", 1) == [429]


def test_client_ip_rules() -> None:
    from signalling.dreams.client_ip import client_ip, parse_networks

    proxies = parse_networks(["10.0.0.0/8", "::1"])
    assert client_ip("10.1.2.3", "203.0.113.7", proxies) == "203.0.113.7"
    assert client_ip("10.1.2.3", "1.1.1.1, 203.0.113.7, 10.9.9.9", proxies) == "203.0.113.7"
    assert client_ip("::1", "2001:db8::5", proxies) == "2001:db8::5"
    assert client_ip("192.0.2.1", "203.0.113.7", proxies) == "192.0.2.1"  # not a proxy
    assert client_ip("10.1.2.3", "garbage", proxies) == "10.1.2.3"
    assert client_ip("10.1.2.3", None, proxies) == "10.1.2.3"
    assert client_ip(None, "203.0.113.7", proxies) == "unknown"
    with pytest.raises(ValueError, match="trusted_proxies: 'nope'"):
        parse_networks(["nope"])
