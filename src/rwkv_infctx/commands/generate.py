"""`rwkv-infctx generate MODEL --prompt TEXT [--adapter DIR] [--state FILE]`: stream a continuation
(the dragon test)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rwkv_infctx.commands.tuning_options import add_tuning_arguments, choices_per_model, with_additions
from rwkv_infctx.errors import UserError
from rwkv_infctx.generation import generate_text
from rwkv_infctx.io.model_file import load_model
from rwkv_infctx.tokenizer import default_tokenizer, load_tokenizer

DRAGON_PROMPT = (
    "In a shocking finding, scientist discovered a herd of dragons living in a remote, previously "
    "unexplored valley, in Tibet. Even more surprising to the researchers was the fact that the "
    "dragons spoke perfect Chinese."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path, help="RWKV-LM model file (.pth or .safetensors)")
    parser.add_argument("--prompt", default=DRAGON_PROMPT, help="default: the dragon prompt")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="neox, world, or a path to a tokenizer.json (default: world for a 65536-row model, else neox)",
    )
    parser.add_argument("--max_tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    parser.add_argument("--top_p", type=float, default=0.85)
    parser.add_argument("--seed", type=int, default=0)
    add_tuning_arguments(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 0:
        raise UserError(f"--max_tokens {args.max_tokens}: expected a number ≥ 0")
    if not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top_p {args.top_p}: expected a value in (0, 1]")
    (choice,) = choices_per_model(args, 1)
    model = with_additions(load_model(args.model), choice).to(args.device).eval()
    args.tokenizer = args.tokenizer or default_tokenizer(model.cfg.vocab_size)
    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(
            f"--tokenizer {args.tokenizer}: {tokenizer.vocab_size} tokens, but {args.model} has a "
            f"vocabulary of {model.cfg.vocab_size}"
        )
    if not tokenizer.encode(args.prompt):
        raise UserError("--prompt: expected at least one token of text")
    sys.stdout.write(args.prompt)
    sys.stdout.flush()

    def emit(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    generate_text(
        model, tokenizer, args.prompt, args.max_tokens, args.temperature, args.top_p, args.seed, emit
    )
    sys.stdout.write("\n")
    return 0
