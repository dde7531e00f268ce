"""`rwkv-infctx export CKPT OUT.pth`: a Lightning checkpoint to an RWKV-LM model file.

The network's weights are taken from the checkpoint's `state_dict` (the `model.` prefix of
`RWKVModule` is stripped), checked against the layout of their family (RWKV-4 or RWKV-7, detected
from the keys), and written atomically as `.pth` (or `.safetensors`) in bf16 or fp32.

A DeepSpeed checkpoint is a folder (one file per rank under ZeRO); DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` consolidates its shards into full fp32 weights.

A checkpoint of `model.train_mode: lora` is written merged, or with `--adapter_only` as the adapter
alone in peft's folder format (`commands.export_lora`).
A checkpoint of `model.train_mode: state` is written as a state file (`commands.export_state`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import Tensor

from rwkv_infctx.commands.export_lora import run_lora_export
from rwkv_infctx.commands.export_state import run_state_export
from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import (
    _strip_prefixes,
    model_from_state_dict,
    read_state_dict,
    save_state_dict,
)
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.training.tuning.lora import has_adapters
from rwkv_infctx.training.tuning.state import checkpoint_states


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "ckpt", type=Path, help="checkpoint written by `rwkv-infctx fit`: a .ckpt file or a DeepSpeed folder"
    )
    parser.add_argument(
        "out",
        type=Path,
        help="model file to write (.pth, or .safetensors); with --adapter_only a folder; of a "
        "state-mode checkpoint a state .pth",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="default: bf16")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.add_argument(
        "--adapter_only",
        action="store_true",
        help="a checkpoint of train_mode lora: write its adapter alone as a peft folder "
        "(adapter_model.safetensors + adapter_config.json) instead of the merged model",
    )


def run(args: argparse.Namespace) -> int:
    if args.out.exists() and not args.force:
        raise UserError(f"output {args.out}: already exists (use --force to overwrite)")
    sd = read_deepspeed_checkpoint(args.ckpt) if args.ckpt.is_dir() else read_state_dict(args.ckpt)
    states = checkpoint_states(sd)
    if states is not None and not args.adapter_only:
        return run_state_export(args, states)
    if args.adapter_only or has_adapters(sd):
        return run_lora_export(args, sd)
    model = model_from_state_dict(sd, args.ckpt)  # checks the keys and shapes of its family
    cfg = model.cfg
    save_state_dict(model.state_dict(), args.out, args.dtype)
    print(
        f"wrote {args.out}: {family_of(model).title} n_layer={cfg.n_layer} n_embd={cfg.n_embd} "
        f"vocab_size={cfg.vocab_size} ({args.dtype})"
    )
    return 0


def read_deepspeed_checkpoint(folder: Path) -> dict[str, Tensor]:
    """Full fp32 weights of a DeepSpeed checkpoint folder (ZeRO 1–3 shards merged by DeepSpeed)."""
    if not (folder / "latest").is_file() and not any(folder.glob("*/*model_states.pt")):
        raise UserError(
            f"checkpoint {folder}: a folder, but not a DeepSpeed checkpoint (no 'latest' file or "
            "*model_states.pt); expected a Lightning .ckpt file or a DeepSpeed checkpoint folder"
        )
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(
            f"checkpoint {folder}: a DeepSpeed checkpoint; install deepspeed to read it "
            "(pip install 'rwkv-infctx[deepspeed]')"
        ) from None
    try:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(folder))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint {folder}: not a readable DeepSpeed checkpoint ({e})") from None
    return _strip_prefixes({k: v.float() for k, v in sd.items()}, folder)
