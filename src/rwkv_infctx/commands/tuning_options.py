"""`--adapter DIR` and `--state FILE` of `generate` and `eval-positions`: what a tuning run exported,
put on top of a base model file at run time.

An adapter is a peft LoRA folder (`export --adapter_only`, `training/tuning/lora_files.py`); a state
is an RWKV-7 state file (`export` of a state-mode checkpoint, `training/tuning/state.py`).
`eval-positions` takes one of each for every model, or one per model with `-` for none.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from rwkv_infctx.errors import UserError

NONE = "-"


def _attach_adapter(model: nn.Module, path: str) -> nn.Module:
    from rwkv_infctx.training.tuning.lora_files import attach_adapter

    return attach_adapter(model, path, "--adapter")


def _attach_state(model: nn.Module, path: str) -> nn.Module:
    from rwkv_infctx.training.tuning.state import attach_initial_state

    return attach_initial_state(model, path, "--state")


@dataclass(frozen=True)
class Addition:
    """One run-time addition: its option name, what it is, and how it is attached to a model."""

    option: str
    metavar: str
    what: str
    noun: str
    attach: Callable[[nn.Module, str], nn.Module]
    short_name: Callable[[Path], str]


ADDITIONS = (
    Addition("adapter", "DIR", "peft LoRA adapter folder", "folders", _attach_adapter, lambda p: p.name),
    Addition("state", "FILE", "RWKV-7 state file to start from", "files", _attach_state, lambda p: p.stem),
)

Choice = dict[str, str | None]
"""One model's additions: option name → path, or None."""


def add_tuning_arguments(parser: argparse.ArgumentParser, per_model: bool = False) -> None:
    """`--adapter` and `--state`: one path each, or (`per_model`) one for every model or one per model."""
    for a in ADDITIONS:
        if per_model:
            example = f"`base.pth base.pth --{a.option} {NONE} out/{a.option}`"
            help_ = f"{a.what}(s): one for every model, or one per model in order ({NONE!r}: none), "
            parser.add_argument(f"--{a.option}", nargs="+", metavar=a.metavar, help=help_ + f"e.g. {example}")
        else:
            help_ = f"{a.what}, on top of the model file"
            parser.add_argument(f"--{a.option}", metavar=a.metavar, help=help_)


def choices_per_model(args: argparse.Namespace, n_models: int) -> list[Choice]:
    """Each model's additions; a single path of an option applies to every model."""
    per_option: dict[str, list[str | None]] = {}
    for a in ADDITIONS:
        given = getattr(args, a.option)
        paths = [given] if isinstance(given, str | Path) else given
        if paths is None:
            paths = [None]
        if len(paths) == 1:
            paths = list(paths) * n_models
        if len(paths) != n_models:
            raise UserError(
                f"--{a.option}: {len(paths)} {a.noun} for {n_models} models (expected one, or one per "
                f"model with {NONE!r} for none)"
            )
        per_option[a.option] = [None if p is None or str(p) == NONE else str(p) for p in paths]
    return [{o: per_option[o][i] for o in per_option} for i in range(n_models)]


def with_additions(model: nn.Module, choice: Choice) -> nn.Module:
    """The model with the chosen adapter and state attached (unchanged when none is chosen)."""
    for a in ADDITIONS:
        if choice.get(a.option) is not None:
            model = a.attach(model, choice[a.option])
    return model


def labelled(label: str, choice: Choice) -> str:
    """A model's label with its additions' names appended (`base+adapter`, `base+state`)."""
    for a in ADDITIONS:
        if choice.get(a.option) is not None:
            label = f"{label}+{a.short_name(Path(choice[a.option]))}"
    return label
