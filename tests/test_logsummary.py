"""Repeated log lines are counted, not written (``services.logsummary``)."""

from __future__ import annotations

import io
import logging

import pytest

from services.logsummary import BURST, WINDOW_S, RepeatSummary

pytestmark = pytest.mark.timeout(10)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def logger_with(filter_: RepeatSummary, *streams: io.StringIO) -> logging.Logger:
    log = logging.getLogger(f"repeat-test-{id(filter_)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    for stream in streams:
        handler = logging.StreamHandler(stream)
        handler.addFilter(filter_)
        log.addHandler(handler)
    return log


def test_a_flood_is_written_a_few_times_then_counted() -> None:
    clock = Clock()
    out, also = io.StringIO(), io.StringIO()
    log = logger_with(RepeatSummary(clock), out, also)
    for i in range(1000):
        clock.now = i / 1000
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            log.exception("accept failed on fd %d", i)
        if i % 100 == 0:
            log.warning("something else %d", i)
    lines = out.getvalue().splitlines()
    failed = [line for line in lines if line.startswith("accept failed")]
    assert len(failed) == BURST + 1  # a few, then the note that the rest are counted
    assert "further ones are counted, not written" in failed[-1]
    assert sum(line.startswith("OSError") for line in lines) == BURST + 1  # their tracebacks
    assert sum(line.startswith("something else") for line in lines) == BURST + 1
    clock.now = 1.0 + WINDOW_S
    try:
        raise OSError(24, "Too many open files")
    except OSError:
        log.exception("accept failed on fd %d", 5000)
    last = next(line for line in out.getvalue().splitlines()[::-1] if "fd 5000" in line)
    assert last.startswith("accept failed on fd 5000 (and 994 more like it in the 11 s before")
    assert also.getvalue() == out.getvalue()  # judged once, written alike by every handler
