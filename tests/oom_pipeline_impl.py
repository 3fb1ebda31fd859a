"""The loaded half of the ``oomcard`` test plugin (see ``oom_pipeline``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from services.inference.pipeline import PipelineSpec, Request, Result
from services.inference.testcard import TestcardPipeline

MAX_PIXELS = 128 * 96


class OomCardPipeline(TestcardPipeline):
    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        for r in requests:
            if r.state.width * r.state.height > MAX_PIXELS:
                raise torch.cuda.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 23.99 GiB total)"
                )
        return super().__call__(requests)


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> OomCardPipeline:
    return OomCardPipeline(spec)
