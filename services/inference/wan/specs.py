"""Declarations of the causal Wan pipelines (torch-free): configs, modes, artifacts.

All three generate video in blocks of latent frames with a few flow-matching denoising steps,
attending to a rolling per-session KV cache of earlier blocks (``services.inference.wan.model``).
One latent frame is four video frames (the Wan VAE's temporal compression); a session's first
block decodes to ``4 * n - 3`` frames, every later one to ``4 * n``.

Registry lines (``services.inference.registry.BUILTIN`` and the ``dreamwire.pipelines`` entry
points)::

    "streamdiffusionv2": "services.inference.wan.specs:STREAMDIFFUSIONV2",
    "longlive": "services.inference.wan.specs:LONGLIVE",
    "krea-realtime-video": "services.inference.wan.specs:KREA_REALTIME_VIDEO",
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from services.inference.fields import (
    LORA_LOAD_KEYS,
    Height,
    LoraMergeMode,
    LoraMergeStrategy,
    Loras,
    LoraScales,
    MaybeTransition,
    Paused,
    PromptInterpolation,
    Prompts,
    ResetCache,
    SeedField,
    Width,
    check_descending,
)
from services.inference.fields import WanStepList as StepList
from services.inference.pipeline import (
    Artifact,
    PipelineSpec,
    PromptItem,
    ui,
)

DEFAULT_PROMPT = (
    "A 3D animated scene. A panda walks along a path towards the camera in a park on a spring day."
)

#: Text encoder (UMT5-XXL), tokenizer and VAE in the diffusers layout.
WAN_BASE = Artifact(
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    ("model_index.json", "text_encoder/*", "tokenizer/*", "vae/*"),
)
#: The causal transformers: single-file checkpoints with the original Wan key names.
SDV2_WEIGHTS = Artifact("jerryfeng/StreamDiffusionV2", ("wan_causal_dmd_v2v/model.pt",))
LONGLIVE_WEIGHTS = Artifact(
    "Efficient-Large-Model/LongLive-1.3B", ("models/longlive_base.pt", "models/lora.pt")
)
KREA_WEIGHTS = Artifact("krea/krea-realtime-video", ("krea-realtime-video-14b.safetensors",))
#: The light autoencoders Scope offers as ``vae_type`` (its mirror of lightx2v/Autoencoders):
#: LightX2V's pruned Wan VAE, TAEHV's Wan 2.1 tiny autoencoder and LightX2V's weights for it.
AUTOENCODERS = Artifact(
    "daydreamlive/Autoencoders", ("lightvaew2_1.pth", "taew2_1.pth", "lighttaew2_1.pth")
)

#: Where each pipeline's transformer checkpoint lives inside its artifact.
CHECKPOINTS: dict[str, tuple[str, str]] = {
    "streamdiffusionv2": (SDV2_WEIGHTS.repo_id, SDV2_WEIGHTS.patterns[0]),
    "longlive": (LONGLIVE_WEIGHTS.repo_id, LONGLIVE_WEIGHTS.patterns[0]),
    "krea-realtime-video": (KREA_WEIGHTS.repo_id, KREA_WEIGHTS.patterns[0]),
}
#: LoRAs merged into the transformer at load: (repo, file, alpha). LongLive's config trains
#: its built-in LoRA at rank 256, alpha 256.
LORAS: dict[str, tuple[str, str, float]] = {
    "longlive": (LONGLIVE_WEIGHTS.repo_id, LONGLIVE_WEIGHTS.patterns[1], 256.0),
}

Quantization = Literal["fp8_e4m3fn"]

#: Scope's ``vae_type`` values (scope:enums.py ``VaeType``): the full Wan VAE, LightX2V's 75 %
#: pruned one, TAEHV's tiny autoencoder, the same with LightX2V's weights.
VaeType = Literal["wan", "lightvae", "tae", "lighttae"]
LIGHTVAE_FILE = "lightvaew2_1.pth"
#: The tiny autoencoders' files in :data:`AUTOENCODERS`, and whether the weights work on the
#: Wan VAE's raw latents (LightX2V's) rather than the normalised ones the model sees.
TAE_FILES: dict[str, tuple[str, bool]] = {
    "tae": ("taew2_1.pth", False),
    "lighttae": ("lighttaew2_1.pth", True),
}


def _prompts(text: str = DEFAULT_PROMPT) -> list[PromptItem]:
    return [PromptItem(text, 1.0)]


def _steps(default: list[int]) -> Any:
    return msgspec.field(default_factory=lambda: list(default))


ManageCache = Annotated[
    bool,
    msgspec.Meta(
        description="Video mode: start afresh when the prompt changes outside a transition",
        extra_json_schema=ui(7, label="Manage cache"),
    ),
]


#: Where a VAE stage of a split block loop runs: ``same`` (the transformer's device), ``cpu``,
#: ``cuda:N``; ``cpu:N`` names a stand-in device (the CPU), as the supervisor's ``devices`` do.
StageDevice = Annotated[str, msgspec.Meta(pattern=r"^(same|cpu|(cuda|cpu):[0-9]{1,2})$")]


class SplitPlacement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A split block loop's VAE stages: their devices, and torch's threads in each (CPU)."""

    encode: StageDevice = "same"
    decode: StageDevice = "same"
    threads: Annotated[int, msgspec.Meta(ge=1, le=256)] | None = None


class WanConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Fields every causal Wan pipeline has."""

    height: Height = 320
    width: Width = 576
    seed: SeedField = 42
    prompts: Prompts = msgspec.field(default_factory=_prompts)
    prompt_interpolation_method: PromptInterpolation = "linear"
    transition: MaybeTransition = None
    denoising_step_list: StepList = _steps([1000, 750, 500, 250])
    manage_cache: ManageCache = True
    reset_cache: ResetCache = False
    noise_scale: Annotated[
        float,
        msgspec.Meta(
            ge=0.0,
            le=1.0,
            description="Video mode: noise mixed into the input (the first step becomes "
            "1000·noise_scale − 100)",
            extra_json_schema=ui(4, label="Noise scale"),
        ),
    ] = 0.7
    noise_controller: Annotated[
        bool,
        msgspec.Meta(
            description="Video mode: set the noise from the input's motion (more motion, "
            "less noise)",
            extra_json_schema=ui(5, label="Noise controller"),
        ),
    ] = True
    paused: Paused = False
    loras: Loras = None
    lora_merge_mode: LoraMergeMode = "permanent_merge"
    lora_merge_strategy: LoraMergeStrategy = "permanent_merge"
    lora_scales: LoraScales = None
    vae_type: Annotated[
        VaeType,
        msgspec.Meta(
            description="VAE type to use. 'wan' is the full VAE, 'lightvae' is 75% pruned "
            "(faster but lower quality), 'tae' is a tiny autoencoder for fast preview quality, "
            "'lighttae' is LightTAE with WanVAE normalization.",
            extra_json_schema=ui(3, label="VAE", load=True),
        ),
    ] = "wan"
    #: dreamwire's: the block loop as stages, VAE encode and decode each in a process of its
    #: own beside the transformer, blocks overlapping (``true``, or where each stage runs).
    split: Annotated[
        bool | SplitPlacement,
        msgspec.Meta(
            description="Run VAE encode and decode as processes of their own, overlapping "
            "consecutive blocks (true, or {encode, decode: device, threads})"
        ),
    ] = False


class StreamDiffusionV2Config(WanConfig, forbid_unknown_fields=True, kw_only=True):
    height: Height = 512
    width: Width = 512
    denoising_step_list: StepList = _steps([750, 250])


class LongLiveConfig(WanConfig, forbid_unknown_fields=True, kw_only=True):
    pass


class KreaRealtimeVideoConfig(WanConfig, forbid_unknown_fields=True, kw_only=True):
    kv_cache_attention_bias: Annotated[
        float,
        msgspec.Meta(
            ge=0.01,
            le=1.0,
            description="Reliance on past frames: log(bias) is added to their attention scores",
            extra_json_schema=ui(6, label="KV cache attention bias"),
        ),
    ] = 0.3
    quantization: Annotated[
        Quantization | None,
        msgspec.Meta(
            description="fp8 weights (GPUs with fp8 support, < 40 GB)",
            extra_json_schema=ui(32, label="Quantization", load=True),
        ),
    ] = None


#: What a Wan pipeline takes only at load (changing one while streaming is refused).
LOAD_KEYS = frozenset({"height", "width", "vae_type", "split"}) | LORA_LOAD_KEYS

#: Text-mode step list of streamdiffusionv2 (its config default is the video one).
SDV2_TEXT_STEPS = (1000, 750)


class WanGeometry(msgspec.Struct, frozen=True, kw_only=True):
    """How a pipeline makes blocks, in latent frames, as Scope's model.yaml and blocks do
    (the block loop: ``services.inference.wan.blocks``)."""

    block_frames: int
    first_block_frames: int  # streamdiffusionv2's first block has 2 (its VAE takes 1 + 4)
    cache_frames: int  # what a block attends to, itself and the sinks included
    sink_frames: int
    shift: float  # of the flow-matching table
    clean_pass: bool  # a t = 0 pass writes each block into the cache
    context_frames: int = 0  # > 0: the cache is rebuilt from these before every block (Krea)
    recache_on_prompt: bool = False  # longlive: a new prompt recomputes the recent frames

    def latents(self, first: bool) -> int:
        """Latent frames of a block (``first``: a stream's first)."""
        return self.first_block_frames if first else self.block_frames

    def video_frames(self, first: bool) -> int:
        """Video frames of a block, in (video mode) and out: the VAE turns ``1 + 4k`` frames
        into ``1 + k`` latents at a stream's start, four frames into one latent after."""
        return 4 * self.latents(first) - (3 if first else 0)

    @property
    def recent_frames(self) -> int:
        """Latent frames of the past the loop keeps (for a rebuild or a recache)."""
        if self.context_frames:
            return self.context_frames - 1
        return self.cache_frames if self.recache_on_prompt else 0


GEOMETRY: dict[str, WanGeometry] = {
    # scope:streamdiffusionv2/model.yaml, modules/causal_model.py (sink_size 3);
    # shift 8 is the wrapper's default (wan2_1/components/generator.py).
    "streamdiffusionv2": WanGeometry(
        block_frames=1,
        first_block_frames=2,
        cache_frames=6,
        sink_frames=3,
        shift=8.0,
        clean_pass=True,
    ),
    # scope:longlive/model.yaml: local_attn_size 12 including sink_size 3.
    "longlive": WanGeometry(
        block_frames=3,
        first_block_frames=3,
        cache_frames=12,
        sink_frames=3,
        shift=5.0,
        clean_pass=True,
        recache_on_prompt=True,
    ),
    # scope:krea_realtime_video/model.yaml: kv_cache_num_frames 3, local_attn_size 6.
    "krea-realtime-video": WanGeometry(
        block_frames=3,
        first_block_frames=3,
        cache_frames=6,
        sink_frames=0,
        shift=5.0,
        clean_pass=False,
        context_frames=3,
    ),
}


def _spec(
    pipeline_id: str,
    name: str,
    description: str,
    config: type[WanConfig],
    modes: tuple[Literal["video", "text"], ...],
    weights: Artifact,
    width: int,
    height: int,
    load_only: frozenset[str] = LOAD_KEYS,
    *,
    mode_steps: dict[str, list[int]] | None = None,
    estimated_vram_gb: float = 20.0,
    recommended_quantization_vram_threshold: float | None = None,
) -> PipelineSpec:
    """Scope's VRAM figures: 20 GB for the 1.3B models, 32 GB for Krea 14B (fp8 below 40);
    ``mode_steps``: the step lists Scope's UI starts a mode with (its ``mode_defaults``)."""
    geometry = GEOMETRY[pipeline_id]
    return PipelineSpec(
        id=pipeline_id,
        name=name,
        description=description,
        config=config,
        modes=modes,
        loader="services.inference.wan.pipeline:load",
        default_width=width,
        default_height=height,
        artifacts=(WAN_BASE, weights, AUTOENCODERS),
        frames_per_call=4 * geometry.block_frames,
        load_only=load_only,
        check=check_descending,
        estimated_vram_gb=estimated_vram_gb,
        recommended_quantization_vram_threshold=recommended_quantization_vram_threshold,
        extra={"geometry": msgspec.structs.asdict(geometry), "mode_steps": mode_steps or {}},
    )


STREAMDIFFUSIONV2 = _spec(
    "streamdiffusionv2",
    "StreamDiffusionV2",
    "Real-time video-to-video on a causal, DMD-distilled Wan2.1-T2V-1.3B: one latent frame "
    "(4 video frames) per block, rolling KV cache of 6 latent frames, motion-aware noise.",
    StreamDiffusionV2Config,
    ("video", "text"),
    SDV2_WEIGHTS,
    512,
    512,
    mode_steps={"text": list(SDV2_TEXT_STEPS)},
)
LONGLIVE = _spec(
    "longlive",
    "LongLive",
    "Long text-to-video on LongLive-1.3B (causal Wan2.1): blocks of 3 latent frames, a local "
    "window of 12 with 3 sink frames, recent frames re-cached with the new prompt on a change.",
    LongLiveConfig,
    ("text", "video"),
    LONGLIVE_WEIGHTS,
    576,
    320,
    mode_steps={"video": [1000, 750]},
)
KREA_REALTIME_VIDEO = _spec(
    "krea-realtime-video",
    "Krea Realtime Video",
    "Text-to-video on Krea Realtime Video 14B (causal Wan2.1): blocks of 3 latent frames, "
    "KV cache recomputed from the context frames every block, tunable attention to the past.",
    KreaRealtimeVideoConfig,
    ("text", "video"),
    KREA_WEIGHTS,
    576,
    320,
    LOAD_KEYS | {"quantization"},
    mode_steps={"video": [1000, 750]},
    estimated_vram_gb=32.0,
    recommended_quantization_vram_threshold=40.0,
)
