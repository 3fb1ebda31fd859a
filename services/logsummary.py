"""Repeated log lines are counted, not written: a failure that recurs thousands of times a
second (accept() out of descriptors, say) must not fill the disk with identical tracebacks.

A line is "the same" when it comes from the same logger, at the same level, with the same
format string and exception type. The first ``BURST`` in a ``WINDOW_S`` window are written; the
next one says that further ones are being counted; the first after the window carries the count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_S = 10.0
BURST = 5

_Key = tuple[str, int, str, str]


@dataclass(slots=True)
class _Window:
    started: float
    count: int = 0
    unwritten: int = 0


class RepeatSummary(logging.Filter):
    """A handler filter; one instance may sit on several handlers (a record is judged once)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._windows: dict[_Key, _Window] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        verdict: bool | None = getattr(record, "repeat_verdict", None)
        if verdict is None:
            verdict = self._judge(record)
            record.repeat_verdict = verdict
        return verdict

    def _judge(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[0].__name__ if record.exc_info and record.exc_info[0] else ""
        key = (record.name, record.levelno, str(record.msg), exc)
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.started > WINDOW_S:
            if window is not None and window.unwritten:
                self._amend(
                    record,
                    f"(and {window.unwritten} more like it in the "
                    f"{now - window.started:.0f} s before, not written)",
                )
            if len(self._windows) > 4096:  # bounded: forget the windows that ended
                self._windows = {
                    k: w for k, w in self._windows.items() if now - w.started <= WINDOW_S
                }
            self._windows[key] = _Window(started=now, count=1)
            return True
        window.count += 1
        if window.count <= BURST:
            return True
        if window.count == BURST + 1:
            self._amend(
                record,
                f"(the same message {BURST} times in {now - window.started:.1f} s: further "
                "ones are counted, not written)",
            )
            return True
        window.unwritten += 1
        return False

    @staticmethod
    def _amend(record: logging.LogRecord, note: str) -> None:
        record.msg = f"{record.getMessage()} {note}"
        record.args = None


#: The one filter of a process's log handlers.
REPEATS = RepeatSummary()
