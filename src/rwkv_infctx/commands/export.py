"""`rwkv-infctx export CKPT OUT.pth`: a Lightning checkpoint to an RWKV-LM model file.

The network's weights are taken from the checkpoint's `state_dict` (the `model.` prefix of
`RWKVModule` is stripped), checked against the RWKV-4 layout their shapes imply, and written
atomically as `.pth` (or `.safetensors`) in bf16 or fp32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import check_keys, infer_config, read_state_dict, save_state_dict
from rwkv_infctx.model import RWKV4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ckpt", type=Path, help="Lightning checkpoint (.ckpt) written by `rwkv-infctx fit`")
    parser.add_argument("out", type=Path, help="model file to write (.pth, or .safetensors)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="default: bf16")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")


def run(args: argparse.Namespace) -> int:
    if args.ckpt.is_dir():
        raise UserError(
            f"checkpoint {args.ckpt}: a folder (DeepSpeed checkpoint); not supported yet, "
            "expected a Lightning .ckpt file"
        )
    if args.out.exists() and not args.force:
        raise UserError(f"output {args.out}: already exists (use --force to overwrite)")
    sd = read_state_dict(args.ckpt)
    cfg = infer_config(sd, args.ckpt)
    check_keys(sd, RWKV4(cfg).state_dict(), args.ckpt)
    save_state_dict(sd, args.out, args.dtype)
    print(
        f"wrote {args.out}: RWKV-4 n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
        f"vocab_size={cfg.vocab_size} ({args.dtype})"
    )
    return 0
