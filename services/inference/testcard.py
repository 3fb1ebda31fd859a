"""testcard: a text-mode pipeline without a model, for tests of generated-video paths.

Every frame carries its number (``services.testpattern``, readable after lossy coding) in the
top third; the rest is a colour derived from the blended prompt text, so a prompt change shows
on the next frame. A ``transition`` moves the colour to the target prompts' in ``num_steps``
frames, in a straight line through RGB (colours have no sphere to slerp on), so a client can
watch a transition happen.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.inference.pipeline import Pipeline, PipelineSpec, PromptItem, Request, Result
from services.inference.specs import TestcardConfig
from services.testpattern import draw_frame_number

Color = tuple[int, int, int]


def prompt_color(prompts: Sequence[PromptItem]) -> Color:
    """A mid-tone colour for the prompts (kept clear of the pattern's black and white)."""
    key = "|".join(f"{p.text}:{p.weight}" for p in prompts).encode()
    h = zlib.crc32(key)
    return (96 + (h & 63), 96 + ((h >> 6) & 63), 96 + ((h >> 12) & 63))


def _mix(a: Color, b: Color, f: float) -> Color:
    return (
        round(a[0] + (b[0] - a[0]) * f),
        round(a[1] + (b[1] - a[1]) * f),
        round(a[2] + (b[2] - a[2]) * f),
    )


@dataclass(eq=False)
class TestcardState:
    width: int
    height: int
    color: Color
    frames: int = 0
    #: A transition under way: (start colour, target colour, frames in all, frames done).
    moving: tuple[Color, Color, int, int] | None = None

    def step(self) -> Color:
        """This frame's colour (a transition advances one frame)."""
        if self.moving is not None:
            start, target, steps, done = self.moving
            done += 1
            self.color = _mix(start, target, done / steps)
            self.moving = None if done >= steps else (start, target, steps, done)
        return self.color


class TestcardPipeline(Pipeline):
    copies_input = True

    def new_session(
        self, session_id: str, width: int, height: int, config: TestcardConfig
    ) -> TestcardState:
        state = TestcardState(width, height, prompt_color(config.prompts))
        self.update(state, config, {"transition"})
        return state

    def update(self, state: TestcardState, config: TestcardConfig, changed: set[str]) -> None:
        if "transition" in changed and config.transition is not None:
            target = prompt_color(config.transition.target_prompts)
            if config.transition.num_steps <= 0:
                state.color, state.moving = target, None
            else:
                state.moving = (state.color, target, config.transition.num_steps, 0)
        elif "prompts" in changed:
            state.color, state.moving = prompt_color(config.prompts), None

    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        results = []
        for r in requests:
            s: TestcardState = r.state
            frame = np.empty((s.height, s.width, 3), dtype=np.uint8)
            frame[:] = s.step()
            draw_frame_number(frame, s.frames)
            results.append(Result(r.session_id, frame, r.tag))
            s.frames += 1
        return results


def load(spec: PipelineSpec, load_params: Any, models_dir: Path) -> TestcardPipeline:
    return TestcardPipeline(spec)
