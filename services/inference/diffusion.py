"""What the diffusion pipelines share: device choice, loading, prompts, noise, the schedule.

Imported only inside an inference process (torch, diffusers, transformers).

* **Device**: CUDA in float16 (bfloat16 when asked), channels-last, PyTorch's SDPA attention,
  ``torch.compile`` of the UNet when ``DREAMWIRE_TORCH_COMPILE=1``; CPU in float32 otherwise.
  The choice is logged.
* **Loading**: the libraries' own ``from_pretrained`` from the models directory (the same files
  the hub serves; tests use tiny random models in that layout).
* **Prompts**: text embeddings are cached per distinct prompt text (a pure function of the
  text, so sharing the cache between sessions shares nothing session-specific); weighted
  prompts are blended ``linear`` (weighted average rescaled to the weighted mean norm, per
  token) or ``slerp``; a transition steps from the current blend to the target's, one step per
  generated frame.
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.inference.pipeline import (
    COMPILE_ENV,
    Pipeline,
    PipelineSpec,
    PromptItem,
    Transition,
)
from services.inference.specs import SD_TURBO, TAESD
from services.models.downloads import require_models
from services.models.store import repo_dir

logger = logging.getLogger(__name__)

PROMPT_CACHE_SIZE = 256

OOM_ERRORS: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


@dataclass(frozen=True)
class Device:
    device: torch.device
    dtype: torch.dtype

    @property
    def description(self) -> str:
        name = str(self.device)
        if self.device.type == "cuda":
            name += f" ({torch.cuda.get_device_name(self.device)})"
        return f"{name} {str(self.dtype).removeprefix('torch.')}"


def select_device(prefer: str | None = None) -> Device:
    """CUDA float16 when present (``prefer="bfloat16"`` for bf16), else CPU float32."""
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if prefer == "bfloat16" else torch.float16
        device = Device(torch.device("cuda", torch.cuda.current_device()), dtype)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        device = Device(torch.device("cpu"), torch.float32)
    return device


def hardware_info() -> dict[str, Any]:
    """What ``/api/v1/hardware/info`` reports, from torch (inference processes)."""
    info: dict[str, Any] = {"cuda": torch.cuda.is_available(), "vram_gb": None, "device": "cpu"}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            vram_gb=round(props.total_memory / 2**30, 1),
            device=props.name,
            torch_compile=os.environ.get(COMPILE_ENV) == "1",
        )
    info["torch"] = torch.__version__
    info["threads"] = torch.get_num_threads()
    return info


@dataclass
class Components:
    unet: Any
    text_encoder: Any
    tokenizer: Any
    vae: Any
    alphas_cumprod: torch.Tensor  # [1000] float32 on the device
    prediction_type: str
    vae_scale_factor: int
    latent_scale: float
    device: Device


def _low_cpu_mem_kwargs() -> dict[str, Any]:
    try:
        import accelerate  # noqa: F401
    except ImportError:
        return {"low_cpu_mem_usage": False}
    return {}


class WeightsMissing(RuntimeError):
    """A model file lacks weights its model has (they would be left random)."""


def every_weight_loaded(folder: Path, loaded: Any) -> Any:
    """The model of ``from_pretrained(..., output_loading_info=True)``, refused when a weight
    was not in the files: the libraries then initialise it at random and only warn."""
    model, info = loaded
    if missing := sorted(info.get("missing_keys") or ()):
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise WeightsMissing(f"{folder}: {len(missing)} weights missing from the files ({shown})")
    return model


def load_components(models_dir: Path, sd_repo: str, vae_repo: str, device: Device) -> Components:
    """UNet + CLIP text encoder + tokenizer + schedule from ``sd_repo``, TAESD from ``vae_repo``."""
    from diffusers import AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = repo_dir(models_dir, sd_repo)
    dtype = device.dtype
    extra = {**_low_cpu_mem_kwargs(), "output_loading_info": True}
    unet = every_weight_loaded(
        root / "unet",
        UNet2DConditionModel.from_pretrained(
            root, subfolder="unet", variant="fp16", torch_dtype=dtype, **extra
        ),
    )
    text_encoder = every_weight_loaded(
        root / "text_encoder",
        CLIPTextModel.from_pretrained(
            root, subfolder="text_encoder", variant="fp16", dtype=dtype, output_loading_info=True
        ),
    )
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer")
    vae = every_weight_loaded(
        repo_dir(models_dir, vae_repo),
        AutoencoderTiny.from_pretrained(repo_dir(models_dir, vae_repo), torch_dtype=dtype, **extra),
    )
    scheduler_config = DDPMScheduler.load_config(root, subfolder="scheduler")
    scheduler = DDPMScheduler.from_config(scheduler_config)
    modules: tuple[Any, ...] = (unet, text_encoder, vae)
    for module in modules:
        module.to(device.device).eval().requires_grad_(False)
    if device.device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # SDPA
        if os.environ.get(COMPILE_ENV) == "1" and hasattr(torch, "compile"):
            unet = torch.compile(unet, mode="reduce-overhead", fullgraph=False)
    scale = 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    return Components(
        unet=unet,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        vae=vae,
        alphas_cumprod=scheduler.alphas_cumprod.to(device.device, torch.float32),
        prediction_type=str(scheduler.config.prediction_type),
        vae_scale_factor=scale,
        latent_scale=float(vae.config.scaling_factor),
        device=device,
    )


# ---------------------------------------------------------------- prompts


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-6) -> torch.Tensor:
    """Spherical interpolation along the last dimension (token vectors / flattened latents),
    magnitudes interpolated linearly; falls back to lerp for near-parallel vectors."""
    a32, b32 = a.float(), b.float()
    na = a32.norm(dim=-1, keepdim=True).clamp_min(eps)
    nb = b32.norm(dim=-1, keepdim=True).clamp_min(eps)
    ua, ub = a32 / na, b32 / nb
    dot = (ua * ub).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    safe = so.abs() > 1e-4
    wa = torch.where(
        safe, torch.sin((1 - t) * omega) / so.clamp_min(1e-4), torch.full_like(so, 1 - t)
    )
    wb = torch.where(safe, torch.sin(t * omega) / so.clamp_min(1e-4), torch.full_like(so, t))
    direction = wa * ua + wb * ub
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(eps)
    out = direction * ((1 - t) * na + t * nb)
    return out.to(a.dtype)


def blend(embeddings: list[torch.Tensor], weights: list[float], method: str) -> torch.Tensor:
    """Weighted blend of prompt embeddings ([tokens, dim] each)."""
    if len(embeddings) == 1:
        return embeddings[0]
    total = sum(weights)
    if total <= 0:
        weights = [1.0] * len(embeddings)
        total = float(len(embeddings))
    if method == "slerp":
        out, acc = embeddings[0], weights[0]
        for emb, w in zip(embeddings[1:], weights[1:], strict=True):
            if acc + w > 0:
                out = slerp(out, emb, w / (acc + w))
            acc += w
        return out
    stacked = torch.stack([e.float() for e in embeddings])
    wt = torch.tensor(weights, dtype=torch.float32, device=stacked.device).view(-1, 1, 1) / total
    avg = (stacked * wt).sum(0)
    target_norm = (stacked.norm(dim=-1, keepdim=True) * wt).sum(0)
    avg = avg / avg.norm(dim=-1, keepdim=True).clamp_min(1e-6) * target_norm
    return avg.to(embeddings[0].dtype)


class PromptEncoder:
    """Text -> CLIP hidden states, cached per distinct text (LRU)."""

    def __init__(self, components: Components) -> None:
        self.c = components
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # texts actually run through the encoder (tests check the cache)

    @torch.inference_mode()
    def encode_text(self, text: str) -> torch.Tensor:
        if (hit := self._cache.get(text)) is not None:
            self._cache.move_to_end(text)
            return hit
        tok = self.c.tokenizer(
            [text],
            padding="max_length",
            max_length=self.c.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = tok.input_ids.to(self.c.device.device)
        emb = self.c.text_encoder(ids)[0][0]
        self.encoded += 1
        self._cache[text] = emb
        if len(self._cache) > PROMPT_CACHE_SIZE:
            self._cache.popitem(last=False)
        return emb

    def encode(self, prompts: list[PromptItem], method: str) -> torch.Tensor:
        embs = [self.encode_text(p.text) for p in prompts]
        return blend(embs, [p.weight for p in prompts], method)


class PromptTrack:
    """A session's prompt embedding over time: the blend of its prompts, or a transition.

    :meth:`step` is called once per generated frame and returns the embedding to use.
    """

    def __init__(self, encoder: PromptEncoder, prompts: list[PromptItem], method: str) -> None:
        self.encoder = encoder
        self.prompts = prompts
        self.method = method
        self.current = encoder.encode(prompts, method)
        self._start: torch.Tensor | None = None
        self._end: torch.Tensor | None = None
        self._steps = 0
        self._done = 0
        self._temporal = "linear"
        self._pending_prompts: list[PromptItem] | None = None

    def set_prompts(self, prompts: list[PromptItem], method: str) -> None:
        """Jump to these prompts from the next frame (cancels a transition)."""
        self.prompts, self.method = prompts, method
        self._start = self._end = None
        self.current = self.encoder.encode(prompts, method)

    def start_transition(self, transition: Transition, method: str) -> None:
        target = self.encoder.encode(transition.target_prompts, method)
        self.method = method
        if transition.num_steps <= 0:
            self.prompts = transition.target_prompts
            self._start = self._end = None
            self.current = target
            return
        self._start, self._end = self.current, target
        self._steps, self._done = transition.num_steps, 0
        self._temporal = transition.temporal_interpolation_method
        self._pending_prompts = transition.target_prompts

    @property
    def in_transition(self) -> bool:
        return self._start is not None

    def step(self) -> torch.Tensor:
        if self._start is not None and self._end is not None:
            self._done += 1
            t = min(1.0, self._done / self._steps)
            if self._temporal == "slerp":
                self.current = slerp(self._start, self._end, t)
            else:
                self.current = blend([self._start, self._end], [1 - t, t], "linear")
            if self._done >= self._steps:
                self.current = self._end
                self._start = self._end = None
                if self._pending_prompts is not None:
                    self.prompts = self._pending_prompts
                    self._pending_prompts = None
        return self.current


# ---------------------------------------------------------------- schedule and images


def alpha_terms(c: Components, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)) shaped [N, 1, 1, 1]."""
    a = c.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1)
    return a.sqrt(), (1 - a).sqrt()


