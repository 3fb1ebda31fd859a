"""Per-client sliding-window rate limit (the Dreams API's 60 requests/minute per IP)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most ``limit`` hits per ``window_s`` for each key, over a sliding window."""

    def __init__(
        self, limit: int, window_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self._clock = clock
        self._hits: dict[Hashable, collections.deque[float]] = {}

    def allow(self, key: Hashable) -> bool:
        """Count a hit for ``key`` unless it is over the limit; False when it is."""
        now = self._clock()
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = collections.deque()
        while hits and now - hits[0] >= self.window_s:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True

    def retry_after_s(self, key: Hashable) -> float:
        hits = self._hits.get(key)
        if not hits:
            return 0.0
        return max(0.0, hits[0] + self.window_s - self._clock())

    def prune(self) -> None:
        """Forget keys with no hit inside the window (bounds memory to active clients)."""
        now = self._clock()
        stale = [k for k, hits in self._hits.items() if not hits or now - hits[-1] >= self.window_s]
        for key in stale:
            del self._hits[key]

    def __len__(self) -> int:
        return len(self._hits)
