"""The server's resources under pressure: a full ``/dev/shm`` and connections that hold sockets.
Each is refused or cut with a reason while a live stream keeps its frames."""

from __future__ import annotations

import shutil
import subprocess
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
