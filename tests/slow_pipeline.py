"""A test pipeline plugin (``DREAMWIRE_PIPELINES="slowpass=slow_pipeline:SLOWPASS"``): the
passthrough, except that every call takes ``SLOW_CALL_S`` (2 s), as one block of a causal video
model may on a small GPU. Like every spec module it imports no torch."""

from __future__ import annotations

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
