"""`rwkv-infctx init OUT --arch rwkv4|rwkv7`: a new model file with RWKV-LM's initialisation."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model.registry import FAMILIES, family_named
from rwkv_infctx.tokenizer import MODEL_VOCAB

FAMILY_DIMS = {
    "dim_att": "RWKV-4: time-mix width (default n_embd)",
    "dim_ffn": "channel-mix hidden width (default 4 * n_embd)",
    "head_size": "RWKV-7: head size (default 64, as every released model)",
    "d_decay_lora": "RWKV-7: decay LoRA dim (default: the released model's of that n_embd, else "
    "RWKV-LM's formula)",
    "d_aaa_lora": "RWKV-7: in-context learning rate LoRA dim (default as d_decay_lora)",
    "d_mv_lora": "RWKV-7: value-residual LoRA dim (default as d_decay_lora)",
    "d_gate_lora": "RWKV-7: gate LoRA dim (default as d_decay_lora)",
}


def parse_vocab_size(value: str) -> int:
    """`neox`, `world`, or a positive integer."""
    if value in MODEL_VOCAB:
        return MODEL_VOCAB[value]
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{value!r}: expected neox, world or a positive integer")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", type=Path, help="model file to write (.pth, or .safetensors)")
    parser.add_argument("--arch", choices=tuple(FAMILIES), required=True, help="model family")
    parser.add_argument("--n_layer", type=int, required=True)
    parser.add_argument("--n_embd", type=int, required=True)
    parser.add_argument("--vocab_size", type=parse_vocab_size, required=True, help="neox, world or a number")
    for name, help_text in FAMILY_DIMS.items():
        parser.add_argument(f"--{name}", type=int, default=None, help=help_text)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UserError(f"output {args.out}: already exists (use --force to overwrite)")
    family = family_named(args.arch, "--arch")
    dims = {"n_layer": args.n_layer, "n_embd": args.n_embd, "vocab_size": args.vocab_size}
    for name in FAMILY_DIMS:
        value = getattr(args, name)
        if value is not None and name not in family.dim_names:
            raise UserError(
                f"--{name} {value}: not a setting of {family.title} (its dims: {', '.join(family.dim_names)})"
            )
        if value is not None:
            dims[name] = value
    try:
        cfg = family.config_cls(**dims)
    except ValueError as e:
        raise UserError(str(e)) from None
    torch.manual_seed(args.seed)
    model = family.init_weights(family.model_cls(cfg), args.seed)
    save_model(model, args.out, args.dtype)
    print(
        f"wrote {args.out}: {family.title}, {cfg.n_layer} layers, n_embd {cfg.n_embd}, "
        f"vocab {cfg.vocab_size}, {model.num_params() / 1e6:.2f}M parameters, {args.dtype}"
    )
    return 0
