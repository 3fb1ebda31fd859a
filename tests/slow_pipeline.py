"""Test pipeline plugins, the passthrough made slow. Like every spec module they import no torch.

* ``slowpass=slow_pipeline:SLOWPASS``: every call takes ``SLOW_CALL_S`` (2 s), as one block of
  a causal video model may on a small GPU.
* ``gatedpass=slow_pipeline:GATEDPASS``: loading waits until the file named by
  ``DREAMWIRE_TEST_LOAD_GATE`` exists, so a test holds the server in its start-up.
* ``stuckpass=slow_pipeline:STUCKPASS``: calls take 0.6 s, until the fifth, which never ends
  (a deadlocked model call).
* ``waitpass=slow_pipeline:WAITPASS``: a block model's shape: its blocks are made off the loop
  (2 s each, reported through ``work_done``) and a parameter change waits for the block in
  flight (2 s).
* ``gatherpass=slow_pipeline:GATHERPASS``: a block model's first calls: the first three only
  gather input (no frame out, as while a first block is made off the loop), then frames.
* ``firstwait=slow_pipeline:FIRSTWAIT``: the first block is made off the loop for 3 s from the
  first call: calls gather input until it is done, and a parameter change meanwhile waits.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.inference.passthrough import PassthroughPipeline
from services.inference.pipeline import PipelineSpec, Request, Result
from services.inference.specs import PassthroughConfig

SLOW_CALL_S = 2.0


class SlowPassthrough(PassthroughPipeline):
    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        time.sleep(SLOW_CALL_S)
        return super().__call__(requests)


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> PassthroughPipeline:
    """Every stand-in here but the gated one: its class by its id."""
    return STAND_INS[spec.id](spec)


SLOWPASS = PipelineSpec(
    id="slowpass",
    name="Slow passthrough",
    description="Every call takes 2 s.",
    config=PassthroughConfig,
    modes=("video",),
    loader="slow_pipeline:load",
)


LOAD_GATE_ENV = "DREAMWIRE_TEST_LOAD_GATE"
GATE_LIMIT_S = 60.0


def load_gated(spec: PipelineSpec, load_params: Any, models_dir: Path) -> PassthroughPipeline:
    gate = Path(os.environ[LOAD_GATE_ENV])
    deadline = time.monotonic() + GATE_LIMIT_S
    while not gate.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{gate} did not appear within {GATE_LIMIT_S:.0f} s")
        time.sleep(0.02)
    return PassthroughPipeline(spec)


GATEDPASS = dataclasses.replace(
    SLOWPASS,
    id="gatedpass",
    name="Gated passthrough",
    description="Loads once the test opens the gate.",
    loader="slow_pipeline:load_gated",
)


STEADY_CALL_S = 0.6
STEADY_CALLS = 4


class StuckPassthrough(PassthroughPipeline):
    def __init__(self, spec: PipelineSpec) -> None:
        super().__init__(spec)
        self.calls = 0

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        self.calls += 1
        time.sleep(STEADY_CALL_S if self.calls <= STEADY_CALLS else 3600.0)
        return super().__call__(requests)


STUCKPASS = dataclasses.replace(
    SLOWPASS,
    id="stuckpass",
    name="Stuck passthrough",
    description="Four calls of 0.6 s, then one that never ends.",
)


class WaitingPassthrough(PassthroughPipeline):
    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        self.work_done(SLOW_CALL_S)  # as a causal model's block made ahead
        return super().__call__(requests)

    def update(self, state: Any, config: Any, changed: set[str]) -> None:
        time.sleep(SLOW_CALL_S)  # waits for the block in flight
        super().update(state, config, changed)


WAITPASS = dataclasses.replace(
    SLOWPASS,
    id="waitpass",
    name="Waiting passthrough",
    description="A parameter change waits 2 s for a block made off the loop.",
)


def gathering(requests: Sequence[Request]) -> list[Result]:
    """A block model's answer while its block is made elsewhere: no frame yet."""
    return [Result(r.session_id, None, None, {"warming_up": True}) for r in requests]


class GatheringPassthrough(PassthroughPipeline):
    calls = 0

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        self.calls += 1
        return gathering(requests) if self.calls <= 3 else super().__call__(requests)


GATHERPASS = dataclasses.replace(
    SLOWPASS,
    id="gatherpass",
    name="Gathering passthrough",
    description="The first three calls gather input and make nothing.",
)


#: The first block's time off the loop (``firstwait``).
FIRST_BLOCK_S = 3.0


class FirstBlockPassthrough(PassthroughPipeline):
    first_done_at: float | None = None  # set by the first call: the block starts then
    reported = False

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        if self.first_done_at is None:
            self.first_done_at = time.monotonic() + FIRST_BLOCK_S
        if time.monotonic() < self.first_done_at:
            return gathering(requests)
        if not self.reported:
            self.reported = True
            self.work_done(FIRST_BLOCK_S)
        return super().__call__(requests)

    def update(self, state: Any, config: Any, changed: set[str]) -> None:
        if self.first_done_at is not None:  # waits for the first block under way
            time.sleep(max(0.0, self.first_done_at - time.monotonic()))
        super().update(state, config, changed)


FIRSTWAIT = dataclasses.replace(
    SLOWPASS,
    id="firstwait",
    name="First block off the loop",
    description="The first block takes 3 s off the loop; calls gather meanwhile.",
)


STAND_INS: dict[str, type[PassthroughPipeline]] = {
    "slowpass": SlowPassthrough,
    "stuckpass": StuckPassthrough,
    "waitpass": WaitingPassthrough,
    "gatherpass": GatheringPassthrough,
    "firstwait": FirstBlockPassthrough,
}
