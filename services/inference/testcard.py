"""testcard: a text-mode pipeline without a model, for tests of generated-video paths.

Every frame carries its number (``services.testpattern``, readable after lossy coding) in the
top third; the rest is a colour derived from the blended prompt text, so a prompt change shows
on the next frame.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.pipeline import Pipeline, PipelineSpec, Request, Result
from services.inference.specs import TestcardConfig
from services.testpattern import draw_frame_number


def prompt_color(config: TestcardConfig) -> tuple[int, int, int]:
    """A mid-tone colour for the prompts (kept clear of the pattern's black and white)."""
    key = "|".join(f"{p.text}:{p.weight}" for p in config.prompts).encode()
    h = zlib.crc32(key)
    return (96 + (h & 63), 96 + ((h >> 6) & 63), 96 + ((h >> 12) & 63))


@dataclass(eq=False)
class TestcardSession:
    width: int
    height: int
    config: TestcardConfig
    frames: int = 0


class TestcardPipeline(Pipeline):
    copies_input = True

    def new_session(
        self, session_id: str, width: int, height: int, config: TestcardConfig
    ) -> TestcardSession:
        return TestcardSession(width, height, config)

    def update(self, state: TestcardSession, config: TestcardConfig, changed: set[str]) -> None:
        state.config = config

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        results = []
        for r in requests:
            s: TestcardSession = r.state
            frame = np.empty((s.height, s.width, 3), dtype=np.uint8)
            frame[:] = prompt_color(s.config)
            draw_frame_number(frame, s.frames)
            results.append(Result(s, frame, r.tag, {"frame": s.frames}))
            s.frames += 1
        return results


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> TestcardPipeline:
    return TestcardPipeline(spec)
