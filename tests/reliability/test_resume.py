"""Exact resume: a run killed with SIGKILL at a random step, resumed with `ckpt_path: auto`, ends
with weights bit-identical to an uninterrupted run (deterministic CPU settings, dropout on, two
epochs, a checkpoint after every step)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import fit_config, write_config

MAX_STEPS = 9  # 12 samples, batch 2: 6 steps per epoch, so the run crosses an epoch boundary
STEPS_PER_EPOCH = 6
EVERY_STEP = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"every_n_train_steps": 1, "save_top_k": -1},
}


LORA = {"model.train_mode": "lora", "model.lora_r": 4, "model.lora_dropout": 0.1}
"""lora mode: adapters (with their own dropout) on the projections, the norms trained in full too."""


def config_for(root: Path, corpus, family: str, train_mode: str = "full") -> Path:
    mode = {**LORA, "model.lora_train_also": ["ln"]} if train_mode == "lora" else {}
    cfg = fit_config(
        root,
        *corpus,
        family,
        **{
            "trainer.max_steps": MAX_STEPS,
            "trainer.callbacks": [EVERY_STEP],
            "model.export": str(root / "final.pth"),
            "model.export_dtype": "fp32",
            **mode,
        },
    )
    return write_config(root / "fit.yaml", cfg)


def fit_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rwkv_infctx", "fit", "-c", str(config), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def checkpoint_steps(root: Path) -> list[int]:
    return sorted(int(p.stem.split("step=")[1]) for p in root.rglob("*.ckpt") if "step=" in p.stem)


def run_and_kill(config: Path, root: Path, kill_after: int) -> None:
    """Start fit; SIGKILL it as soon as the checkpoint of step `kill_after` exists."""
    proc = subprocess.Popen(fit_command(config), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while kill_after not in checkpoint_steps(root):
            if proc.poll() is not None:
                pytest.fail(f"fit ended before step {kill_after}: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("fit did not reach the kill step in time")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
# RWKV-7 at a random step only: the epoch boundary (the data cursor) is the same for both families
@pytest.mark.parametrize(
    ("family", "where", "train_mode"),
    [
        ("rwkv4", "epoch_end", "full"),
        ("rwkv4", "random_step", "full"),
        ("rwkv7", "random_step", "full"),
        ("rwkv7", "random_step", "lora"),  # the final file is the merged model
    ],
)
def test_kill_and_resume_is_bit_identical(family, where, train_mode, corpus, tmp_path):
    """Killed right after the checkpoint that closes epoch 0, or after a random step's checkpoint."""
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    mid_run = random.Random().randint(2, MAX_STEPS - 2)
    kill_after = STEPS_PER_EPOCH if where == "epoch_end" else mid_run
    print(f"killing after the checkpoint of step {kill_after}")

    done = subprocess.run(
        fit_command(config_for(straight, corpus, family, train_mode)), env=ENV, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    config = config_for(broken, corpus, family, train_mode)
    run_and_kill(config, broken, kill_after)
    assert not (broken / "final.pth").exists()
    resumed = subprocess.run(fit_command(config, "--ckpt_path", "auto"), env=ENV, capture_output=True)
    err = resumed.stderr.decode()
    assert resumed.returncode == 0, err[-2000:]
    assert "ckpt_path auto: resuming from" in err

    a = torch.load(straight / "final.pth", weights_only=True)
    b = torch.load(broken / "final.pth", weights_only=True)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"killed after step {kill_after}: {different}"
