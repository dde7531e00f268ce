"""`rwkv-infctx export-hf MODEL OUTDIR`: a folder that `transformers.RwkvForCausalLM` loads.

Writes `config.json`, `model.safetensors` (HF key names) and, for the neox tokenizer, `tokenizer.json`
with its `tokenizer_config.json`. Transformers has no tokenizer class for the world vocabulary, so
`--tokenizer world` writes the model only and says so. The folder is built under a temporary name and
renamed into place, so an interrupted export never leaves something that looks complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch

from rwkv_infctx.convert.hf import NEOX_TOKENIZER_CONFIG, hf_config_json, to_hf_state_dict
from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import load_model
from rwkv_infctx.model import RWKV4
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.tokenizer import NEOX_FILE, asset_path, load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="RWKV-LM model file (.pth or .safetensors)")
    parser.add_argument("outdir", type=Path, help="folder to create")
    parser.add_argument("--tokenizer", choices=("neox", "world"), default="neox")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--force", action="store_true", help="replace an existing folder")


def export_hf(
    model_path: Path, outdir: Path, tokenizer: str = "neox", dtype: str = "fp32", force: bool = False
):
    """Write the HF folder; returns the list of files written."""
    if outdir.exists() and not force:
        raise UserError(f"output {outdir}: already exists (use --force to replace it)")
    parent = outdir.resolve().parent
    if not parent.is_dir():
        raise UserError(f"output {outdir}: folder {parent} does not exist")
    model = load_model(model_path)
    if not isinstance(model, RWKV4):
        raise UserError(
            f"model file {model_path}: an {family_of(model).title} model; transformers has no class for "
            "it (export-hf writes RWKV-4 models only)"
        )
    vocab = load_tokenizer(tokenizer).vocab_size
    if vocab > model.cfg.vocab_size:
        raise UserError(
            f"--tokenizer {tokenizer}: {vocab} tokens, but {model_path} has a vocabulary of "
            f"{model.cfg.vocab_size}"
        )
    from safetensors.torch import save_file

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", dir=parent))
    except OSError as e:
        raise UserError(f"output {outdir}: cannot write in {parent} ({e.strerror})") from None
    try:
        sd = {k: v.to(DTYPES[dtype]).contiguous() for k, v in to_hf_state_dict(model.state_dict()).items()}
        save_file(sd, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config_json(model.cfg, DTYPE_NAMES[dtype])
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer == "neox":
            shutil.copyfile(asset_path(NEOX_FILE), staging / "tokenizer.json")
            (staging / "tokenizer_config.json").write_text(json.dumps(NEOX_TOKENIZER_CONFIG, indent=2) + "\n")
        if outdir.exists():
            shutil.rmtree(outdir)
        staging.rename(outdir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(p.name for p in outdir.iterdir())


def run(args: argparse.Namespace) -> int:
    files = export_hf(args.model, args.outdir, args.tokenizer, args.dtype, args.force)
    print(f"wrote {args.outdir}: {', '.join(files)}")
    if args.tokenizer == "world":
        print(
            "note: transformers has no tokenizer for the world vocabulary; tokenize with `pyrwkv_tokenizer`"
        )
    return 0