def predict_x0(
    c: Components, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    sa, sb = alpha_terms(c, t)
    x_t, out = x_t.float(), out.float()
    if c.prediction_type == "v_prediction":
        return sa * x_t - sb * out
    return (x_t - sb * out) / sa


def lcm_scalings(
    timesteps: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """LCM's boundary condition (``LCMScheduler.get_scalings_for_boundary_condition_discrete``):
    (c_skip, c_out) shaped [N, 1, 1, 1]; the denoised latent is ``c_out·x0 + c_skip·x_t``."""
    scaled = timesteps.double().view(-1, 1, 1, 1) * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip.float(), c_out.float()


def add_noise(
    c: Components, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    sa, sb = alpha_terms(c, t)
    return sa * x0.float() + scale * sb * noise.float()


@torch.inference_mode()
def run_unet(c: Components, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """One UNet call on a batch: latents [N,4,h,w], timesteps [N], embeddings [N,77,D]."""
    dtype = c.device.dtype
    x = x_t.to(dtype)
    if c.device.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return c.unet(x, t, encoder_hidden_states=emb.to(dtype), return_dict=False)[0]


def to_unit_range(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1], as diffusers'
    ``VaeImageProcessor.preprocess`` computes it (``x / 255 * 2 - 1`` in float32)."""
    return rgb.movedim(-1, -3).float().div(255.0).mul(2.0).sub(1.0)


@torch.inference_mode()
def encode_images(c: Components, rgb: torch.Tensor) -> torch.Tensor:
    """uint8 [N,H,W,3] on the device -> latents [N,4,H/8,W/8] (float32)."""
    x = to_unit_range(rgb).to(c.device.dtype)
    if c.device.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    latents = c.vae.encode(x, return_dict=False)[0]
    return latents.float() * c.latent_scale


@torch.inference_mode()
def decode_latents(c: Components, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> uint8 [N,H,W,3] on the device (converted there: one copy to host later)."""
    img = c.vae.decode((latents / c.latent_scale).to(c.device.dtype), return_dict=False)[0]
    # As StreamDiffusion's ``postprocess_image``: (x / 2 + 0.5) clamped to [0, 1], × 255, rounded.
    img = img.float().div(2.0).add(0.5).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return img.permute(0, 2, 3, 1).contiguous()


def follow_prompts(track: PromptTrack, config: Any, changed: set[str]) -> None:
    """Apply a parameter update's prompt changes to ``track``: new prompts or blend method,
    and a transition when one was sent."""
    if changed & {"prompts", "prompt_interpolation_method"}:
        track.set_prompts(config.prompts, config.prompt_interpolation_method)
    if "transition" in changed and config.transition is not None:
        track.start_transition(config.transition, config.prompt_interpolation_method)


def restarts_noise(old: Any, new: Any) -> bool:
    """Does this update start the frame pipelines' noise afresh (``reset_cache``, a new seed or
    a new step list)?"""
    return bool(
        new.reset_cache
        or old.seed != new.seed
        or old.denoising_step_list != new.denoising_step_list
    )


def seeded_noise(seed: int, index: int, shape: tuple[int, ...], device: Device) -> torch.Tensor:
    """Deterministic noise for (seed, index), the same on every device."""
    gen = torch.Generator("cpu").manual_seed((seed * 1_000_003 + index) % 2**63)
    return torch.randn(shape, generator=gen).to(device.device)


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-6))


def latent_shape(c: Components, width: int, height: int) -> tuple[int, int, int]:
    f = c.vae_scale_factor
    return (int(c.unet.config.in_channels), math.ceil(height / f), math.ceil(width / f))


class SDTurboPipeline(Pipeline):
    """Base of the SD-Turbo pipelines: UNet + CLIP text encoder + TAESD from the models
    directory, on the best device there is, with the prompt-embedding cache."""

    copies_input = True
    oom_errors = OOM_ERRORS

    def __init__(self, spec: PipelineSpec, models_dir: Path) -> None:
        super().__init__(spec)
        require_models(spec, models_dir)
        self.device = select_device()
        self.device_description = self.device.description
        self.c = load_components(models_dir, SD_TURBO.repo_id, TAESD.repo_id, self.device)
        self.prompts = PromptEncoder(self.c)
        self.unet_calls = 0  # tests and benchmarks count calls
        logger.info("%s on %s", spec.id, self.device_description)
