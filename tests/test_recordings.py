"""Recordings, in parts: the encode process's :class:`Recorder` on real encoder packets (the
files decoded with PyAV), and signalling's :class:`Recordings` (what is kept, for how long,
what a start, stop or download sends), with a fake encode process and a fake clock."""

from __future__ import annotations

import asyncio
from pathlib import Path

import av
import numpy as np
import pytest

from services import protocol as p
from services.encode.encoder import EncodedPacket, Encoder
from services.encode.recorder import Limits, Recorder
from services.options import RecordingOptions
from signalling.recordings import RecordingRefused, Recordings, download_name

pytestmark = pytest.mark.timeout(60)

W, H, FPS = 128, 96, 30
TICKS = 90_000 // FPS
ROOMY = Limits(max_bytes=2**30, max_seconds=3600, min_free_bytes=0)


def packets(codec: str, count: int, keyframe_at: int = 0) -> list[EncodedPacket]:
    """``count`` frames of a grey ramp (frame i at level 2·i), a keyframe at ``keyframe_at``."""
    encoder = Encoder(codec, W, H)
    out = []
    for i in range(count):
        rgb = np.full((H, W, 3), 20 + 2 * i, np.uint8)
        out += encoder.encode(rgb, 1000 + i * TICKS, force_keyframe=i == keyframe_at)
    return out


def decode(path: Path) -> tuple[list[float], float]:
    """The mean level of each frame in the file, and its duration in seconds."""
    with av.open(str(path), "r") as container:
        levels = [float(f.to_ndarray(format="gray").mean()) for f in container.decode(video=0)]
        return levels, (container.duration or 0) / 1e6


@pytest.mark.parametrize(("codec", "suffix"), [("H264", ".mp4"), ("VP8", ".webm")])
def test_a_file_starts_at_a_keyframe_and_holds_every_frame_after(
    tmp_path: Path, codec: str, suffix: str
) -> None:
    stream = packets(codec, 40, keyframe_at=10)[5:]  # joined late: deltas first
    assert not stream[0].keyframe and stream[5].keyframe
    recorder = Recorder(tmp_path / f"a{suffix}", codec, W, H, ROOMY)  # type: ignore[arg-type]
    for packet in stream:
        assert recorder.write(packet) is None
    done = recorder.finish()
    assert (done.frames, done.duration_s) == (30, 1.0)
    assert done.size_bytes == done.path.stat().st_size > 0
    levels, duration = decode(done.path)
    assert len(levels) == 30 and abs(duration - 1.0) < 0.05, duration
    # The first frame is frame 10 (the keyframe), the last frame 39: the ramp's levels.
    assert abs(levels[0] - (20 + 2 * 10)) < 3 and abs(levels[-1] - (20 + 2 * 39)) < 3, levels


@pytest.mark.parametrize(
    ("limits", "reason", "most"),
    [
        (Limits(1500, 3600, 0), "size limit", 40),
        (Limits(2**30, 0.5, 0), "time limit (0.5 s)", 16),
        (Limits(2**30, 3600, 2**62), "the disk is nearly full", 31),
    ],
    ids=["size", "time", "free-space"],
)
def test_a_limit_ends_the_file_which_still_plays(
    tmp_path: Path, limits: Limits, reason: str, most: int
) -> None:
    recorder = Recorder(tmp_path / "a.webm", "VP8", W, H, limits)
    ended = None
    for packet in packets("VP8", 60):
        if (ended := recorder.write(packet)) is not None:
            break
    assert ended is not None and reason in ended, ended
    done = recorder.finish()
    assert 1 <= done.frames <= most, done
    assert done.size_bytes <= limits.max_bytes + 1000  # the container's own bytes
    levels, _ = decode(done.path)
    assert len(levels) == done.frames


def test_a_file_that_cannot_be_written_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recorder = Recorder(blocker / "a.mp4", "H264", W, H, ROOMY)
    reason = recorder.write(packets("H264", 1)[0])
    assert reason is not None and "cannot write a.mp4" in reason
    assert recorder.finish().frames == 0


# ---------------------------------------------------------------- signalling's side


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sent() -> list[p.RecordCommand]:
    return []


