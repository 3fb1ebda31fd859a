"""Recording a real WebRTC session through ``supervisor start``, in Scope's API shapes: the
file that downloads is decoded with PyAV and its frames counted against what the client got.

testcard (text to video, 128×96 at 30 fps): each frame carries its number, so the frames in a
file are known exactly."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Callable

import av
import pytest
from client import DreamwireClient
from conftest import SupervisorRun

pytestmark = pytest.mark.timeout(120)

ICE = "\n[api.ice]\nstun_urls = []\n"


@pytest.fixture
async def client(start_supervisor: Callable[..., SupervisorRun]) -> AsyncIterator[DreamwireClient]:
    server = start_supervisor(ICE)
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as client:
        await client.load_pipeline("testcard")
        yield client


async def download(client: DreamwireClient, session_id: str) -> tuple[int, dict[str, str], bytes]:
    assert client.http is not None
    async with client.http.get(f"{client.base_url}/api/v1/recordings/{session_id}") as resp:
        return resp.status, dict(resp.headers), await resp.read()


def decoded(data: bytes) -> tuple[str, int, float, tuple[int, int]]:
    """(container, frames decoded, duration in s, size) of a recording."""
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.video[0]
        frames = len(list(container.decode(stream)))
        duration = (container.duration or 0) / 1e6
        return container.format.name, frames, duration, (stream.width, stream.height)


@pytest.mark.parametrize(
    ("codec", "suffix", "fmt"), [("H264", ".mp4", "mp4"), ("VP8", ".webm", "webm")]
)
async def test_a_session_recorded_from_its_start_downloads_as_a_playable_file(
    client: DreamwireClient, codec: str, suffix: str, fmt: str
) -> None:
    session_id = await client.connect(None, initial_parameters={"recording": True}, codec=codec)
    await client.wait_frames(45, timeout_s=30)
    received = client.received.frames
    status, headers, data = await download(client, session_id)  # recording goes on after
    assert status == 200, data[:200]
    assert headers["Content-Disposition"].startswith('attachment; filename="recording-')
    assert headers["Content-Disposition"].endswith(f'{suffix}"')
    name, frames, duration, size = decoded(data)
    assert fmt in name and size == (128, 96)
    # Every frame from the first up to the download: what the client received, give or take
    # the frames in flight on either side.
    assert received - 5 <= frames <= received + 15, (frames, received)
    assert abs(duration - frames / 30) < 0.25, (duration, frames)

    # The recording went on in the next file; the client leaves; the file stays.
    await client.wait_frames(30, timeout_s=30)
    await client.disconnect()
    status, _, rest = await download(client, session_id)
    assert status == 200
    _, more, _, _ = decoded(rest)
    assert more >= 25, more


async def test_start_and_stop_in_scope_shapes(client: DreamwireClient) -> None:
    session_id = await client.connect(None)
    base = f"/api/v1/recordings/{session_id}"
    assert await client.request("POST", f"{base}/stop") == (200, {"status": "not_recording"})
    code, _, _ = await download(client, session_id)
    assert code == 404
    code, body = await client.request("POST", f"{base}/start?node_id=record")
    assert code == 400 and "no graph record nodes; omit node_id" in body["detail"], body
    assert await client.request("POST", f"{base}/start") == (200, {"status": "started"})
    assert await client.request("POST", f"{base}/start") == (200, {"status": "already_recording"})
    await client.wait_frames(40, timeout_s=30)
    assert await client.request("POST", f"{base}/stop") == (200, {"status": "stopped"})
    code, _, data = await download(client, session_id)
    assert code == 200
    _, frames, _, _ = decoded(data)
    assert 30 <= frames <= client.received.frames + 5, (frames, client.received.frames)
    # Frames after the stop are not in it: a second download is the same file.
    await client.wait_frames(10, timeout_s=30)
    assert (await download(client, session_id))[2] == data
    code, body = await client.request("POST", "/api/v1/recordings/nope/start")
    assert code == 404 and body["error"] == "unknown_session", body


async def test_a_recording_that_is_never_stopped_ends_at_its_limit(
    start_supervisor: Callable[..., SupervisorRun],
) -> None:
    server = start_supervisor("[recording]\nmax_seconds = 1.0\n" + ICE)
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as client:
        await client.load_pipeline("testcard")
        session_id = await client.connect(None, initial_parameters={"recording": True})
        warning = await client.wait_message("warning", timeout_s=30)
        assert "recording stopped" in warning["data"] and "time limit (1 s)" in warning["data"]
        await client.wait_frames(20, timeout_s=30)  # the stream goes on
        code, _, data = await download(client, session_id)
        assert code == 200
        _, frames, duration, _ = decoded(data)
        assert 25 <= frames <= 32 and duration <= 1.1, (frames, duration)


#: Scope 0.2's workflow with a record node on the output (what its Record node sends).
RECORD_GRAPH = {
    "nodes": [
        {"id": "testcard", "type": "pipeline", "pipeline_id": "testcard"},
        {"id": "output", "type": "sink"},
        {"id": "record", "type": "record"},
    ],
    "edges": [
        {"from": "testcard", "from_port": "video", "to_node": "output", "kind": "stream"},
        {"from": "output", "from_port": "video", "to_node": "record", "kind": "stream"},
    ],
}


async def test_a_record_node_records_its_own_span(client: DreamwireClient) -> None:
    """Scope 0.2's Record node: the session-level ``recording`` (its Perform toggle, left on)
    is not the node's; Start gives a fresh recording, Stop downloads it, then stops it."""
    params = {"recording": True, "graph": RECORD_GRAPH}
    session_id = await client.connect(None, initial_parameters=params)
    base = f"/api/v1/recordings/{session_id}"
    await client.wait_frames(45, timeout_s=30)  # frames before Start are not the node's
    code, body = await client.request("POST", f"{base}/start?node_id=nope")
    assert code == 400 and "not a record node" in body["detail"], body
    assert await client.request("POST", f"{base}/start?node_id=record") == (
        200,
        {"status": "started"},
    )
    await client.wait_frames(30, timeout_s=30)
    code, _, data = await download(client, session_id)
    assert await client.request("POST", f"{base}/stop?node_id=record") == (
        200,
        {"status": "stopped"},
    )
    _, frames, _, _ = decoded(data)
    assert 25 <= frames <= 40, frames
