"""inference/passthrough: returns each frame as soon as it arrives."""

from __future__ import annotations

import numpy as np

from services.stage import RingStage, StageSession
from shm.ring import Stage, stamp


class PassthroughCore(RingStage):
    def process(
        self,
        session: StageSession,
        rgb: np.ndarray,
        frame_number: int,
        pts: int,
        stamps: np.ndarray,
    ) -> tuple[np.ndarray, int, int, np.ndarray]:
        stamp(stamps, Stage.INFERENCE_START)
        stamps[Stage.MODEL_START] = stamps[Stage.INFERENCE_START]
        stamps[Stage.MODEL_END] = stamps[Stage.INFERENCE_START]
        stamp(stamps, Stage.INFERENCE_END)
        return rgb, frame_number, pts, stamps
