"""`--adapter DIR` of `generate` and `eval-positions`: a peft LoRA adapter folder (as written by
`export --adapter_only`) attached to the base model file at run time."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from rwkv_infctx.errors import UserError

NO_ADAPTER = "-"


def add_adapter_argument(parser: argparse.ArgumentParser, per_model: bool = False) -> None:
    if per_model:
        parser.add_argument(
            "--adapter",
            nargs="+",
            metavar="DIR",
            help="peft LoRA adapter folder(s) on top of the models: one for every model, or one per "
            f"model in order ({NO_ADAPTER!r}: none), e.g. `base.pth base.pth --adapter - out/adapter`",
        )
        return
    parser.add_argument(
        "--adapter", type=Path, metavar="DIR", help="peft LoRA adapter folder on top of the model file"
    )


def with_adapter(model: nn.Module, folder: str | Path | None) -> nn.Module:
    """The model with the adapter folder's LoRA layers attached (unchanged for None or '-')."""
    if folder is None or str(folder) == NO_ADAPTER:
        return model
    from rwkv_infctx.training.tuning.lora_files import attach_adapter

    return attach_adapter(model, folder, "--adapter")


def adapters_per_model(adapters: list[str] | None, n_models: int) -> list[str | None]:
    """One adapter (or None) per model: a single --adapter applies to every model."""
    if adapters is None:
        return [None] * n_models
    if len(adapters) == 1:
        return list(adapters) * n_models
    if len(adapters) != n_models:
        raise UserError(
            f"--adapter: {len(adapters)} folders for {n_models} models (expected one, or one per model "
            f"with {NO_ADAPTER!r} for none)"
        )
    return list(adapters)


def with_adapter_name(label: str, folder: str | None) -> str:
    """A model's label with its adapter's folder name appended (`base+adapter`)."""
    return label if folder is None or folder == NO_ADAPTER else f"{label}+{Path(folder).name}"
