"""Even output from block models: frames leave at the rate they are made, not in bursts.

A causal video model makes a block of frames at once (4 or 12) every block time. Sent as they
come, a viewer sees a block's frames in a fraction of a second and then a still picture until the
next block. The :class:`Pacer` holds a session's produced frames and lets one go every
``1 / rate``, where the rate follows production:

* **production rate**: frames over the time between the first and the last of the recent bursts
  (a burst: frames arriving within ``BURST_GAP_S``), from the last ``WINDOW_BURSTS`` bursts; before
  the second burst, the first block's frames over the time it took to make it;
* **the smallest buffer that keeps intervals even**: right before each burst the queue should
  hold a margin (40 % of a block and half a frame, at least one frame). The output rate is the
  production rate corrected by how far the queue, just before the last bursts, was from that
  margin: fuller means the output lags (go a little faster), empty means it ran dry (a little
  slower). So the added latency settles near half a block plus the margin: one block at most.

A prompt switch, a recache or another session sharing the model changes the production rate; the
estimate follows within a few blocks. Pure logic: the caller passes the time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

#: Frames arriving closer together than this belong to one burst (one block).
BURST_GAP_S = 0.02
#: Bursts the production rate is measured over.
WINDOW_BURSTS = 6
#: How strongly the queue level before a burst corrects the output rate (per block of error).
GAIN = 0.5
#: The output rate stays within this factor of the production rate.
MAX_CORRECTION = 0.25
#: The queue level (just before a block arrives) aimed at, as a share of a block.
MARGIN_SHARE = 0.4


@dataclass(slots=True)
class _Burst:
    started: float
    frames: int
    queued_before: int


@dataclass
class Pacer(Generic[T]):
    """One session's produced frames and when each may leave."""

    #: The most frames a second it sends (the service's ``text_fps``).
    max_fps: float
    #: When the session started (the first block's production time counts from here).
    started: float
    queue: deque[tuple[T, float]] = field(default_factory=deque)
    bursts: deque[_Burst] = field(default_factory=lambda: deque(maxlen=WINDOW_BURSTS))
    next_due: float = 0.0
    sent: int = 0

    # ------------------------------------------------------------ in

    def push(self, item: T, now: float) -> None:
        """A frame was produced."""
        last = self.bursts[-1] if self.bursts else None
        if last is not None and now - last.started <= BURST_GAP_S + last.frames * 1e-3:
            last.frames += 1
        else:
            if not self.queue:  # ran dry: the next frame may go at once
                self.next_due = min(self.next_due, now) if self.sent else now
            self.bursts.append(_Burst(now, 1, len(self.queue)))
        self.queue.append((item, now))

    # ------------------------------------------------------------ rates

    def production_fps(self) -> float | None:
        """Frames made per second over the recent bursts (None: nothing made yet)."""
        if not self.bursts:
            return None
        first, last = self.bursts[0], self.bursts[-1]
        if len(self.bursts) == 1:
            span = first.started - self.started
            return first.frames / span if span > 0 else None
        # The frames of every burst but the first were made in the span between them.
        frames = sum(b.frames for b in list(self.bursts)[1:])
        span = last.started - first.started
        return frames / span if span > 0 else None

    def block_frames(self) -> float:
        return sum(b.frames for b in self.bursts) / len(self.bursts) if self.bursts else 1.0

    def margin(self, block: float) -> float:
        """Frames to have left when a block arrives: 40 % of a block and half a frame (small
        blocks come at shorter, relatively less regular intervals)."""
        return max(1.0, MARGIN_SHARE * block + 0.5)

    def output_fps(self) -> float:
        made = self.production_fps()
        if made is None:
            return self.max_fps
        block = self.block_frames()
        margin = self.margin(block)
        recent = list(self.bursts)[1:] or list(self.bursts)
        before = sum(b.queued_before for b in recent) / len(recent)
        correction = 1.0 + GAIN * (before - margin) / max(block, 1.0)
        correction = min(1.0 + MAX_CORRECTION, max(1.0 - MAX_CORRECTION, correction))
        return max(1.0, min(self.max_fps, made * correction))

    # ------------------------------------------------------------ out

    def next_at(self) -> float | None:
        """When the next frame may leave (None: nothing queued)."""
        return self.next_due if self.queue else None

    def pop_due(self, now: float) -> tuple[T, float] | None:
        """The next frame and when it was produced, if its time has come."""
        if not self.queue or now < self.next_due:
            return None
        item = self.queue.popleft()
        self.sent += 1
        # From the due time, not from now: a late tick does not shift the cadence.
        self.next_due = max(self.next_due + 1.0 / self.output_fps(), now - 0.5 / self.max_fps)
        return item

    def clear(self) -> None:
        """A hard cut or a paused session: what was made is dropped, the estimate kept."""
        self.queue.clear()
