"""A test pipeline plugin (``DREAMWIRE_PIPELINES="oomcard=oom_pipeline:OOMCARD"``): the test
card, except that a call larger than 128x96 runs out of CUDA memory the way a too-large model
call does on a real GPU. Like every spec module it imports no torch (signalling reads it);
the loaded half is in ``oom_pipeline_impl``."""

from __future__ import annotations

from services.inference.pipeline import PipelineSpec
from services.inference.specs import TestcardConfig

OOMCARD = PipelineSpec(
    id="oomcard",
    name="Out-of-memory card",
    description="The test card; out of memory above 128x96.",
    config=TestcardConfig,
    modes=("text",),
    loader="oom_pipeline_impl:load",
    default_width=128,
    default_height=96,
    frames_per_call=0,
)
