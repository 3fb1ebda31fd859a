"""Test pipeline plugins, the passthrough made slow. Like every spec module they import no torch.

* ``slowpass=slow_pipeline:SLOWPASS``: every call takes ``SLOW_CALL_S`` (2 s), as one block of
  a causal video model may on a small GPU.
* ``gatedpass=slow_pipeline:GATEDPASS``: loading waits until the file named by
  ``DREAMWIRE_TEST_LOAD_GATE`` exists, so a test holds the server in its start-up.
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


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> SlowPassthrough:
    return SlowPassthrough(spec)


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
