"""The WebRTC video path end to end: ``supervisor start``, the Python client, real codecs."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from client import ClientError, DreamwireClient, PatternTrack
from conftest import SupervisorRun, async_wait_until

from shm.ring import segments_of_run
from signalling.webrtc.negotiation import negotiated_video_codec

pytestmark = pytest.mark.timeout(120)

CONFIG = """
max_sessions = 2
[api.ice]
stun_urls = []
"""
Start = Callable[..., SupervisorRun]


@pytest.fixture
def server(start_supervisor: Start) -> SupervisorRun:
    return start_supervisor(CONFIG)


@pytest.fixture
async def client(server: SupervisorRun) -> AsyncIterator[DreamwireClient]:
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as c:
        yield c


async def stream(client: DreamwireClient, codec: str | None = None) -> PatternTrack:
    await client.load_pipeline("passthrough")
    client.pattern = PatternTrack(512, 512, 30)
    await client.connect(client.pattern, codec=codec)
    await client.wait_frames(10, timeout_s=30)
    return client.pattern


@pytest.mark.parametrize("codec", ["VP8", "H264"])
async def test_video_comes_back_with_its_content(
    server: SupervisorRun, client: DreamwireClient, codec: str
) -> None:
    pattern = await stream(client, codec)
    await client.wait_frames(30)
    rec = client.received
    assert (rec.width, rec.height) == (512, 512)
    # The frame numbers drawn into the sent frames come back, in order, none invented.
    numbers = rec.numbers
    assert len(numbers) >= 30
    assert numbers == sorted(numbers)
    assert set(numbers) <= set(pattern.sent_at)
    assert rec.latencies_ms and max(rec.latencies_ms) < 5000
    assert client.pc is not None
    negotiated = negotiated_video_codec(client.pc.getTransceivers()[0])
    assert negotiated is not None and negotiated.name == codec
    # The server counted them (heartbeats carry the counts, twice a second).
    await async_wait_until(lambda: server.service("encode").frames_done >= 30, 5, "encode's count")


async def test_parameter_change_takes_effect(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    await stream(client)
    await client.send_parameters({"paused": True})

    def paused_while_decode_runs() -> bool:
        # Paused: inference finishes nothing while decode keeps decoding the camera.
        report = {s.name: s.frames_done for s in server.status().services}
        snap = paused_while_decode_runs.__dict__
        if "inf" in snap and report["inference/passthrough"] == snap["inf"]:
            return report["decode"] - snap["dec"] >= 15
        snap.update(inf=report["inference/passthrough"], dec=report["decode"])
        return False

    await async_wait_until(paused_while_decode_runs, 15, "output to pause while input flows")
    await client.send_parameters({"paused": False})
    await client.wait_frames(10)


async def test_bad_data_channel_messages_get_errors_and_stream_continues(
    client: DreamwireClient,
) -> None:
    await stream(client)
    client._channel.send("not json{")
    assert "not JSON" in (await client.wait_message("error"))["data"]
    await client.send_parameters({"paused": "yes"})
    assert (await client.wait_message("error"))["data"].startswith("paused:")
    # Scope's policy: a key no stage has is ignored, and reported once as a warning.
    await client.send_parameters({"no_such_setting": 1})
    assert "no_such_setting" in (await client.wait_message("warning"))["data"]
    await client.wait_frames(15)


async def test_bad_http_requests_get_clear_answers(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        # An offer before any pipeline is loaded says so.
        status, body = await client.request(
            "POST", "/api/v1/webrtc/offer", {"sdp": "v=0", "type": "offer"}
        )
        assert status == 400 and "not loaded" in body["detail"].lower()
        json_type = {"Content-Type": "application/json"}
        async with http.post(
            f"{base}/api/v1/pipeline/load", data=b"{nope", headers=json_type
        ) as resp:
            assert resp.status == 400
            assert "json" in (await resp.json())["detail"].lower()
        async with http.post(f"{base}/api/v1/pipeline/load", json={"pipeline_id": 5}) as resp:
            assert resp.status == 400 and "pipeline_id" in (await resp.json())["detail"]
        async with http.patch(f"{base}/api/v1/webrtc/offer/nope", json={"candidates": []}) as resp:
            assert resp.status == 404
        async with http.post(
            f"{base}/api/v1/pipeline/load", data=io.BytesIO(b"x" * (2 << 20)), headers=json_type
        ) as resp:
            assert resp.status == 413
    await client.load_pipeline("passthrough")
    status, body = await client.request(
        "POST", "/api/v1/webrtc/offer", {"sdp": "garbage", "type": "offer"}
    )
    assert status == 400 and "sdp" in json.dumps(body).lower()
    status, body = await client.request(
        "POST", "/api/v1/pipeline/load", {"pipeline_id": "no-such-pipeline"}
    )
    assert status == 404
    # Nothing broke: a session still works.
    client.pattern = PatternTrack(512, 512, 30)
    await client.connect(client.pattern)
    await client.wait_frames(10, timeout_s=30)


@pytest.mark.parametrize("victim", ["encode", "decode"])
async def test_media_stage_killed_mid_stream_recovers(
    server: SupervisorRun, client: DreamwireClient, victim: str
) -> None:
    await stream(client)
    pc = client.pc
    pid = server.service(victim).pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await async_wait_until(
        lambda: server.service(victim).pid not in (None, pid), 5, f"{victim} restart"
    )
    # Frames flow again within 3 s, on the same peer connection.
    await client.wait_frames(15, timeout_s=3.0)
    assert client.pc is pc and not client.messages


async def test_inference_killed_stops_stream_with_reason_then_reload_works(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    await stream(client)
    pid = server.service("inference/passthrough").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    stopped = await client.wait_message("stream_stopped")
    assert "inference/passthrough" in stopped["error_message"]
    assert "SIGKILL" in stopped["error_message"]
    await client.disconnect()
    client.received.frames = 0
    await client.load_pipeline("passthrough")
    client.pattern = PatternTrack(512, 512, 30)
    await client.connect(client.pattern)
    await client.wait_frames(10, timeout_s=30)


async def test_concurrency_limit_answers_429(server: SupervisorRun) -> None:
    base = f"http://127.0.0.1:{server.port}"
    clients = [DreamwireClient(base, ice_servers=[]) for _ in range(3)]
    try:
        for c in clients:
            await c.__aenter__()
        await clients[0].load_pipeline("passthrough")
        for c in clients[:2]:
            await c.connect(PatternTrack(256, 256, 15))
        with pytest.raises(ClientError) as info:
            await clients[2].connect(PatternTrack(256, 256, 15))
        assert "429" in str(info.value)
        status, body = await clients[2].request(
            "POST",
            "/api/v1/webrtc/offer",
            {"sdp": clients[2].pc.localDescription.sdp, "type": "offer"},  # type: ignore[union-attr]
        )
        assert status == 429
        assert body == {
            "status": "failed",
            "meta": {"error": "concurrency_limit_reached", "limit": 2},
        }
        # Closing one frees its place.
        await clients[0].disconnect()
        await asyncio.wait_for(clients[2].disconnect(), 10)
        await clients[2].connect(PatternTrack(256, 256, 15))
        await clients[2].wait_frames(5, timeout_s=30)
    finally:
        for c in clients:
            await c.close()


async def test_trickle_ice_and_teardown_free_everything(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    await stream(client)
    assert server.run_dir is not None and client.session_id is not None
    run_id = server.run_dir.name
    candidate = {
        "candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host",
        "sdpMid": "0",
        "sdpMLineIndex": 0,
    }
    status, _ = await client.request(
        "PATCH", f"/api/v1/webrtc/offer/{client.session_id}", {"candidates": [candidate]}
    )
    assert status == 204
    assert len(segments_of_run(run_id)) == 3  # two rings + the run's lock

    def all_free() -> bool:
        report = server.status()
        return not report.sessions and all(s.sessions == 0 for s in report.services)

    # The peer goes away without a DELETE: its session is freed all the same.
    assert client.pc is not None
    await client.pc.close()
    await async_wait_until(all_free, 15, "every stage to drop the session")
    assert [s.name for s in segments_of_run(run_id)] == [f"dreamwire.{run_id}.lock"]
    client.session_id = None
