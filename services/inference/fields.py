"""The config field types pipelines share: one definition each, with its bounds, description
and ``ui`` hint (the JSON Schema Scope's UI renders). No torch here.

Where pipelines really differ the types stand side by side (``Timestep`` of the SD UNet,
1-999; ``WanTimestep`` of the causal Wan transformer, 1-1000 with 1000 pure noise).
"""

from __future__ import annotations

import itertools
from typing import Annotated

import msgspec

from services.inference.lora_files import LoraItem, LoraScale, MergeMode
from services.inference.pipeline import (
    Dimension,
    Interpolation,
    PromptItem,
    Seed,
    Timestep,
    Transition,
    ui,
)

#: No ``ui`` hint, as in Scope: its UI draws prompts with its own prompt box (from
#: ``supports_prompts``) and warns about an array field it cannot draw; dreamwire's page knows a
#: prompt list by its shape.
Prompts = Annotated[
    list[PromptItem],
    msgspec.Meta(min_length=1, max_length=8, description="Prompts blended by weight"),
]
PromptInterpolation = Annotated[
    Interpolation,
    msgspec.Meta(
        description="How weighted prompts are blended: linear (norm kept) or slerp",
        extra_json_schema=ui(2, "input", label="Prompt blending"),
    ),
]
MaybeTransition = Annotated[
    Transition | None,
    msgspec.Meta(
        description="Move to target prompts over num_steps generated frames (causal video "
        "pipelines: blocks)"
    ),
]


def _steps(description: str) -> msgspec.Meta:
    """A denoising step list's bounds and UI hint; the element type says the timestep range."""
    return msgspec.Meta(
        min_length=1,
        max_length=8,
        description=description,
        extra_json_schema=ui(3, label="Denoising steps", component="denoising_steps"),
    )


StepList = Annotated[list[Timestep], _steps("Descending timesteps, one UNet step each")]
#: StreamDiffusion's steps: its users pick ``t_index_list`` indices on a 50-step LCM grid.
LCMStepList = Annotated[
    list[Timestep],
    _steps(
        "Descending timesteps, one UNet step each. StreamDiffusion's t_index_list on its "
        "50-step LCM grid is timesteps 999 - 20*index (its img2img example [32, 45] is "
        "[359, 99]); other timesteps from 1 to 999 are used as given"
    ),
]
#: Wan timesteps: 1000 is pure noise; a block's last step is the smallest.
WanTimestep = Annotated[int, msgspec.Meta(ge=1, le=1000)]
WanStepList = Annotated[
    list[WanTimestep],
    _steps("Descending timesteps (1000 = pure noise), one transformer pass each"),
]
Paused = Annotated[
    bool, msgspec.Meta(description="Stop producing frames", extra_json_schema=ui(20, "input"))
]
ResetCache = Annotated[
    bool,
    msgspec.Meta(
        description="Start afresh once: the session's caches and noise (a hard cut)",
        extra_json_schema=ui(8, label="Reset cache"),
    ),
]
Height = Annotated[
    Dimension,
    msgspec.Meta(
        description="Output height (load time)",
        extra_json_schema=ui(30, load=True, component="resolution"),
    ),
]
Width = Annotated[
    Dimension,
    msgspec.Meta(
        description="Output width (load time)",
        extra_json_schema=ui(31, load=True, component="resolution"),
    ),
]
#: The same, without a ``ui`` hint: the SD pipelines' size, which Scope's UI does not offer.
PlainHeight = Annotated[Dimension, msgspec.Meta(description="Output height (load time)")]
PlainWidth = Annotated[Dimension, msgspec.Meta(description="Output width (load time)")]
SeedField = Annotated[
    Seed,
    msgspec.Meta(
        description="Seed of the noise", extra_json_schema=ui(10, label="Seed", load=True)
    ),
]


def check_descending(config: msgspec.Struct) -> None:
    steps = getattr(config, "denoising_step_list", None)
    if steps is not None and any(a <= b for a, b in itertools.pairwise(steps)):
        raise ValueError(f"denoising_step_list: must be strictly descending, got {steps}")


# ---------------------------------------------------------------- LoRAs (Scope's contract)

#: No ``ui`` hint: Scope's UI draws its LoRA panel (from ``supports_lora`` and the field whose
#: component is ``lora``) and sends ``load_params.loras`` itself.
Loras = (
    Annotated[
        list[LoraItem],
        msgspec.Meta(
            max_length=16,
            description="LoRAs to load: [{path, scale, merge_mode}], path as GET /api/v1/loras "
            "lists it (a file in the models directory's loras/)",
        ),
    ]
    | None
)
#: What Scope's UI sends at load (its global merge strategy).
LoraMergeMode = Annotated[
    MergeMode,
    msgspec.Meta(
        description="How a LoRA without its own merge_mode loads: permanent_merge (fused into "
        "the weights, no cost per frame, fixed scale) or runtime_peft (an adapter whose scale "
        "changes while streaming)"
    ),
]
#: Scope's schema field: its UI places the LoRA panel where this field's component is.
LoraMergeStrategy = Annotated[
    MergeMode,
    msgspec.Meta(
        description="The LoRA merge strategy (Scope's UI draws its LoRA panel here)",
        extra_json_schema=ui(2, label="LoRA", component="lora", load=True),
    ),
]
LoraScales = (
    Annotated[
        list[LoraScale],
        msgspec.Meta(
            max_length=16,
            description="Run time: [{path, scale}] for LoRAs loaded with runtime_peft; the next "
            "frame (or block) uses them",
        ),
    ]
    | None
)
#: The load-time keys every LoRA-taking pipeline adds to its ``load_only``.
LORA_LOAD_KEYS = frozenset({"loras", "lora_merge_mode", "lora_merge_strategy"})
