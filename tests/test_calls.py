"""A model process's call clock: what its heartbeats say of the calls it runs."""

from __future__ import annotations

import pytest

from services.calls import RECENT_S, CallClock

#: More short calls than any count-based history would keep.
MANY = 320

pytestmark = pytest.mark.timeout(10)


def test_blocks_made_off_the_loop_stay_the_longest_work_among_many_short_calls() -> None:
    now = [0.0]
    clock = CallClock(clock=lambda: now[0])
    clock.record(12.0)  # a block made ahead on the worker thread
    for _ in range(MANY):  # a text session's loop asks every 10 ms
        with clock.running():
            now[0] += 0.001
    assert clock.longest_s() == 12.0 and clock.done == MANY + 1  # the block is work done
    # A wait for that block (a parameter change) is covered but not counted as a call.
    with clock.running(record=False):
        now[0] += 11.0
        assert clock.running_s() == pytest.approx(11.0)
    assert clock.done == MANY + 1 and clock.running_s() == 0.0


def test_a_call_withdrawn_from_the_record_is_neither_measured_nor_done() -> None:
    now = [0.0]
    clock = CallClock(clock=lambda: now[0])
    with clock.running() as call:
        now[0] += 0.001
        call.record = False  # it only gathered input
    assert clock.done == 0 and clock.longest_s() == 0.0


def test_a_block_made_on_the_loop_stays_the_longest_call_for_a_while() -> None:
    """A text session's first block is made in a call; its loop then asks every 10 ms."""
    now = [0.0]
    clock = CallClock(clock=lambda: now[0])
    with clock.running():
        now[0] += 15.0
    for _ in range(2000):
        with clock.running():
            now[0] += 0.001
    assert clock.longest_s() == 15.0
    now[0] += RECENT_S
    assert clock.longest_s() < 15.0  # no longer recent
