"""Frames, the frame cache and the playback queue (logic only: no I/O, time passed in).

Frames enter the playback queue as they arrive from the generator and leave it at a steady
target rate; a frame that leaves is *released*: it becomes the current frame, enters the cache
and goes to every viewer. The queue first fills to ``buffer_seconds`` worth of frames (or holds
its oldest frame that long), so a generator's jitter is absorbed instead of shown. While playing,
the release interval leans a little faster when the queue is over its target depth and a little
slower when under it, so a generator slightly off the target rate neither fills the queue nor
empties it. A queue past ``MAX_DEPTH_FACTOR`` × the
target depth drops its oldest frame (counted): queues never grow. A frame that arrives after
its slot has passed with the queue empty counts an underrun and the buffer refills.
"""

from __future__ import annotations

import base64
import collections
from dataclasses import dataclass, field

from dreams.wire import MsgType

__all__ = ["Frame", "FrameCache", "Playback", "RateMeter"]

MAX_DEPTH_FACTOR = 4
RATE_WINDOW_S = 10.0
#: How far the release interval leans off 1/target_fps to steer the queue depth: at most 25 %,
#: 25 % per target depth of error. A generator 10 % slow settles the queue at 60 % of its
#: target depth instead of running it dry (a dry queue costs a visible rebuffering pause).
MAX_STEER = 0.25
STEER_GAIN = 0.25


@dataclass(slots=True, eq=False)
class Frame:
    number: int
    keyframe: int
    #: Unix time the hub received it.
    timestamp: float
    generation_time_ms: float
    data: bytes
    width: int
    height: int
    _ws_message: bytes | None = field(default=None, repr=False)
    _base64: str | None = field(default=None, repr=False)

    @property
    def ws_message(self) -> bytes:
        """``0x01`` + WebP: the viewer WebSocket message, built once for every viewer."""
        if self._ws_message is None:
            self._ws_message = bytes((MsgType.FRAME,)) + self.data
        return self._ws_message

    @property
    def base64(self) -> str:
        if self._base64 is None:
            self._base64 = base64.b64encode(self.data).decode("ascii")
        return self._base64

    def metadata(self) -> dict[str, float | int]:
        return {
            "frame_number": self.number,
            "keyframe_number": self.keyframe,
            "timestamp": self.timestamp,
            "generation_time_ms": round(self.generation_time_ms),
            "size_bytes": len(self.data),
        }


class FrameCache:
    """The last ``size`` released frames, by number."""

    def __init__(self, size: int) -> None:
        self._frames: collections.deque[Frame] = collections.deque()
        self._by_number: dict[int, Frame] = {}
        self.size = size
        self.total_bytes = 0

    def add(self, frame: Frame) -> None:
        old = self._by_number.pop(frame.number, None)
        if old is not None:  # a number seen again (a worker that rewound): newest wins
            self._frames.remove(old)
            self.total_bytes -= len(old.data)
        self._frames.append(frame)
        self._by_number[frame.number] = frame
        self.total_bytes += len(frame.data)
        while len(self._frames) > self.size:
            gone = self._frames.popleft()
            del self._by_number[gone.number]
            self.total_bytes -= len(gone.data)

    def get(self, number: int) -> Frame | None:
        return self._by_number.get(number)

    def latest(self) -> Frame | None:
        return self._frames[-1] if self._frames else None

    def recent(self, count: int) -> list[Frame]:
        """The newest ``count`` frames, oldest first."""
        if count <= 0:
            return []
        return list(self._frames)[-count:]

    def __len__(self) -> int:
        return len(self._frames)


class RateMeter:
    """Events per second over the last ``window_s``."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def add(self, now: float) -> None:
        self._times.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], self._times[-1] - self._times[0])
        return (len(self._times) - 1) / span if span > 0 else 0.0

    def clear(self) -> None:
        self._times.clear()

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


class Playback:
    """The playback queue: ``push`` on arrival, ``pop_due`` when :meth:`wait_s` says so."""

    def __init__(self, target_fps: float, buffer_seconds: float) -> None:
        self._queue: collections.deque[tuple[float, Frame]] = collections.deque()
        self.buffer_seconds = buffer_seconds
        self.target_fps = target_fps
        self._buffering = True
        self._next_due = 0.0
        self.dropped = 0
        self.underruns = 0

    @property
    def target_depth(self) -> int:
        return max(1, round(self.buffer_seconds * self.target_fps))

    @property
    def max_depth(self) -> int:
        return MAX_DEPTH_FACTOR * self.target_depth + 1

    @property
    def depth(self) -> int:
        return len(self._queue)

    def set_target_fps(self, fps: float) -> None:
        self.target_fps = fps

    def push(self, frame: Frame, now: float) -> None:
        if not self._queue and not self._buffering and now > self._next_due:
            # The queue ran dry before this frame was due: refill the buffer first.
            self.underruns += 1
            self._buffering = True
        self._queue.append((now, frame))
        while len(self._queue) > self.max_depth:
            self._queue.popleft()
            self.dropped += 1

    def drain(self) -> list[Frame]:
        """Take every queued frame (oldest first) and start buffering afresh."""
        frames = [f for _, f in self._queue]
        self._queue.clear()
        self._buffering = True
        return frames

    def wait_s(self, now: float) -> float | None:
        """Seconds until a frame is due (0: now), or None while the queue is empty."""
        if not self._queue:
            return None
        if self._buffering:
            if len(self._queue) >= self.target_depth:
                return 0.0
            return max(0.0, self._queue[0][0] + self.buffer_seconds - now)
        return max(0.0, self._next_due - now)

    def pop_due(self, now: float) -> Frame | None:
        wait = self.wait_s(now)
        if wait is None or wait > 0:
            return None
        interval = 1.0 / self.target_fps
        if self._buffering:
            self._buffering = False
            self._next_due = now
        _, frame = self._queue.popleft()
        # Lean the interval towards keeping the queue at its target depth.
        error = (len(self._queue) - self.target_depth) / self.target_depth
        steer = max(-MAX_STEER, min(MAX_STEER, STEER_GAIN * error))
        self._next_due += interval * (1.0 - steer)
        if self._next_due < now - interval:  # far behind (the loop stalled): no burst
            self._next_due = now
        return frame