def store(tmp_path: Path, sent: list[p.RecordCommand], **options: object) -> Recordings:
    opts = RecordingOptions(min_free_bytes=0, **options)  # type: ignore[arg-type]
    return Recordings(opts, tmp_path, lambda _sid, cmd: sent.append(cmd), Clock())


def finish(recordings: Recordings, cmd: p.RecordCommand, size: int, reason: str) -> Path:
    """What the encode process does: the file, then its message."""
    path = Path(cmd.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    recordings.finished(p.RecordingFinished("s1", str(path), 10, size, 0.33, reason))
    return path


async def test_start_stop_and_download_send_what_scope_expects(
    tmp_path: Path, sent: list[p.RecordCommand]
) -> None:
    recordings = store(tmp_path, sent)
    assert recordings.start("s1", "H264") is True
    assert recordings.start("s1", "H264") is False  # already recording
    assert [(c.action, Path(c.path).name) for c in sent] == [("start", "001.mp4")]
    # A download while live: the file so far (the encoder starts the next at a cut).
    download = asyncio.create_task(recordings.download("s1", live=True))
    await asyncio.sleep(0)  # the command is sent before it waits
    assert [(c.action, Path(c.path).name) for c in sent[1:]] == [("cut", "002.mp4")]
    first = finish(recordings, sent[0], 100, "cut")
    got = await download
    assert got is not None and got.path == first and recordings.recording("s1")
    assert download_name(got).startswith("recording-") and download_name(got).endswith(".mp4")
    stop = asyncio.create_task(recordings.stop("s1"))
    await asyncio.sleep(0)
    assert sent[-1].action == "stop"
    second = finish(recordings, sent[1], 50, "stopped")
    assert await stop is True and not recordings.recording("s1")
    assert await recordings.stop("s1") is False
    # Stopped, then the client left: the newest file is what downloads.
    newest = await recordings.download("s1", live=False)
    assert newest is not None and newest.path == second


async def test_files_are_kept_for_their_time_and_within_the_budget(
    tmp_path: Path, sent: list[p.RecordCommand]
) -> None:
    recordings = store(tmp_path, sent, keep_s=60.0, max_total_bytes=1000, max_bytes=800)
    clock = recordings.clock
    assert isinstance(clock, Clock)
    recordings.start("s1", "VP8")
    assert sent[0].max_bytes == 800  # one file's limit
    old = finish(recordings, sent[0], 700, "session ended")
    clock.now += 30
    recordings.start("s1", "VP8")
    assert sent[1].max_bytes == 300  # what the budget has left
    newer = finish(recordings, sent[1], 300, "stopped")
    with pytest.raises(RecordingRefused, match="use the whole budget"):
        recordings.start("s1", "VP8")
    clock.now += 31  # the first is past its time, the second not
    assert recordings.sweep() == [old] and not old.exists() and newer.exists()
    recordings.start("s1", "VP8")  # room again
    assert sent[-1].max_bytes == 700


async def test_a_limit_is_told_to_the_client_and_a_full_disk_refuses(
    tmp_path: Path, sent: list[p.RecordCommand]
) -> None:
    recordings = store(tmp_path, sent)
    recordings.start("s1", "VP8")
    notice = recordings.finished(
        p.RecordingFinished("s1", sent[0].path, 5, 10, 0.2, "the recording reached its size limit")
    )
    assert notice == "recording stopped: the recording reached its size limit"
    assert not recordings.recording("s1")
    full = Recordings(RecordingOptions(min_free_bytes=2**62), tmp_path, lambda *_: None)
    with pytest.raises(RecordingRefused, match="MB free, under the"):
        full.start("s2", "VP8")


async def test_an_encode_process_that_dies_fails_the_wait_at_once(
    tmp_path: Path, sent: list[p.RecordCommand]
) -> None:
    recordings = store(tmp_path, sent)
    recordings.start("s1", "H264")
    stop = asyncio.create_task(recordings.stop("s1"))
    await asyncio.sleep(0)
    recordings.encode_lost("s1")
    with pytest.raises(RecordingRefused, match="encode process of session s1 stopped"):
        await stop
