"""`--state FILE` of `generate` and `eval-positions`: a state file (as `export` writes it for a
checkpoint of `model.train_mode: state`) that the base RWKV-7 model starts every sequence from."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from rwkv_infctx.errors import UserError

NO_STATE = "-"


def add_state_argument(parser: argparse.ArgumentParser, per_model: bool = False) -> None:
    if per_model:
        parser.add_argument(
            "--state",
            nargs="+",
            metavar="FILE",
            help="RWKV-7 state file(s) to start from: one for every model, or one per model in order "
            f"({NO_STATE!r}: none), e.g. `base.pth base.pth --state - out/state.pth`",
        )
        return
    parser.add_argument("--state", type=Path, metavar="FILE", help="RWKV-7 state file to start from")


def with_state(model: nn.Module, path: str | Path | None) -> nn.Module:
    """The model with the state file's initial states attached (unchanged for None or '-')."""
    if path is None or str(path) == NO_STATE:
        return model
    from rwkv_infctx.training.tuning.state import attach_initial_state

    return attach_initial_state(model, path, "--state")


def states_per_model(states: list[str] | None, n_models: int) -> list[str | None]:
    """One state file (or None) per model: a single --state applies to every model."""
    if states is None:
        return [None] * n_models
    if len(states) == 1:
        return list(states) * n_models
    if len(states) != n_models:
        raise UserError(
            f"--state: {len(states)} files for {n_models} models (expected one, or one per model with "
            f"{NO_STATE!r} for none)"
        )
    return list(states)


def with_state_name(label: str, path: str | None) -> str:
    """A model's label with its state file's name appended (`base+state`)."""
    return label if path is None or path == NO_STATE else f"{label}+{Path(path).stem}"
