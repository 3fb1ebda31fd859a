"""Write tiny random-weight diffusion models in the real on-disk layout.

``python scripts/make_tiny_models.py DIR`` fills DIR (a dreamwire models directory) with:

* ``DIR/stabilityai/sd-turbo/``: ``model_index.json``, ``unet/``, ``text_encoder/``,
  ``tokenizer/`` and ``scheduler/`` as diffusers / transformers ``save_pretrained`` write them
  (fp16 variant files, like the real repository's), the text encoder's keys named as in the real
  files (``text_model.…``, which transformers 5 no longer writes);
* ``DIR/madebyollin/taesd/``: an ``AutoencoderTiny``;
* with ``--lora NAME``, ``DIR/loras/NAME``: a kohya-style LoRA for that UNet.

The tokenizer is a CLIP BPE tokenizer over a character-level vocabulary written here (the real
ones come from the hub). Loading goes through the same ``from_pretrained`` calls as real models;
a 64×64 frame takes a few milliseconds on a laptop CPU. Each directory gets the marker file the
downloader writes, so ``models_status`` reports them as downloaded.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path
from typing import Any

SD_REPO = "stabilityai/sd-turbo"
TAESD_REPO = "madebyollin/taesd"
TEXT_DIM = 32


def write_tokenizer(out: Path) -> None:
    from transformers import CLIPTokenizer

    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    tok.save_pretrained(out)


def make_sd(root: Path, seed: int = 0) -> None:
    import torch

    # From their modules: for type checkers, diffusers' top level exports placeholder classes.
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
    from diffusers.schedulers.scheduling_euler_discrete import EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
    )
    unet.half().save_pretrained(root / "unet", variant="fp16")
    text_config = CLIPTextConfig(
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_act="gelu",
    )
    text_encoder = CLIPTextModel(text_config)
    text_encoder.half().save_pretrained(root / "text_encoder", variant="fp16")
    prefix_text_model_keys(root / "text_encoder" / "model.fp16.safetensors")
    write_tokenizer(root / "tokenizer")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        timestep_spacing="trailing",
    )
    scheduler.save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.24.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def prefix_text_model_keys(path: Path) -> None:
    """The real sd-turbo files name the CLIP text encoder's weights ``text_model.…``;
    transformers 5 saves them without the prefix (and transformers 4 silently random-initialises
    a text encoder from such a file). Write the real layout."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    renamed = {
        k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()
    }
    save_file(renamed, str(path), metadata=metadata)


def make_taesd(root: Path, seed: int = 1) -> None:
    import torch
    from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny  # (see make_sd)

    torch.manual_seed(seed)
    vae = AutoencoderTiny(
        in_channels=3,
        out_channels=3,
        encoder_block_out_channels=(16, 16, 16, 16),
        decoder_block_out_channels=(16, 16, 16, 16),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
        upsampling_scaling_factor=2,
        latent_magnitude=3,
        latent_shift=0.5,
        scaling_factor=1.0,
    )
    _calibrate(vae)
    vae.save_pretrained(root)


def _calibrate(vae: Any) -> None:
    """Rescale the last layers so random weights still carry the picture's signal: latents of
    about unit spread, decoded images mid-grey with visible contrast (instead of all black)."""
    import torch

    with torch.no_grad():
        images = torch.rand(4, 3, 64, 64) * 2 - 1
        # new = gain * (old - mean) + target, per output channel
        # (DecoderTiny maps its last layer's [0, 1] to [-1, 1]: undo that to measure the layer.)
        for layer, out, spread, target in (
            (vae.encoder.layers[-1], vae.encoder(images), 1.0, 0.0),
            (vae.decoder.layers[-1], (vae.decoder(torch.randn(4, 4, 8, 8)) + 1) / 2, 0.2, 0.5),
        ):
            mean = out.mean(dim=(0, 2, 3))
            gain = spread / out.std(dim=(0, 2, 3)).clamp_min(1e-6)
            layer.weight.mul_(gain.view(-1, 1, 1, 1))
            layer.bias.copy_(gain * (layer.bias - mean) + target)


def make_all(models_dir: Path) -> None:
    from services.models.store import mark_complete, repo_dir

    make_sd(repo_dir(models_dir, SD_REPO))
    make_taesd(repo_dir(models_dir, TAESD_REPO))
    for repo in (SD_REPO, TAESD_REPO):
        mark_complete(models_dir, repo)


def make_sd_lora(models_dir: Path, name: str, seed: int = 5, size: float = 0.5) -> Path:
    """A LoRA for the tiny UNet in kohya's layout (``lora_unet_…`` with ``alpha``, what SD
    LoRAs users download have), on every attention projection, into ``DIR/loras/``."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    from services.inference.lora_files import lora_dir
    from services.models.store import repo_dir

    unet = UNet2DConditionModel.from_pretrained(
        repo_dir(models_dir, SD_REPO), subfolder="unet", variant="fp16"
    )
    gen = torch.Generator().manual_seed(seed)
    rank, state = 4, {}
    for module_name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in module_name:
            key = "lora_unet_" + module_name.replace(".", "_")
            out_dim, in_dim = module.weight.shape
            state[f"{key}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * size
            state[f"{key}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * size
            state[f"{key}.alpha"] = torch.tensor(float(rank))
    path = lora_dir(models_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="models directory to fill")
    parser.add_argument(
        "--lora", metavar="NAME", help="also write a kohya-style LoRA for the UNet to loras/NAME"
    )
    args = parser.parse_args(argv)
    make_all(args.dir)
    print(f"tiny models written to {args.dir}")
    if args.lora:
        print(f"LoRA written to {make_sd_lora(args.dir, args.lora)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
