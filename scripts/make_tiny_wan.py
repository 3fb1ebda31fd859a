"""Write tiny random-weight causal Wan models in the real on-disk layout.

``python scripts/make_tiny_wan.py DIR`` fills DIR (a dreamwire models directory) with:

* ``DIR/Wan-AI/Wan2.1-T2V-1.3B-Diffusers/``: ``model_index.json``, ``text_encoder/`` (UMT5
  encoder), ``tokenizer/`` (a character-level fast tokenizer standing in for UMT5's
  SentencePiece one) and ``vae/`` (``AutoencoderKLWan``), as ``save_pretrained`` writes them;
* one transformer checkpoint per pipeline, with the **original Wan key names**
  (``blocks.0.self_attn.q.weight``, ``head.head.weight``, …) in the container each loader
  must unwrap: a ``{"generator": {"model.…"}}`` pickle (StreamDiffusionV2), a plain pickle
  (LongLive, with its built-in LoRA beside it in PEFT's key names), a safetensors file (Krea).

* ``DIR/daydreamlive/Autoencoders/``: the light VAEs with random weights stored in float16, at
  their real sizes (their widths are fixed): ``lightvaew2_1.pth`` (``vae_type`` ``lightvae``,
  the Wan VAE at a quarter of its widths, the original Wan VAE's key names; 8.0 M parameters),
  ``taew2_1.pth`` and ``lighttaew2_1.pth`` (``tae`` / ``lighttae``, TAEHV's Wan 2.1 tiny
  autoencoder as the original's state dict; 11.3 M parameters).

``--wan-vae full`` writes the Wan VAE at its real size (Wan 2.1's config, 127 M random
parameters) instead of the tiny one, for measuring what the light VAEs save
(``scripts/bench_wan.py --vae-type``).

Every repository gets the downloader's completion marker. The transformer is 2 layers of width
256 (two heads of 128, as Wan's head size); a 64×64 block takes milliseconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from pathlib import Path
from typing import Any

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
TEXT_DIM = 32
TEXT_LEN = 512
Z_DIM = 16

#: diffusers name fragment -> original Wan name fragment (the inverse of diffusers' mapping).
TO_ORIGINAL = (
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
)


def to_original_key(key: str) -> str:
    if key == "scale_shift_table":
        return "head.modulation"
    key = key.replace(".scale_shift_table", ".modulation")
    for new, old in TO_ORIGINAL:
        key = key.replace(new, old)
    # diffusers' norm2 (cross-attention norm) is the original norm3 and vice versa.
    if ".norm2." in key:
        return key.replace(".norm2.", ".norm3.")
    if ".norm3." in key:
        return key.replace(".norm3.", ".norm2.")
    return key


#: diffusers' ``AutoencoderKLWan`` resnet part -> the original Wan VAE's ``ResidualBlock`` part.
VAE_RESNET = (
    ("norm1.", "residual.0."),
    ("conv1.", "residual.2."),
    ("norm2.", "residual.3."),
    ("conv2.", "residual.6."),
    ("conv_shortcut.", "shortcut."),
)


def to_original_vae_key(key: str) -> str:
    """An ``AutoencoderKLWan`` name -> the original Wan VAE's (what Scope's files hold): the
    inverse of diffusers' ``convert_wan_vae_to_diffusers``."""

    def resnet(part: str) -> str:
        for new, old in VAE_RESNET:
            if part.startswith(new):
                return old + part[len(new) :]
        return part  # a resample's own layers keep their names

    top = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
    first, _, rest = key.partition(".")
    if first in top:
        return f"{top[first]}.{rest}"
    side = {"conv_in.": "conv1.", "norm_out.": "head.0.", "conv_out.": "head.2."}
    for new, old in side.items():
        if rest.startswith(new):
            return f"{first}.{old}{rest[len(new) :]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{first}.middle.1.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{first}.middle.{2 * int(m[1])}.{resnet(m[2])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(.+)", rest):
        return f"{first}.downsamples.{m[1]}.{resnet(m[2])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        return f"{first}.upsamples.{4 * int(m[1]) + int(m[2])}.{resnet(m[3])}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{first}.upsamples.{4 * int(m[1]) + 3}.{m[2]}"
    raise ValueError(f"no original Wan VAE name for {key}")


