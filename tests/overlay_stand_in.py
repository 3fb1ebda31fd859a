"""A stand-in for Moondream 2: same four methods, same return shapes, deterministic.

The real weights cannot be downloaded here. The stand-in reads the frame number a test frame
carries (``services.synthetic.fill_frame`` writes it in the first 8 bytes) and records every
call, so tests can tell which frames the model saw. It can be slow (``delay_s``), held until a
test lets it go (``gate``), or fail (``fail``).

Used in-process (``StandInMoondream(...)``) and by a real overlay process through the service
option ``model = "overlay_stand_in:StandInMoondream"`` (``tests/`` on ``PYTHONPATH``).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

#: What detect / point answer (normalised coordinates, as Moondream's).
OBJECTS = [
    {"x_min": 0.25, "y_min": 0.25, "x_max": 0.75, "y_max": 0.75},
    {"x_min": 0.05, "y_min": 0.55, "x_max": 0.2, "y_max": 0.95},
]
POINTS = [{"x": 0.5, "y": 0.5}, {"x": 0.2, "y": 0.8}]


def frame_number_of(image: Any) -> int:
    flat = np.asarray(image).reshape(-1)
    return int.from_bytes(flat[:8].tobytes(), "little")


class StandInMoondream:
    def __init__(
        self,
        delay_s: float = 0.0,
        fail: str | None = None,
        empty: bool = False,
        log_path: str | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.fail = fail
        self.empty = empty
        self.log_path = Path(log_path) if log_path else None
        self.gate: threading.Event | None = None
        self.calls: list[tuple[str, int, dict[str, Any]]] = []
        self.started = threading.Event()

    def _call(self, method: str, image: Any, settings: dict[str, Any]) -> int:
        number = frame_number_of(image)
        self.calls.append((method, number, dict(settings or {})))
        self.started.set()
        if self.log_path is not None:
            with self.log_path.open("a") as f:
                f.write(f"{method} {number}\n")
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError(self.fail)
        return number

    @property
    def frames(self) -> list[int]:
        return [number for _, number, _ in self.calls]

    def caption(
        self, image: Any, length: str = "normal", stream: bool = False, settings: Any = None
    ) -> dict[str, Any]:
        number = self._call("caption", image, settings)
        return {"caption": "" if self.empty else f"A {length} caption of frame {number}."}

    def query(
        self, image: Any, question: str, stream: bool = False, settings: Any = None
    ) -> dict[str, Any]:
        number = self._call("query", image, settings)
        return {"answer": "" if self.empty else f"Frame {number} answers: {question}"}

    def detect(self, image: Any, object: str, settings: Any = None) -> dict[str, Any]:
        self._call("detect", image, settings)
        limit = int((settings or {}).get("max_objects", 50))
        return {"objects": [] if self.empty else [dict(o) for o in OBJECTS[:limit]]}

    def point(self, image: Any, object: str, settings: Any = None) -> dict[str, Any]:
        self._call("point", image, settings)
        limit = int((settings or {}).get("max_objects", 50))
        return {"points": [] if self.empty else [dict(pt) for pt in POINTS[:limit]]}
