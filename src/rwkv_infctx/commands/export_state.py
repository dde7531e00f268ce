"""`export` of a checkpoint trained with `model.train_mode: state`: its initial states as a state
file (`training/tuning/state_files.py`); the weights were frozen, so the base model file stays valid."""

from __future__ import annotations

import argparse

from torch import Tensor

from rwkv_infctx.training.tuning.state_files import check_state_file_name, save_state_file


def run_state_export(args: argparse.Namespace, states: list[Tensor]) -> int:
    """Write the checkpoint's S0 (one (H, N, N) tensor per layer) to args.out, fp32 whatever --dtype."""
    check_state_file_name(args.out, "output")
    save_state_file(states, args.out)
    H, N, _ = states[0].shape
    print(
        f"wrote {args.out}: RWKV-7 state file, {len(states)} layers of blocks.i.att.time_state "
        f"({H}, {N}, {N}) fp32 (use it with generate/eval-positions --state on the base model file)"
    )
    return 0
