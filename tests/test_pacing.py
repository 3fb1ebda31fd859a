"""The pacer of block models (``services.inference.pacing``), on a fake clock: a block's frames
leave evenly at the production rate, with less than a block of added latency, and the rate
follows production when it changes."""

from __future__ import annotations

import itertools
import statistics

import pytest

from services.inference.pacing import Pacer

pytestmark = pytest.mark.timeout(10)

STEP_S = 0.001  # the simulation's clock resolution (a service loop polls its timers)


def simulate(
    block_times: list[float], block: int = 12, max_fps: float = 30.0
) -> tuple[list[float], list[float]]:
    """Blocks of ``block`` frames made back to back, the i-th taking ``block_times[i]``;
    returns when each frame left and how long it waited."""
    pacer: Pacer[int] = Pacer(max_fps=max_fps, started=0.0)
    arrivals, t = [], 0.0
    for duration in block_times:
        t += duration
        arrivals.append(t)
    left: list[float] = []
    waited: list[float] = []
    now, i, n = 0.0, 0, 0
    end = arrivals[-1] + 5.0
    while now < end:
        while i < len(arrivals) and arrivals[i] <= now:
            for _ in range(block):
                pacer.push(n, now)
                n += 1
            i += 1
        while (due := pacer.pop_due(now)) is not None:
            left.append(now)
            waited.append(now - due[1])
        now += STEP_S
    return left, waited


def test_a_steady_model_comes_out_evenly_at_its_rate_with_under_a_block_of_delay() -> None:
    block_s = 1.1  # 12 frames in 1.1 s: 10.9 fps, slower than the 30 fps the service allows
    left, waited = simulate([block_s] * 40)
    steady = [b - a for a, b in itertools.pairwise(left[120:])][:300]
    median = statistics.median(steady)
    assert median == pytest.approx(block_s / 12, rel=0.1)
    assert max(steady) <= 1.5 * median  # no burst-then-freeze
    # What the model made left at its rate: nothing piles up.
    assert len(left) >= 40 * 12 - 12
    assert statistics.mean(waited[120:]) < block_s  # under one block of added latency


def test_the_rate_follows_a_slower_model_within_a_few_blocks() -> None:
    left, _ = simulate([0.8] * 20 + [1.6] * 20)
    late = [b - a for a, b in itertools.pairwise(left[-150:])][:-30]
    assert statistics.median(late) == pytest.approx(1.6 / 12, rel=0.12)
    assert max(late) <= 1.5 * statistics.median(late)


def test_a_model_faster_than_allowed_is_capped() -> None:
    left, _ = simulate([0.2] * 30, max_fps=30.0)  # 60 fps made, 30 allowed
    steady = [b - a for a, b in itertools.pairwise(left[60:])][:200]
    assert statistics.median(steady) == pytest.approx(1 / 30, rel=0.05)


def test_nothing_leaves_before_its_time_and_clear_drops_the_queue() -> None:
    pacer: Pacer[int] = Pacer(max_fps=30.0, started=0.0)
    for n in range(12):
        pacer.push(n, 1.0)
    assert pacer.pop_due(1.0) == (0, 1.0)
    assert pacer.pop_due(1.0) is None  # the next one is due later
    at = pacer.next_at()
    assert at is not None and at > 1.0
    assert pacer.pop_due(at) == (1, 1.0)
    pacer.clear()
    assert pacer.next_at() is None and pacer.pop_due(10.0) is None
