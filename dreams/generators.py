"""What makes a dream's frames: the :class:`Generator` contract, the worker's options, and the
built-in ``testcard`` generator. ``pipeline:<id>`` generators live in :mod:`dreams.pipeline`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from dreams.wire import DreamState
from services.testpattern import draw_frame_number

HEARTBEAT_INTERVAL_S = 5.0
DEFAULT_WEBP_METHOD = 2


@dataclass(frozen=True, slots=True)
class Rendered:
    """One generated frame and what its generator knows about it (None: the worker decides:
    keyframes every ``keyframe_interval`` frames, the time it took to render and encode)."""

    rgb: np.ndarray
    keyframe_number: int | None = None
    generation_time_ms: float | None = None


class Generator(Protocol):
    """Makes the frames of a dream: RGB uint8 (height, width, 3) for the state's frame (whose
    prompt and seed it follows). Called from one worker thread at a time."""

    width: int
    height: int

    def render(self, state: DreamState) -> Rendered: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    connect: str
    token: str = ""
    generator: str = "testcard"
    fps: float = 5.0
    width: int = 1024
    height: int = 512
    quality: int = 80
    webp_method: int = DEFAULT_WEBP_METHOD
    keyframe_interval: int = 20
    texture: int = 0
    prompt: str | None = None
    seed: int | None = None
    heartbeat_s: float = HEARTBEAT_INTERVAL_S
    once: bool = False
    #: ``pipeline:<id>`` generators: where the models are (None: the default models dir) and
    #: the pipeline's load parameters.
    models_dir: str | None = None
    load_params: Mapping[str, Any] | None = None


class TestcardGenerator:
    """A slowly drifting colour field, new colours every keyframe, the frame number drawn in
    the top third (readable after WebP with ``services.testpattern.read_frame_number``).

    ``texture`` (0-127) adds fixed noise so frames weigh what real ones do (about 50 KB at
    1024x512 with 10); 0 keeps them small."""

    CELL_PX = 8
    __test__ = False  # not a pytest test class, despite its name

    def __init__(
        self, width: int, height: int, keyframe_interval: int = 20, texture: int = 0
    ) -> None:
        self.width = width
        self.height = height
        self.keyframe_interval = keyframe_interval
        cells_y = -(-height // self.CELL_PX)
        cells_x = -(-width // self.CELL_PX)
        y, x = np.mgrid[0:cells_y, 0:cells_x].astype(np.float32)
        self._x = x / cells_x
        self._y = y / cells_y
        self._noise: np.ndarray | None = None
        if texture > 0:
            noise = np.random.default_rng(0).integers(-texture, texture + 1, (height, width, 1))
            self._noise = noise.astype(np.int16)

    def render(self, state: DreamState) -> Rendered:
        keyframe = (state.frame_number - 1) // self.keyframe_interval
        rng = np.random.default_rng([state.seed, keyframe])
        phase = rng.uniform(0, 2 * np.pi, 3).astype(np.float32)
        t = np.float32((state.frame_number % self.keyframe_interval) / self.keyframe_interval)
        small = np.empty((*self._x.shape, 3), np.uint8)
        for c in range(3):
            wave = np.sin(6.0 * self._x + 4.0 * self._y * (c + 1) + phase[c] + 2 * np.pi * t)
            small[..., c] = (127.5 + 100.0 * wave).astype(np.uint8)
        big = small.repeat(self.CELL_PX, axis=0).repeat(self.CELL_PX, axis=1)
        rgb = np.ascontiguousarray(big[: self.height, : self.width])
        if self._noise is not None:
            rgb = np.clip(rgb + self._noise, 0, 255).astype(np.uint8)
        draw_frame_number(rgb, state.frame_number)
        return Rendered(rgb, keyframe)

    def close(self) -> None:
        pass


GeneratorFactory = Callable[[WorkerOptions], Generator]
_GENERATORS: dict[str, GeneratorFactory] = {
    "testcard": lambda o: TestcardGenerator(o.width, o.height, o.keyframe_interval, o.texture),
}


def register_generator(name: str, factory: GeneratorFactory) -> None:
    """Make ``--generator name`` available (an inference pipeline: ``pipeline:<id>``)."""
    _GENERATORS[name] = factory


def registered(name: str) -> GeneratorFactory | None:
    return _GENERATORS.get(name)


def registered_names() -> list[str]:
    return sorted(_GENERATORS)
