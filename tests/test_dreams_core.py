"""The Dreams hub's parts in one process: frames, cache, playback, rate limit, worker state."""

from __future__ import annotations

import itertools
from pathlib import Path

import msgspec
import pytest
from dreams_helpers import HEIGHT, WIDTH, decode_number, numbered_webp

from dreams.generators import TestcardGenerator, WorkerOptions
from dreams.wire import DreamState, webp_size
from dreams.worker import WorkerCore
from signalling.dreams.frames import Frame, FrameCache, Playback
from signalling.dreams.ratelimit import RateLimiter
from signalling.dreams.snapshot import load_snapshot, write_snapshot

pytestmark = pytest.mark.timeout(30)


def frame(number: int, size: int = 10) -> Frame:
    return Frame(number, number // 5, 0.0, 1.0, b"x" * size, WIDTH, HEIGHT)


def test_webp_size_reads_the_header_and_rejects_the_rest() -> None:
    assert webp_size(numbered_webp(3)) == (WIDTH, HEIGHT)
    for bad in (b"", b"RIFF" + b"\0" * 40, numbered_webp(3)[:-1], b"\x89PNG" + b"\0" * 40):
        with pytest.raises(ValueError):
            webp_size(bad)


def test_cache_keeps_the_last_frames_by_number() -> None:
    cache = FrameCache(3)
    for n in range(1, 6):
        cache.add(frame(n))
    assert cache.get(2) is None and cache.get(3) is not None
    assert [f.number for f in cache.recent(5)] == [3, 4, 5]
    assert [f.number for f in cache.recent(2)] == [4, 5]
    assert cache.total_bytes == 30 and len(cache) == 3


def test_playback_buffers_then_releases_at_a_steady_rate_despite_jitter() -> None:
    fps = 5.0
    playback = Playback(fps, buffer_seconds=1.0)
    # Seconds off the generator's schedule; a late frame holds back the ones behind it
    # (one connection keeps its order), so frames come in bursts and gaps.
    jitter = [0.0, 0.3, -0.1, 0.05, -0.15, 0.1, 0.25, 0.0]
    arrivals: list[tuple[float, int]] = []
    for n in range(60):
        t = n / fps + jitter[n % len(jitter)]
        arrivals.append((max(t, arrivals[-1][0]) if arrivals else t, n))
    released: list[tuple[float, int]] = []
    t, i, step = 0.0, 0, 0.005
    while t < 14.0:
        while i < len(arrivals) and arrivals[i][0] <= t:
            playback.push(frame(arrivals[i][1]), t)
            i += 1
        if (f := playback.pop_due(t)) is not None:
            released.append((t, f.number))
        t += step
    numbers = [n for _, n in released]
    assert numbers == sorted(numbers) and len(numbers) == 60
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(released[:-5])]
    assert all(0.15 <= g <= 0.26 for g in gaps), gaps  # steady, though arrivals were not
    assert playback.underruns == 0 and playback.dropped == 0


def test_playback_never_grows_past_its_bound() -> None:
    playback = Playback(5.0, buffer_seconds=1.0)
    for n in range(100):
        playback.push(frame(n), 0.0)
    assert playback.depth == playback.max_depth
    assert playback.dropped == 100 - playback.max_depth


def test_rate_limiter_slides() -> None:
    now = [0.0]
    limiter = RateLimiter(3, 10.0, clock=lambda: now[0])
    assert [limiter.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b")
    now[0] = 10.0
    assert limiter.allow("a")
    now[0] = 30.0
    limiter.prune()
    assert len(limiter) == 0


def test_worker_state_round_trips_and_drives_the_frames() -> None:
    options = WorkerOptions(connect="ws://unused", width=WIDTH, height=HEIGHT, keyframe_interval=4)
    core = WorkerCore(options, TestcardGenerator(WIDTH, HEIGHT, 4))
    webp, number, keyframe, _, _ = core.next_frame()
    assert (number, keyframe) == (1, 0) and decode_number(webp) == 1
    for _ in range(5):
        core.next_frame()
    saved = core.snapshot()
    other = WorkerCore(options, TestcardGenerator(WIDTH, HEIGHT, 4))
    other.load(saved)
    assert msgspec.msgpack.decode(saved, type=DreamState) == other.state
    webp, number, keyframe, _, new_keyframe = other.next_frame()
    assert not new_keyframe  # keyframe 1 began at frame 5
    assert (number, keyframe) == (7, 1) and decode_number(webp) == 7
    assert other.state.seed == core.state.seed


def test_snapshot_file_round_trips_and_ignores_garbage(tmp_path: Path) -> None:
    path = str(tmp_path / "dreams.state")
    assert load_snapshot(path) is None
    data = msgspec.msgpack.encode({"prompt": "p", "frame_number": 9})
    write_snapshot(path, data)
    assert load_snapshot(path) == data
    Path(path).write_bytes(b"\xc1")
    assert load_snapshot(path) is None
