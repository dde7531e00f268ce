"""`ckpt_path: auto` picks the complete checkpoint with the highest global step, whatever the files'
modification times (a copied run folder) or names say; DeepSpeed folders count under DeepSpeed."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.checkpointing import (
    AtomicCheckpointIO,
    checkpoint_candidates,
    latest_checkpoint,
    read_deepspeed_checkpoint,
    resolve_ckpt_path,
)


def ckpt(step: int) -> dict:
    return {"state_dict": {"w": torch.full((3,), float(step))}, "loops": {}, "global_step": step}


def fake_trainer(root: Path, strategy: object = None) -> object:
    return type(
        "Trainer",
        (),
        {"checkpoint_callbacks": [], "loggers": [], "default_root_dir": str(root), "strategy": strategy},
    )()


class DeepSpeedStrategy:  # matched by class name, as `training.distributed.deepspeed_config` does
    def __init__(self) -> None:
        self.config = {"zero_optimization": {"stage": 2}}


def set_mtimes(paths: list[Path], seed: int) -> None:
    """Give `paths` modification times in a shuffled order (as a copy without -t may leave them)."""
    order = list(range(len(paths)))
    random.Random(seed).shuffle(order)
    for path, rank in zip(paths, order, strict=True):
        os.utime(path, ns=(1_700_000_000_000_000_000 + rank * 10**9,) * 2)


@pytest.mark.parametrize("seed", range(4))
def test_auto_takes_the_highest_step_not_the_newest_file(tmp_path, seed):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    # named as a user might: names do not sort by step, and `last.ckpt` holds step 6 as well
    names = {"epoch=0-step=3.ckpt": 3, "epoch=1-step=12.ckpt": 12, "epoch=0-step=6.ckpt": 6, "a.ckpt": 9}
    for name, step in names.items():
        AtomicCheckpointIO().save_checkpoint(ckpt(step), folder / name)
    # the highest step is truncated: it must be skipped, whatever its mtime
    data = (folder / "epoch=1-step=12.ckpt").read_bytes()
    (folder / "epoch=1-step=12.ckpt").write_bytes(data[: len(data) // 2])
    files = sorted(folder.iterdir())
    set_mtimes(files, seed)
    os.utime(folder / "a.ckpt", ns=(1, 1))  # the oldest file of all holds the highest complete step

    assert Path(resolve_ckpt_path("auto", fake_trainer(tmp_path))).name == "a.ckpt"
    # ties on the step: the most recently written wins
    shutil.copyfile(folder / "a.ckpt", folder / "last.ckpt")
    os.utime(folder / "last.ckpt", ns=(2, 2))
    assert Path(resolve_ckpt_path("auto", fake_trainer(tmp_path))).name == "last.ckpt"
    os.utime(folder / "a.ckpt", ns=(3, 3))
    assert Path(resolve_ckpt_path("auto", fake_trainer(tmp_path))).name == "a.ckpt"


def test_auto_after_a_copy_of_the_run_folder(tmp_path):
    """`cp -r` gives every copied file the time of the copy, in the order the copy visits them."""
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    for step in (5, 10, 15):
        AtomicCheckpointIO().save_checkpoint(ckpt(step), run / f"step={step}.ckpt")
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "run", copy, copy_function=shutil.copyfile)  # new mtimes, as cp -r
    set_mtimes(sorted((copy / "checkpoints").iterdir(), reverse=True), seed=0)
    found = latest_checkpoint(checkpoint_candidates(fake_trainer(copy)))
    assert found is not None and found[0].name == "step=15.ckpt" and found[1] == 15


def fake_deepspeed_folder(path: Path, step: int, ranks: int = 2, stage3: bool = False) -> Path:
    """A folder laid out as DeepSpeed's `save_checkpoint` writes it (tag `checkpoint`)."""
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    states = {
        "module": {"w": torch.ones(2)},
        "param_shapes": [{"w": torch.Size([2])}],
        "dp_world_size": ranks,
    }
    states |= {"loops": {}, "global_step": step, "epoch": 0}
    names = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(ranks)] if stage3 else []
    for name in names or ["mp_rank_00_model_states.pt"]:
        torch.save(states, tag / name)
    for r in range(ranks):
        torch.save(
            {"optimizer_state_dict": {"x": torch.zeros(1)}},
            tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )
    (path / "latest").write_text("checkpoint")
    return path


@pytest.mark.parametrize("stage3", [False, True])
def test_deepspeed_folders_complete_or_skipped(tmp_path, stage3):
    folder = tmp_path / "checkpoints"
    complete = fake_deepspeed_folder(folder / "epoch=0-step=4.ckpt", 4, stage3=stage3)
    assert read_deepspeed_checkpoint(complete)["global_step"] == 4
    # a save killed part way: a shard missing, a shard truncated, `latest` not yet written
    missing = fake_deepspeed_folder(folder / "epoch=0-step=6.ckpt", 6, stage3=stage3)
    (missing / "checkpoint" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    truncated = fake_deepspeed_folder(folder / "epoch=0-step=7.ckpt", 7, stage3=stage3)
    shard = truncated / "checkpoint" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[:-30])
    unfinished = fake_deepspeed_folder(folder / "epoch=0-step=8.ckpt", 8, stage3=stage3)
    (unfinished / "latest").unlink()
    for broken in (missing, truncated, unfinished):
        assert read_deepspeed_checkpoint(broken) is None, broken.name
    AtomicCheckpointIO().save_checkpoint(ckpt(9), folder / "plain.ckpt")  # a file: not for DeepSpeed

    trainer = fake_trainer(tmp_path, DeepSpeedStrategy())
    assert Path(resolve_ckpt_path("auto", trainer)) == complete
    assert resolve_ckpt_path(str(complete), trainer) == str(complete)
    with pytest.raises(UserError, match=r"step=6.ckpt: not a complete DeepSpeed checkpoint folder"):
        resolve_ckpt_path(str(missing), trainer)
    with pytest.raises(UserError, match=r"plain.ckpt: a checkpoint file, but trainer.strategy is DeepSpeed"):
        resolve_ckpt_path(str(folder / "plain.ckpt"), trainer)
    # without DeepSpeed the folders are not candidates, and naming one is a one-line error
    assert Path(resolve_ckpt_path("auto", fake_trainer(tmp_path))).name == "plain.ckpt"
    with pytest.raises(UserError, match=r"step=4.ckpt: a folder .* not DeepSpeed"):
        resolve_ckpt_path(str(complete), fake_trainer(tmp_path))
