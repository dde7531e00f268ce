"""`rwkv-infctx init OUT`: a new RWKV-4 model file with RWKV-LM's v4 initialisation."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.model.init import init_weights
from rwkv_infctx.tokenizer import MODEL_VOCAB


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
    parser.add_argument("--n_layer", type=int, required=True)
    parser.add_argument("--n_embd", type=int, required=True)
    parser.add_argument("--vocab_size", type=parse_vocab_size, required=True, help="neox, world or a number")
    parser.add_argument("--dim_att", type=int, default=None, help="default: n_embd")
    parser.add_argument("--dim_ffn", type=int, default=None, help="default: 4 * n_embd")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UserError(f"output {args.out}: already exists (use --force to overwrite)")
    try:
        cfg = RWKV4Config(args.n_layer, args.n_embd, args.vocab_size, args.dim_att, args.dim_ffn)
    except ValueError as e:
        raise UserError(str(e)) from None
    torch.manual_seed(args.seed)
    model = init_weights(RWKV4(cfg), seed=args.seed)
    save_model(model, args.out, args.dtype)
    print(
        f"wrote {args.out}: RWKV-4, {cfg.n_layer} layers, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, "
        f"{model.num_params() / 1e6:.2f}M parameters, {args.dtype}"
    )
    return 0