def write_lightvae(path: Path, seed: int) -> None:
    """LightVAE as its file holds it: the original Wan VAE's names, a quarter of the widths."""
    import torch
    from diffusers import AutoencoderKLWan

    from services.inference.wan.vae import LIGHTVAE_BASE_DIM

    torch.manual_seed(seed)
    vae: Any = AutoencoderKLWan(base_dim=LIGHTVAE_BASE_DIM)
    state = {to_original_vae_key(k): v.half() for k, v in vae.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


#: Wan 2.1 1.3B's transformer (diffusers names), for ``--transformer full``: benchmarks on a GPU.
WAN_1_3B = {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30}


def tiny_transformer(seed: int = 0, size: str = "tiny") -> Any:
    import torch

    from services.inference.wan.model import CausalWanTransformer

    torch.manual_seed(seed)
    shape = (
        WAN_1_3B if size == "full" else {"num_attention_heads": 2, "ffn_dim": 512, "num_layers": 2}
    )
    model = CausalWanTransformer(
        patch_size=(1, 2, 2),
        attention_head_dim=128,
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        text_dim=TEXT_DIM,
        freq_dim=256,
        **shape,
    )
    with torch.no_grad():  # random init leaves a zero-output head: give it signal
        model.proj_out.weight.normal_(0.0, 0.02)
    return model


def original_state_dict(model: Any) -> dict[str, Any]:
    return {to_original_key(k): v.detach().clone() for k, v in model.state_dict().items()}


def write_checkpoint(path: Path, state: dict[str, Any], container: str) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    if container == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif container == "generator":
        torch.save({"generator": {f"model.{k}": v for k, v in state.items()}}, path)
    else:
        torch.save(state, path)


def tiny_lora(state: dict[str, Any], rank: int = 4, seed: int = 0) -> dict[str, Any]:
    """A LoRA on every Linear of every attention block, as LongLive's ``lora.pt`` holds it: PEFT
    key names under ``{"generator_lora": …}``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for key, weight in state.items():
        if not (key.startswith("blocks.") and key.endswith(".weight") and weight.ndim == 2):
            continue
        module = f"base_model.model.{key[: -len('.weight')]}"
        out_features, in_features = weight.shape
        lora[f"{module}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * 0.01
        lora[f"{module}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * 0.01
    return {"generator_lora": lora}


def write_tokenizer(out: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for c in string.ascii_lowercase + string.digits + string.punctuation + " ":
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=TEXT_LEN,
    )
    fast.save_pretrained(out)


def make_base(root: Path, seed: int = 1, wan_vae: str = "tiny") -> None:
    import torch
    from diffusers import AutoencoderKLWan
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    root.mkdir(parents=True, exist_ok=True)
    write_tokenizer(root / "tokenizer")
    text_config = UMT5Config(
        vocab_size=128,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    UMT5EncoderModel(text_config).save_pretrained(root / "text_encoder")
    if wan_vae == "full":
        vae: Any = AutoencoderKLWan()  # Wan 2.1's own config
    else:
        vae = AutoencoderKLWan(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae.save_pretrained(root / "vae")
    index = {
        "_class_name": "WanPipeline",
        "_diffusers_version": "0.42.1",
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def write_tae(path: Path, seed: int) -> None:
    """TAEHV's state dict (the original's key names) with random weights, as a ``.pth``."""
    import torch

    from services.inference.wan.tae import TinyAutoencoder

    torch.manual_seed(seed)
    state = {k: v.half() for k, v in TinyAutoencoder().state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def make_all(
    models_dir: Path,
    wan_vae: str = "tiny",
    transformer: str = "tiny",
    pipelines: tuple[str, ...] | None = None,
) -> None:
    """Every file the causal Wan pipelines load; ``transformer="full"`` writes Wan 1.3B-sized
    random transformers (bf16) for ``pipelines`` only (Krea's is the 14B's layout at 1.3B)."""
    import torch

    from services.inference.wan.specs import (
        AUTOENCODERS,
        CHECKPOINTS,
        LIGHTVAE_FILE,
        LORAS,
        TAE_FILES,
    )
    from services.models.store import mark_complete, repo_dir

    make_base(repo_dir(models_dir, WAN_REPO), wan_vae=wan_vae)
    mark_complete(models_dir, WAN_REPO)
    light = repo_dir(models_dir, AUTOENCODERS.repo_id)
    write_lightvae(light / LIGHTVAE_FILE, seed=29)
    for i, (filename, _) in enumerate(sorted(TAE_FILES.values())):
        write_tae(light / filename, seed=30 + i)
    mark_complete(models_dir, AUTOENCODERS.repo_id)
    containers = {
        "streamdiffusionv2": "generator",
        "longlive": "plain",
        "krea-realtime-video": "safetensors",
    }
    for i, (pipeline_id, (repo, filename)) in enumerate(sorted(CHECKPOINTS.items())):
        if pipelines is not None and pipeline_id not in pipelines:
            continue
        model = tiny_transformer(seed=10 + i, size=transformer)
        if transformer == "full":
            model = model.to(torch.bfloat16)
        state = original_state_dict(model)
        write_checkpoint(repo_dir(models_dir, repo) / filename, state, containers[pipeline_id])
        if pipeline_id in LORAS:
            lora_repo, lora_file, _ = LORAS[pipeline_id]
            torch.save(tiny_lora(state, seed=20 + i), repo_dir(models_dir, lora_repo) / lora_file)
        mark_complete(models_dir, repo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="models directory to fill")
    parser.add_argument(
        "--wan-vae",
        choices=["tiny", "full"],
        default="tiny",
        help="the Wan VAE: tiny (tests) or at Wan 2.1's real size (VAE benchmarks)",
    )
    parser.add_argument(
        "--transformer",
        choices=["tiny", "full"],
        default="tiny",
        help="the causal transformers: tiny (tests) or Wan 1.3B-sized (GPU benchmarks)",
    )
    args = parser.parse_args(argv)
    make_all(args.dir, args.wan_vae, args.transformer)
    print(f"tiny causal Wan models written to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
