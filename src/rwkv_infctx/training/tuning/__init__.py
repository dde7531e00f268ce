"""What `fit` trains (`model.train_mode`): every weight, LoRA adapters, or RWKV-7's initial states."""

from __future__ import annotations

from typing import Literal

from rwkv_infctx.errors import UserError

TrainMode = Literal["full", "lora", "state"]
TRAIN_MODES = ("full", "lora", "state")


def check_train_mode(mode: str, family_name: str) -> None:
    """One-line UserError for an unknown mode, or for state tuning on a family without WKV-7 states."""
    if mode not in TRAIN_MODES:
        raise UserError(f"model.train_mode: {mode!r} (expected full, lora or state)")
    if mode == "state" and family_name != "rwkv7":
        raise UserError(f"model.train_mode: state needs an RWKV-7 model (this model is {family_name})")
