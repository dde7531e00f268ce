"""`export` of a checkpoint trained with `model.train_mode: lora`: the merged RWKV-LM model file, or
(`--adapter_only`) the adapter alone as a peft adapter folder.

The LoRA options (rank, alpha, targets, ...) come from the checkpoint's saved hyperparameters:
Lightning keeps them in the `.ckpt` file, and in a DeepSpeed folder's `mp_rank_00_model_states.pt`.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import model_from_state_dict, save_state_dict
from rwkv_infctx.model.registry import family_of
from rwkv_infctx.training.tuning.lora import base_state_dict, has_adapters, merged_state_dict
from rwkv_infctx.training.tuning.lora_files import model_with_adapters, options_from_hparams, save_adapter


def run_lora_export(args: argparse.Namespace, sd: dict[str, Tensor]) -> int:
    """Write the merged model (or, with --adapter_only, the adapter folder) of a lora checkpoint."""
    if not has_adapters(sd):
        raise UserError(
            f"checkpoint {args.ckpt}: no LoRA adapter weights (--adapter_only expects a checkpoint "
            "trained with model.train_mode: lora)"
        )
    hparams = checkpoint_hparams(args.ckpt)
    if hparams.get("train_mode") != "lora":
        raise UserError(
            f"checkpoint {args.ckpt}: holds LoRA weights but its model.train_mode is "
            f"{hparams.get('train_mode')!r} (expected a checkpoint written by fit in lora mode)"
        )
    options = options_from_hparams(hparams)
    model = model_with_adapters(model_from_state_dict(base_state_dict(sd), args.ckpt), sd, options, args.ckpt)
    title = family_of(model).title
    if args.adapter_only:
        _check_adapter_only(args.ckpt, options)
        save_adapter(model, args.out, replace=args.force)
        print(f"wrote {args.out}: peft LoRA adapter, {title} (r={options.r} alpha={options.alpha})")
        return 0
    cfg = model.cfg
    save_state_dict(merged_state_dict(model), args.out, args.dtype)
    print(
        f"wrote {args.out}: {title} n_layer={cfg.n_layer} n_embd={cfg.n_embd} vocab_size={cfg.vocab_size} "
        f"({args.dtype}, LoRA adapters merged)"
    )
    return 0


def _check_adapter_only(ckpt: Path, options) -> None:
    """An adapter folder holds only LoRA factors that apply to the original base weights."""
    if options.init == "pissa":
        raise UserError(
            f"checkpoint {ckpt}: trained with lora_init: pissa, whose adapter applies to the residual of "
            "the base weights, not to the released model; export the merged model instead (no --adapter_only)"
        )
    if options.train_also:
        raise UserError(
            f"checkpoint {ckpt}: lora_train_also {list(options.train_also)} trained base weights that a peft "
            "adapter folder cannot hold; export the merged model instead (no --adapter_only)"
        )


def checkpoint_hparams(ckpt: Path) -> dict[str, Any]:
    """The `RWKVModule` hyperparameters saved in a Lightning checkpoint file or DeepSpeed folder."""
    if ckpt.is_dir():
        latest = ckpt / "latest"
        tag = latest.read_text().strip() if latest.is_file() else "*"
        files = sorted(ckpt.glob(f"{tag}/mp_rank_00_model_states.pt"))
        if not files:
            raise UserError(f"checkpoint {ckpt}: no mp_rank_00_model_states.pt (expected a DeepSpeed folder)")
        path = files[0]
        # DeepSpeed's own reader of this folder (zero_to_fp32) unpickles it in full as well
        obj = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    else:
        path = ckpt
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError) as e:
            raise UserError(f"checkpoint {ckpt}: its hyperparameters are unreadable ({e})") from None
    hparams = obj.get("hyper_parameters") if isinstance(obj, dict) else None
    if not isinstance(hparams, dict):
        raise UserError(
            f"checkpoint {path}: no saved hyperparameters (expected a checkpoint written by rwkv-infctx fit)"
        )
    return dict(hparams)
