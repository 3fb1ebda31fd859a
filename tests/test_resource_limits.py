"""The server's resources under pressure: a full ``/dev/shm`` and connections that hold sockets.
Each is refused or cut with a reason while a live stream keeps its frames."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable

import pytest
from client import ClientError, DreamwireClient, PatternTrack
from conftest import SupervisorRun

pytestmark = pytest.mark.timeout(120)

CONFIG = """
[api.ice]
stun_urls = []
"""
Start = Callable[..., SupervisorRun]


def private_shm(size_mb: int) -> list[str]:
    """A prefix running a command in a mount namespace of its own with a small /dev/shm."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.strip()}")
    mount = f"mount -t tmpfs -o size={size_mb}m tmpfs /dev/shm"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            f'{mount} && exec "$0" "$@"']  # fmt: skip


async def test_a_full_dev_shm_refuses_the_session_not_the_server(start_supervisor: Start) -> None:
    # 10 MB of shared memory: the start-up check (one 512×512 session) passes, a 512×512
    # passthrough session takes 6.0 MB (two rings of four slots), a second has no room.
    config = "max_frame_width = 512\nmax_frame_height = 512\n" + CONFIG
    server = start_supervisor(config, prefix=private_shm(10))
    base = f"http://127.0.0.1:{server.port}"
    async with DreamwireClient(base, ice_servers=[]) as first:
        await first.load_pipeline("passthrough")
        first.pattern = PatternTrack(512, 512, 30)
        await first.connect(first.pattern)
        await first.wait_frames(10, timeout_s=30)
        async with DreamwireClient(base, ice_servers=[]) as second:
            with pytest.raises(ClientError) as refused:
                await second.connect(PatternTrack(512, 512, 30))
        message = str(refused.value)
        assert message.startswith("offer refused (503)"), message
        assert "out_of_resources" in message
        assert "no room in /dev/shm for a 512×512 session: 6.0 MB needed" in message
        # The first stream goes on; the supervisor and every service are up.
        await first.wait_frames(30, timeout_s=10)
        assert server.proc is not None and server.proc.poll() is None
        assert {s.state for s in server.status().services} == {"ready"}


async def closed_within(reader: asyncio.StreamReader, timeout_s: float) -> float:
    """Seconds until the server closed the connection (EOF or reset)."""
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(4096), timeout_s):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return time.monotonic() - started


async def test_idle_and_slow_connections_are_closed_and_capped_while_a_stream_flows(
    start_supervisor: Start,
) -> None:
    config = "[api.connections]\nidle_timeout_s = 2.0\nmax_per_client = 40\n" + CONFIG
    server = start_supervisor(config)
    async with DreamwireClient(f"http://127.0.0.1:{server.port}", ice_servers=[]) as client:
        await client.load_pipeline("passthrough")
        client.pattern = PatternTrack(256, 256, 30)
        await client.connect(client.pattern)
        await client.wait_frames(10, timeout_s=30)

        async def silent() -> float:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                return await closed_within(reader, 15)
            finally:
                writer.close()

        async def trickling() -> float:
            """A request head sent a byte every 0.2 s, never finished."""
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200
            started = time.monotonic()
            try:
                for byte in head:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    if reader.at_eof():
                        break
                    with contextlib.suppress(TimeoutError):
                        if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                            break
                return time.monotonic() - started
            except (ConnectionResetError, BrokenPipeError):
                return time.monotonic() - started
            finally:
                writer.close()

        held = [asyncio.create_task(silent()) for _ in range(25)]
        held += [asyncio.create_task(trickling()) for _ in range(10)]
        await client.wait_frames(15, timeout_s=10)  # the stream goes on meanwhile
        # Over the per-client cap (40, the stream's own connection included): closed at once.
        extra = await asyncio.gather(*(silent() for _ in range(20)))
        assert sum(t < 1.0 for t in extra) >= 10, extra
        durations = await asyncio.gather(*held)
        # Every idle or trickling connection closed by the idle limit (2 s, swept each 0.5 s).
        assert max(durations) < 5.0, durations
        assert min(durations) > 1.5, durations
        await client.wait_frames(30, timeout_s=10)
        status, health = await client.request("GET", "/health")
        assert status == 200, health
        connections = health["detail"]["connections"]
        assert connections["refused"] >= 10 and connections["closed_idle"] >= 35, connections
        fds = health["detail"]["file_descriptors"]
        assert 0 < fds["open"] < fds["limit"], fds
    log = server.log()
    assert log.count("connections in the last") <= 3  # a summary, not a line per connection
    assert "Traceback" not in log
