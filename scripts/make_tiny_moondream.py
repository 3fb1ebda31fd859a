"""Write a tiny random-weight Moondream 2 in the layout ``download_models`` leaves.

``python scripts/make_tiny_moondream.py DIR [--code CODE_DIR]`` fills DIR (a dreamwire models
directory) with:

* ``DIR/vikhyatk/moondream2/``: Moondream's own model code, copied from CODE_DIR (by default
  ``../shared/artifacts/moondream2-torch`` beside this checkout; or a downloaded repository
  folder), a ``config.json`` in the release's shape whose ``config`` object gives tiny sizes, and
  ``model.safetensors`` with every key of the model that code builds (bfloat16, as released);
* ``DIR/moondream/starmie-v1/tokenizer.json``: a byte-level BPE tokenizer of 1,024 tokens (the
  real one has 51,200), trained here on a fixed text.

The sizes respect the code's hard limits: a text head size of 64 (its rotary embedding), a
context of 2,048, 27 vision layers (the layer count is also the 27×27 patch grid), the region
and projection widths equal to the text width; the prompt templates are re-numbered into the
tiny vocabulary. About 0.9 M parameters: building takes under a second, a call a fraction of one.
The weights are drawn from a seeded rule per key, so the files are the same on every run.
Both repositories get the downloader's completion marker.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CODE = ROOT.parent / "shared" / "artifacts" / "moondream2-torch"
VOCAB = 1024
#: Token ids below this are special (bos/eos 0, answer 3, thinking 4, coord 5, size 6, …).
SPECIAL_TOKENS = 16

TINY_SIZES: dict[str, Any] = {
    "text": {
        "dim": 128,
        "ff_dim": 256,
        "n_layers": 2,
        "vocab_size": VOCAB,
        "max_context": 2048,
        "n_heads": 2,
        "n_kv_heads": 2,
    },
    "vision": {
        "enc_dim": 32,
        "enc_patch_size": 14,
        "enc_n_layers": 27,
        "enc_ff_dim": 64,
        "enc_n_heads": 2,
        "proj_out_dim": 128,
        "crop_size": 378,
        "max_crops": 12,
        "overlap_margin": 4,
        "proj_inner_dim": 256,
    },
    "region": {
        "dim": 128,
        "coord_feat_dim": 64,
        "coord_out_dim": 1024,
        "size_feat_dim": 64,
        "size_out_dim": 2048,
        "inner_dim": 256,
    },
    # Moondream's templates use ids of its 51,200-token vocabulary: the same roles, renumbered.
    "tokenizer": {
        "templates": {
            "caption": {
                "short": [1, 700, 2, 701, 3],
                "normal": [1, 700, 2, 702, 3],
                "long": [1, 700, 2, 703, 3],
            },
            "query": {"prefix": [1, 704, 2], "suffix": [3]},
            "detect": {"prefix": [1, 705, 706, 2], "suffix": [3]},
            "point": {"prefix": [1, 707, 2], "suffix": [3]},
        }
    },
}

#: config.json as the release has it, with the sizes in its ``config`` object.
CONFIG_JSON: dict[str, Any] = {
    "architectures": ["HfMoondream"],
    "auto_map": {
        "AutoConfig": "hf_moondream.HfConfig",
        "AutoModelForCausalLM": "hf_moondream.HfMoondream",
    },
    "config": TINY_SIZES,
    "model_type": "moondream1",
    "torch_dtype": "bfloat16",
}

CORPUS_TEXT = (
    "a an the person people man woman child dog cat car bus bicycle tree house street road sky "
    "cloud sun water river sea boat window door table chair cup bottle phone laptop screen book "
    "face hand hair shirt red green blue yellow black white orange purple brown grey large small "
    "sitting standing walking running holding looking wearing in on at with near behind under "
    "image photo shows there is are of and to background foreground left right top bottom "
    "what where how many who which this that it its one two three several some light dark"
)


def corpus(lines: int = 4000) -> list[str]:
    """A fixed text: English words and made-up ones (enough pairs for 1,024 tokens), in an
    order drawn by a linear congruential generator, so every run trains the same tokenizer."""
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    vocabulary = CORPUS_TEXT.split()
    state, out = 12345, []

    def draw(n: int) -> int:
        nonlocal state
        state = (state * 1103515245 + 12345) % 2**31
        return (state >> 8) % n

    for _ in range(lines):
        words = []
        for _ in range(12):
            if draw(3):
                words.append(vocabulary[draw(len(vocabulary))])
            else:
                words.append("".join(syllables[draw(len(syllables))] for _ in range(1 + draw(3))))
        out.append(" ".join(words) + ".")
    return out


def write_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] + [f"<|md_reserved_{i}|>" for i in range(1, SPECIAL_TOKENS)]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    tok.save(str(path))
    return path


def recipe_weight(key: str, shape: tuple[int, ...]) -> Any:
    """A seeded tensor per key: unit-variance activations through every layer."""
    import torch

    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    r = torch.randn(shape, generator=gen, dtype=torch.float32)
    if key.endswith(("coord_features", "size_features")):
        return r  # Fourier frequencies
    if key.endswith(("pos_emb", "wte")):
        return r * 0.5
    if len(shape) >= 2:
        return r / math.sqrt(shape[-1])
    if key.endswith(".weight"):  # layer norms
        return 1.0 + 0.1 * r
    return 0.05 * r


def write_repository(models_dir: Path, code_dir: Path, sizes: dict[str, Any]) -> Path:
    """The model code, a ``config.json`` with ``sizes`` (empty: the release's own) and the
    tokenizer, where ``download_models`` puts them; returns the model repository's folder."""
    from services.models.store import repo_dir
    from services.overlay import moondream as md

    repo = repo_dir(models_dir, md.MOONDREAM_REPO)
    repo.mkdir(parents=True, exist_ok=True)
    sources = sorted(code_dir.glob("*.py"))
    if not any(p.name == f"{md.ENTRY_MODULE}.py" for p in sources):
        raise SystemExit(f"{code_dir} holds no {md.ENTRY_MODULE}.py: not Moondream's model code")
    for path in [*sources, code_dir / "LICENSE"]:
        if path.is_file():
            shutil.copy2(path, repo / path.name)
    config = {**CONFIG_JSON, "config": sizes}
    (repo / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(repo_dir(models_dir, md.TOKENIZER_REPO))
    return repo


def tokenizer_path(models_dir: Path) -> Path:
    from services.models.store import repo_dir
    from services.overlay import moondream as md

    return repo_dir(models_dir, md.TOKENIZER_REPO) / "tokenizer.json"


def make_moondream(models_dir: Path, code_dir: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from services.models.store import mark_complete
    from services.overlay import moondream as md

    repo = write_repository(models_dir, code_dir, TINY_SIZES)
    model = md.build_model(repo, tokenizer_path(models_dir), "cpu", "tiny")
    state = {
        key: recipe_weight(key, tuple(value.shape)).to(torch.bfloat16).contiguous()
        for key, value in model.state_dict().items()
    }
    save_file(state, str(repo / md.WEIGHTS_FILE), metadata={"format": "pt"})
    for name in (md.MOONDREAM_REPO, md.TOKENIZER_REPO):
        mark_complete(models_dir, name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="models directory to fill")
    parser.add_argument(
        "--code", type=Path, default=DEFAULT_CODE, help="folder with Moondream's model code"
    )
    args = parser.parse_args(argv)
    make_moondream(args.dir, args.code)
    print(f"tiny Moondream 2 written to {args.dir}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
