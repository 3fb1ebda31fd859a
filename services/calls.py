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

#: Recent call durations remembered (their maximum is "the longest recent call").
RECENT_CALLS = 32


class CallClock:
    """The model call in progress (if any) and the durations of the recent ones."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started: float | None = None
        self.durations: deque[float] = deque(maxlen=RECENT_CALLS)
        #: Model work done off the loop (blocks made ahead), kept apart: the loop's own calls
        #: may be many and short (a text session asks every 10 ms) and would push it out.
        self.work: deque[float] = deque(maxlen=RECENT_CALLS)
        self.done = 0
        #: Set by the process around each call (the liveness thread takes over the control
        #: socket during it); no-ops for a core run without one (tests).
        self.before_call: Callable[[], None] = lambda: None
        self.after_call: Callable[[], None] = lambda: None
        self.changed = threading.Condition()

    @contextlib.contextmanager
    def running(self, *, record: bool = True) -> Iterator[None]:
        """Around a model call (``record``: its duration joins the recent calls'); without
        ``record``, a wait for model work already counted (a block made ahead)."""
        started = self.clock()
        with self.changed:
            self.started = started
            self.changed.notify_all()
        self.before_call()
        try:
            yield
        finally:
            with self.changed:
                self.started = None
                if record:
                    self.durations.append(self.clock() - started)
                    self.done += 1
                self.changed.notify_all()
            self.after_call()

    def record(self, duration_s: float) -> None:
        """Model work done off the loop (a block made ahead on a worker thread): it counts
        among the recent calls' durations, so waiting for it is not taken for stuck."""
        with self.changed:
            self.work.append(duration_s)

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
        """The longest recent call, or recent piece of work off the loop."""
        return max(max(self.durations, default=0.0), max(self.work, default=0.0))
