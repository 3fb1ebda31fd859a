"""The pipeline contract: what a pipeline declares and what a loaded pipeline does.

A pipeline is two halves so that the light one can be imported anywhere:

* a :class:`PipelineSpec` (this module, no torch): id, config (a ``msgspec.Struct`` whose
  fields carry defaults, bounds and ``ui`` hints, rendered as a JSON Schema in the Scope
  format), modes (``video``: frames in; ``text``: no input, the pipeline generates), default
  resolution, model artifacts (Hugging Face repos + file patterns), frames per call, and
  ``loader``: ``"module:function"`` of the heavy half, imported only when the pipeline is
  loaded in its inference process;
* a :class:`Pipeline` (the loaded model): per-session state, and one call that turns a batch of
  requests (one per session: its state, its input frames or none, a tag) into results. Sessions
  at the same resolution share one call, so the model sees them as one batch.

Output frames are ``(H, W, 3)`` uint8 RGB, as numpy arrays or (for torch pipelines) CPU/CUDA
uint8 tensors that the caller copies straight into the output ring slot: one copy to host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from services.protocol import LoraAdapter, Mode

#: ``DREAMWIRE_TORCH_COMPILE=1``: pipelines ``torch.compile`` their model (CUDA for the SD-Turbo
#: UNet, any device for the causal Wan layer step); the inference service then warms it up at load.
COMPILE_ENV = "DREAMWIRE_TORCH_COMPILE"


# ---------------------------------------------------------------- config building blocks


def ui(
    order: int,
    category: str = "configuration",
    *,
    label: str | None = None,
    component: str | None = None,
    load: bool = False,
) -> dict[str, Any]:
    """The ``ui`` hint of a config field (``extra_json_schema`` of its ``msgspec.Meta``).

    ``category`` is ``configuration`` (settings panel) or ``input`` (the input panel);
    ``is_load_param`` is always written: Scope's UI takes a field without it for a load-time
    one and greys it out while streaming. A field without a ``ui`` hint is not rendered by
    Scope-style frontends.
    """
    hint: dict[str, Any] = {"order": order, "category": category, "is_load_param": load}
    if label is not None:
        hint["label"] = label
    if component is not None:
        hint["component"] = component
    return {"ui": hint}


class PromptItem(msgspec.Struct, forbid_unknown_fields=True):
    text: str
    weight: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] = 1.0


Interpolation = Literal["linear", "slerp"]


class Transition(msgspec.Struct, forbid_unknown_fields=True):
    """Move from the current prompts to ``target_prompts`` in ``num_steps`` generated frames."""

    target_prompts: Annotated[list[PromptItem], msgspec.Meta(min_length=1)]
    num_steps: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 8
    temporal_interpolation_method: Interpolation = "linear"


MIN_DIMENSION = 16
Dimension = Annotated[int, msgspec.Meta(ge=MIN_DIMENSION, le=2048, multiple_of=8)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Timestep = Annotated[int, msgspec.Meta(ge=1, le=999)]


@dataclass(frozen=True)
class Artifact:
    """Files of one Hugging Face repository a pipeline needs (``fnmatch`` patterns)."""

    repo_id: str
    patterns: tuple[str, ...] = ("*",)
    revision: str = "main"


# ---------------------------------------------------------------- the declaration


@dataclass(frozen=True)
class PipelineSpec:
    """Everything about a pipeline that can be known without loading it."""

    id: str
    name: str
    description: str
    config: type[msgspec.Struct]
    modes: tuple[Mode, ...]
    loader: str
    default_width: int = 512
    default_height: int = 512
    artifacts: tuple[Artifact, ...] = ()
    frames_per_call: int = 1
    #: Fields that only take effect at load (``height``, ``width``): refused at run time.
    load_only: frozenset[str] = frozenset({"height", "width"})
    #: Extra cross-field checks: raise ``ValueError("<field>: <what>")``.
    check: Callable[[msgspec.Struct], None] | None = None
    version: str = "1"
    #: Scope's ``usage``: ``"postprocessor"`` puts an overlay in its UI's post-processing list.
    usage: tuple[str, ...] = ()
    #: What a user should budget (Scope's ``estimated_vram_gb``); None: no GPU needed.
    estimated_vram_gb: float | None = None
    #: Below this much VRAM, Scope's UI picks fp8 quantization by default.
    recommended_quantization_vram_threshold: float | None = None
    docs_url: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def default_mode(self) -> Mode:
        return self.modes[0]

    def load(self, load_params: msgspec.Struct, models_dir: Path) -> Pipeline:
        """Import the heavy half and build the loaded pipeline."""
        module_name, _, attr = self.loader.partition(":")
        import importlib

        module = importlib.import_module(module_name)
        factory: Callable[[PipelineSpec, msgspec.Struct, Path], Pipeline] = getattr(module, attr)
        return factory(self, load_params, models_dir)


# ---------------------------------------------------------------- the loaded half


@dataclass(eq=False)
class Request:
    """One session's share of a call: its id and state, its input (None in text mode) and a
    tag the result must carry back (the frame's metadata)."""

    session_id: str
    state: Any
    frames: Any
    tag: Any


@dataclass(eq=False)
class Result:
    """One output frame of a session (by id), with the tag of the input it derives from and
    per-frame facts for the client (e.g. ``keyframe_number``)."""

    session_id: str
    frame: Any
    tag: Any
    info: dict[str, Any] | None = None


class Pipeline(ABC):
    """A loaded pipeline, shared by every session of its inference process."""

    #: True when :meth:`prepare` copies the input off the ring (the slot can be released at
    #: once); False when the result may be a view of the input (passthrough).
    copies_input: bool = True
    #: Exceptions meaning "the device ran out of memory" (``torch.cuda.OutOfMemoryError``).
    oom_errors: tuple[type[BaseException], ...] = ()
    #: Where it runs, for the log and ``hardware_info`` ("cpu float32", "cuda:0 float16").
    device_description: str = "cpu"

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec

    @abstractmethod
    def new_session(self, session_id: str, width: int, height: int, config: Any) -> Any:
        """Per-session state (caches, embeddings, noise) for a validated config."""

    #: Called with the duration of model work done off the caller's thread (a block made
    #: ahead); the service counts it among its calls (``CallClock.record``).
    work_done: Callable[[float], None] = staticmethod(lambda duration_s: None)

    def update(self, state: Any, config: Any, changed: set[str]) -> None:  # noqa: B027
        """The session's config changed (``changed`` names the fields); applied next frame.
        May wait for the session's model work in flight (the service answers heartbeats)."""

    def end_session(self, state: Any) -> None:  # noqa: B027
        """Free what the session held."""

    def prepare(self, state: Any, rgb: Any) -> Any:
        """Take one input frame off the ring (an (H, W, 3) uint8 view valid until released)."""
        return rgb

    @abstractmethod
    def __call__(self, requests: Sequence[Request]) -> list[Result]:
        """Run one step for these sessions (all at one resolution). Video requests carry the
        prepared input; text requests ``None``. A session may yield no result (warm-up,
        paused) or one; results keep the tag of the input they derive from."""

    def lora_status(self) -> list[LoraAdapter]:
        """Its LoRAs and their scales now (``services.inference.loras``)."""
        return []

    def stage_ms(self) -> dict[str, float]:
        """Where its work runs as stages (a split block loop), the recent median ms a block
        spends in each; called from the liveness thread too."""
        return {}

    def ready(self, state: Any) -> list[Result]:
        """Frames this session's calls made beyond the one each returned (the rest of a
        block), handed over now so the service can pace them evenly; none for a per-frame
        pipeline."""
        return []

    def free_memory(self) -> None:  # noqa: B027
        """Give back cached device memory (after an out-of-memory error)."""

    def close(self) -> None:  # noqa: B027
        pass
