"""How long a model process's calls take, and a hook around each (``ServiceProc`` answers
heartbeats from another thread while one runs).

A model call holds a service's loop for as long as it takes: a block of a causal video model on
a small GPU, a first call that compiles. Liveness (does the process answer?) must not wait for
it, and progress (is the call getting anywhere?) is judged against what calls usually take, so
the loop reports both: the running call's age and the longest of its recent calls.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

#: How long a call (or a piece of work off the loop) counts as recent. A span of time, not a
#: number of calls: a text session's loop makes a hundred 1 ms calls a second, which must not
#: push a 15 s block out of the record.
RECENT_S = 300.0


class Call:
    """The call in progress; ``record`` may be withdrawn before it ends (a call that did no
    model work is no measure of what model work takes)."""

    def __init__(self, record: bool) -> None:
        self.record = record


class CallClock:
    """The model call in progress (if any) and the durations of the recent ones."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None
        #: (when, duration) of the recent calls and work, longest first: a sliding-window
        #: maximum, so a long block stays the longest for ``RECENT_S`` however many short
        #: calls follow it.
        self._longest: deque[tuple[float, float]] = deque()
        #: Model calls and pieces of work off the loop finished: none yet means no history
        #: to judge a running call by (the supervisor then allows a first call's time).
        self.done = 0
        #: Set by the process around each call (the liveness thread takes over the control
        #: socket during it); no-ops for a core run without one (tests).
        self.before_call: Callable[[], None] = lambda: None
        self.after_call: Callable[[], None] = lambda: None
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def running(self, *, record: bool = True) -> Iterator[Call]:
        """Around a model call (``record``: its duration joins the recent calls' and it counts
        as done); without ``record``, a wait for model work counted elsewhere (a block made
        ahead)."""
        started = self.clock()
        call = Call(record)
        with self.changed:
            self.started = started
            self.changed.notify_all()
        self.before_call()
        try:
            yield call
        finally:
            with self.changed:
                self.started = None
                if call.record:
                    self._remember(self.clock() - started)
                    self.done += 1
                self.changed.notify_all()
            self.after_call()

    def record(self, duration_s: float) -> None:
        """Model work done off the loop (a block made ahead on a worker thread): it counts
        among the recent calls' durations, so waiting for it is not taken for stuck."""
        with self.changed:
            self._remember(duration_s)
            self.done += 1

    def _remember(self, duration_s: float) -> None:
        now = self.clock()
        while self._longest and self._longest[-1][1] <= duration_s:
            self._longest.pop()  # never the longest again while this one is recent
        self._longest.append((now, duration_s))

    def wait_for_call(self, timeout_s: float) -> float | None:
        """The start of the call running now, waiting up to ``timeout_s`` for one."""
        with self.changed:
            self.changed.wait_for(lambda: self.started is not None, timeout_s)
            return self.started

    def wait_for_end(self, started: float, timeout_s: float) -> bool:
        """Whether the call that began at ``started`` ended within ``timeout_s``."""
        with self.changed:
            return self.changed.wait_for(lambda: self.started != started, timeout_s)

    def running_s(self) -> float:
        started = self.started
        return 0.0 if started is None else max(0.0, self.clock() - started)

    def longest_s(self) -> float:
        """The longest call, or piece of work off the loop, of the last ``RECENT_S``."""
        with self.changed:
            while self._longest and self._longest[0][0] < self.clock() - RECENT_S:
                self._longest.popleft()
            return self._longest[0][1] if self._longest else 0.0
