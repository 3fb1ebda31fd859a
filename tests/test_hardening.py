"""Hostile and unlucky inputs against ``supervisor start``: each is refused clearly while a live
stream keeps flowing."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from client import DreamwireClient, PatternTrack
from conftest import SupervisorRun, async_wait_until

from shm.ring import segments_of_run

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[api.ice]
stun_urls = []
"""
Start = Callable[..., SupervisorRun]
HEADER = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
SECTION = (
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=sendrecv\r\n"
    "a=rtpmap:96 VP8/90000\r\na=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=96\r\n"
    + "a=rtcp-fb:96 nack\r\n"
    * 60
)


@pytest.fixture
def server(start_supervisor: Start) -> SupervisorRun:
    return start_supervisor(CONFIG)


@pytest.fixture
async def client(server: SupervisorRun) -> AsyncIterator[DreamwireClient]:
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as c:
        await c.load_pipeline("passthrough")
        c.pattern = PatternTrack(256, 256, 30)
        await c.connect(c.pattern)
        await c.wait_frames(10, timeout_s=30)
        yield c


async def test_huge_offers_are_refused_while_a_stream_keeps_its_frames(
    client: DreamwireClient,
) -> None:
    hostile = {
        "1000 m-lines": (HEADER + SECTION * 1000)[: 1 << 20],
        "many m-lines, few bytes": HEADER + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\n" * 40,
        "a long line": HEADER + "a=" + "x" * 60_000 + "\r\n",
    }
    async with aiohttp.ClientSession() as http:

        async def offer(sdp: str) -> tuple[int, dict[str, str]]:
            body = io.BytesIO(json.dumps({"sdp": sdp, "type": "offer"}).encode())
            async with http.post(
                client.base_url + "/api/v1/webrtc/offer",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                return resp.status, await resp.json()

        async def barrage() -> list[tuple[int, dict[str, str]]]:
            rounds = [offer(sdp) for sdp in hostile.values() for _ in range(4)]
            return list(await asyncio.gather(*rounds))

        answers, _ = await asyncio.gather(barrage(), client.wait_frames(20, timeout_s=10))
    for status, body in answers:
        assert status in (400, 413), body
        if status == 400:
            assert body["error"] == "invalid_sdp" and body["detail"].startswith("sdp: "), body


@pytest.mark.parametrize(
    ("sdp", "detail"),
    [
        (
            HEADER + SECTION.replace("SAVPF 96 97", "SAVPF 96 abc"),
            "sdp: line 5 (m=): payload type 'abc' is not a number from 0 to 127",
        ),
        (
            HEADER + SECTION.replace("rtpmap:96 VP8", "rtpmap:abc VP8"),
            "sdp: line 8 (a=rtpmap): payload type 'abc' is not a number from 0 to 127",
        ),
    ],
)
async def test_a_malformed_offer_names_the_line(
    client: DreamwireClient, sdp: str, detail: str
) -> None:
    status, body = await client.request(
        "POST", "/api/v1/webrtc/offer", {"sdp": sdp, "type": "offer"}
    )
    assert (status, body) == (400, {"error": "invalid_sdp", "detail": detail})


async def test_deeply_nested_json_on_the_data_channel_is_an_error_reply(
    client: DreamwireClient,
) -> None:
    client._channel.send("[" * 100_000)
    assert (await client.wait_message("error"))["data"] == "message: nested too deeply"
    await client.send_parameters({"paused": False})
    await client.wait_frames(15)


async def test_a_message_over_the_advertised_size_is_refused_unread(
    client: DreamwireClient,
) -> None:
    assert client.pc is not None and client.pc.sctp is not None
    client.pc.sctp._remote_max_message_size = 0  # a peer that ignores the advertised limit
    client._channel.send(json.dumps({"prompts": [{"text": "x" * (4 << 20)}]}))
    error = await client.wait_message("error", timeout_s=30)
    assert error["data"].startswith("message: 4194") and "over the 262144 bytes" in error["data"]
    await client.send_parameters({"paused": False})
    await client.wait_frames(15)


async def test_session_slots_are_taken_atomically_and_freed_by_offers_that_never_connect(
    start_supervisor: Start,
) -> None:
    server = start_supervisor("max_sessions = 2\nconnect_timeout_s = 2.0\n" + CONFIG)
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as c:
        await c.load_pipeline("passthrough")
        # One real offer whose peer never answers back: its sessions can never connect.
        pc = RTCPeerConnection()
        pc.addTransceiver("video", direction="sendrecv")
        pc.createDataChannel("parameters")
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer"}
        answers = await asyncio.gather(
            *(c.request("POST", "/api/v1/webrtc/offer", body) for _ in range(40))
        )
        await pc.close()
        statuses = sorted(status for status, _ in answers)
        assert statuses.count(200) == 2 and statuses.count(429) == 38, statuses

        async def sessions() -> int:
            _, health = await c.request("GET", "/health")
            return int(health["detail"]["sessions"])

        assert await sessions() == 2
        for _ in range(150):  # freed by the connect timeout (2 s), not by us; 15 s at most
            if not await sessions():
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("unconnected sessions still hold their slots after 15 s")
        c.pattern = PatternTrack(256, 256, 30)
        await c.connect(c.pattern)
        await c.wait_frames(10, timeout_s=30)


async def test_a_frozen_media_stage_costs_little_video(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    for stage in ("decode", "encode"):
        pid = server.service(stage).pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            # The heartbeat limit of a media stage (1.5 s) restarts it; video flows again on the
            # same peer connection.
            await client.wait_frames(5, timeout_s=6)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        gap = time.monotonic() - stopped
        assert server.service(stage).pid != pid, f"{stage} was not restarted"
        print(f"{stage} frozen: video back after {gap:.2f} s")


async def test_signalling_killed_closes_its_sessions_and_frees_their_rings(
    server: SupervisorRun, client: DreamwireClient
) -> None:
    run_id = server.status().run_id
    assert len(segments_of_run(run_id)) > 1  # the session's rings and the run's lock
    pid = server.service("signalling").pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    def cleaned_up() -> bool:
        status = server.status()
        return not status.sessions and len(segments_of_run(run_id)) == 1

    await async_wait_until(cleaned_up, 15, "the dead owner's sessions closed, rings freed")
    assert [s.name for s in segments_of_run(run_id)] == [f"dreamwire.{run_id}.lock"]
    assert "closed: its owner signalling died" in server.log()
    # The restarted signalling serves a new session.
    await async_wait_until(lambda: server.service("signalling").state == "ready", 15, "restart")
    async with DreamwireClient(client.base_url, ice_servers=[]) as again:
        again.pattern = PatternTrack(256, 256, 30)
        await again.connect(again.pattern)
        await again.wait_frames(10, timeout_s=30)
