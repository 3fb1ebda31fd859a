"""The built-in pipelines' declarations: configs, modes, artifacts. No torch here.

Their model code lives in sibling modules named by each spec's ``loader`` and is imported only
inside the inference process that loads them.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from services.inference.fields import (
    LORA_LOAD_KEYS,
    LCMStepList,
    LoraMergeMode,
    LoraMergeStrategy,
    Loras,
    LoraScales,
    MaybeTransition,
    Paused,
    PlainHeight,
    PlainWidth,
    PromptInterpolation,
    Prompts,
    ResetCache,
    SeedField,
    StepList,
    check_descending,
)
from services.inference.pipeline import Artifact, PipelineSpec, PromptItem, ui

DEFAULT_PROMPT = "a watercolor painting of a city at night, vivid colors"

SD_TURBO = Artifact(
    "stabilityai/sd-turbo",
    (
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "text_encoder/model.fp16.safetensors",
        "tokenizer/*",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ),
)
TAESD = Artifact("madebyollin/taesd", ("config.json", "diffusion_pytorch_model.safetensors"))
#: dreamwire's estimate for SD-Turbo in float16 with TAESD and a stream batch (Scope's UI shows
#: it); Moondream 2 in float16 needs about 4 GB.
SD_TURBO_VRAM_GB = 3.0
MOONDREAM_VRAM_GB = 4.0


def _default_prompts() -> list[PromptItem]:
    return [PromptItem(DEFAULT_PROMPT, 1.0)]


# ---------------------------------------------------------------- passthrough


class PassthroughConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    height: PlainHeight = 512
    width: PlainWidth = 512
    paused: Paused = False


PASSTHROUGH = PipelineSpec(
    id="passthrough",
    name="Passthrough",
    description="Returns every input frame unchanged (testing, latency floor).",
    config=PassthroughConfig,
    modes=("video",),
    loader="services.inference.passthrough:load",
)


# ---------------------------------------------------------------- testcard


class TestcardConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    height: PlainHeight = 96
    width: PlainWidth = 128
    prompts: Prompts = msgspec.field(default_factory=_default_prompts)
    transition: MaybeTransition = None
    paused: Paused = False


TESTCARD = PipelineSpec(
    id="testcard",
    name="Test card",
    description="Generates frames carrying their frame number (services.testpattern) on a "
    "background derived from the prompt. No model; for tests of text-to-video paths.",
    config=TestcardConfig,
    modes=("text",),
    loader="services.inference.testcard:load",
    default_width=128,
    default_height=96,
    frames_per_call=0,
)


# ---------------------------------------------------------------- streamdiffusion


class StreamDiffusionConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    height: PlainHeight = 512
    width: PlainWidth = 512
    seed: SeedField = 42
    prompts: Prompts = msgspec.field(default_factory=_default_prompts)
    prompt_interpolation_method: PromptInterpolation = "linear"
    transition: MaybeTransition = None
    # The original's img2img example: t_index_list [32, 45].
    denoising_step_list: LCMStepList = msgspec.field(default_factory=lambda: [359, 99])
    noise_scale: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1.0,
            description="Scale of the noise re-added to each latent between its steps (1 = the "
            "schedule's: StreamDiffusion's do_add_noise; 0 = none); a new frame is always "
            "noised to the first step",
            extra_json_schema=ui(4, label="Noise scale"),
        ),
    ] = 1.0
    similar_image_filter: Annotated[
        bool,
        msgspec.Meta(
            description="Skip near-identical input frames (probabilistically)",
            extra_json_schema=ui(5, label="Similar image filter"),
        ),
    ] = False
    similar_image_filter_threshold: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1.0,
            description="Similarity above which frames may be skipped",
            extra_json_schema=ui(6, label="Similarity threshold"),
        ),
    ] = 0.98
    similar_image_filter_max_skip_frame: Annotated[
        int, msgspec.Meta(ge=0, le=1000, description="Never skip more frames in a row")
    ] = 10
    paused: Paused = False
    reset_cache: ResetCache = False
    loras: Loras = None
    lora_merge_mode: LoraMergeMode = "permanent_merge"
    lora_merge_strategy: LoraMergeStrategy = "permanent_merge"
    lora_scales: LoraScales = None


STREAMDIFFUSION = PipelineSpec(
    id="streamdiffusion",
    name="StreamDiffusion",
    description="Real-time img2img on SD-Turbo with a tiny VAE: the denoising steps of "
    "consecutive frames run as one batch (stream batch), one UNet call per frame.",
    config=StreamDiffusionConfig,
    modes=("video",),
    loader="services.inference.streamdiffusion:load",
    artifacts=(SD_TURBO, TAESD),
    load_only=frozenset({"height", "width"}) | LORA_LOAD_KEYS,
    check=check_descending,
    estimated_vram_gb=SD_TURBO_VRAM_GB,
)


# ---------------------------------------------------------------- dream


class DreamConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    height: PlainHeight = 512
    width: PlainWidth = 512
    seed: SeedField = 42
    prompts: Prompts = msgspec.field(default_factory=_default_prompts)
    prompt_interpolation_method: PromptInterpolation = "linear"
    transition: MaybeTransition = None
    denoising_step_list: StepList = msgspec.field(default_factory=lambda: [999])
    keyframe_interval: Annotated[
        int,
        msgspec.Meta(
            ge=1,
            le=240,
            description="Generated frames from one keyframe to the next",
            extra_json_schema=ui(4, label="Keyframe interval"),
        ),
    ] = 8
    noise_walk_speed: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1.0,
            description="How far the noise walks per keyframe (0 = still)",
            extra_json_schema=ui(5, label="Motion"),
        ),
    ] = 0.15
    refine_timestep: Annotated[
        int,
        msgspec.Meta(
            ge=0,
            le=999,
            description="In-between frames get one img2img step at this timestep (0 = off)",
            extra_json_schema=ui(6, label="In-between refinement"),
        ),
    ] = 0
    paused: Paused = False
    reset_cache: ResetCache = False


DREAM = PipelineSpec(
    id="dream",
    name="Dream",
    description="Text to video: keyframes from the prompt with slowly walking seeded noise, "
    "frames in between by latent interpolation; coherent from frame to frame.",
    config=DreamConfig,
    modes=("text",),
    loader="services.inference.dream:load",
    artifacts=(SD_TURBO, TAESD),
    frames_per_call=0,
    check=check_descending,
    estimated_vram_gb=SD_TURBO_VRAM_GB,
)


# ---------------------------------------------------------------- moondream (the overlay stage)


def _moondream_spec() -> PipelineSpec:
    from services.overlay.config import PIPELINE_ID, MoondreamConfig
    from services.overlay.model import ARTIFACTS

    return PipelineSpec(
        id=PIPELINE_ID,
        name="Moondream",
        description="Captions, answers, boxes and points from Moondream 2, drawn over the "
        "video (after another pipeline, or straight on the camera) and sent as data.",
        config=MoondreamConfig,
        modes=("video",),
        # Runs in the overlay service, not an inference process.
        loader="services.overlay.core:OverlayCore",
        artifacts=tuple(Artifact(a.repo_id, tuple(a.patterns), a.revision) for a in ARTIFACTS),
        load_only=frozenset(),
        # Scope's UI lists a postprocessor after the main pipeline: the chain dreamwire runs.
        usage=("postprocessor",),
        estimated_vram_gb=MOONDREAM_VRAM_GB,
        extra={"stage": "overlay"},
    )


MOONDREAM = _moondream_spec()
