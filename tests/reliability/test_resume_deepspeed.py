"""Resuming from a DeepSpeed checkpoint folder (ZeRO-2, 1 CPU rank, the test-only CPU strategy):
with an explicit `ckpt_path` and with `auto` (in a copied run folder whose mtimes are shuffled), the
run ends at weights bit-identical to an uninterrupted one (AdamW with its sharded moments, warmup and
decay, dropout on, the data cursor and RNG states restored)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.reliability.conftest import fit_config, write_config

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 4
RESUME_AT = 2
CPU_DEEPSPEED = {
    "class_path": "tests.distributed.cpu_deepspeed.CPUDeepSpeedStrategy",
    "init_args": {"stage": 2},
}
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
}


def config_for(root: Path, corpus) -> Path:
    every_step = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": 1, "save_top_k": -1, "dirpath": str(root / "checkpoints")},
    }
    overrides = {
        "trainer.max_steps": MAX_STEPS,
        "trainer.strategy": CPU_DEEPSPEED,
        "trainer.callbacks": [every_step],
        "model.export": str(root / "final.pth"),
        "model.export_dtype": "fp32",
    }
    return write_config(root / "fit.yaml", fit_config(root, *corpus, **overrides))


def fit(config: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rwkv_infctx", "fit", "-c", str(config), *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return err


def steps_saved(root: Path) -> list[int]:
    return sorted(int(p.name.split("step=")[1].split(".")[0]) for p in (root / "checkpoints").iterdir())


@pytest.mark.slow
def test_resume_from_a_deepspeed_folder_is_bit_identical(corpus, tmp_path):
    straight, explicit, auto = (tmp_path / name for name in ("straight", "explicit", "auto"))
    for root in (straight, explicit, auto):
        root.mkdir()
    finish(fit(config_for(straight, corpus)))
    folders = straight / "checkpoints"
    assert all((folders / f"epoch=0-step={s}.ckpt").is_dir() for s in range(1, MAX_STEPS + 1))

    # `auto` in a copy of the run folder up to step 2; the copy's mtimes make step 1 look newest
    (auto / "checkpoints").mkdir()
    for step in (RESUME_AT, 1):
        name = f"epoch=0-step={step}.ckpt"
        shutil.copytree(folders / name, auto / "checkpoints" / name, copy_function=shutil.copyfile)
    os.utime(auto / "checkpoints" / "epoch=0-step=1.ckpt" / "latest")  # now: newer than step 2's

    runs = {
        explicit: fit(
            config_for(explicit, corpus), "--ckpt_path", str(folders / f"epoch=0-step={RESUME_AT}.ckpt")
        ),
        auto: fit(config_for(auto, corpus), "--ckpt_path", "auto"),
    }
    logs = {root: finish(proc) for root, proc in runs.items()}  # the two resumes run side by side
    assert (
        f"resuming from {auto / 'checkpoints' / f'epoch=0-step={RESUME_AT}.ckpt'} (global step 2)"
        in logs[auto]
    )

    reference = torch.load(straight / "final.pth", weights_only=True)
    initial_steps = {explicit: [], auto: [1, RESUME_AT]}
    for root in (explicit, auto):
        # the resumed run trained steps 3 and 4 only (its own checkpoints), and ended where the other did
        assert steps_saved(root) == initial_steps[root] + list(range(RESUME_AT + 1, MAX_STEPS + 1))
        resumed = torch.load(root / "final.pth", weights_only=True)
        assert resumed.keys() == reference.keys()
        different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
        assert different == [], f"{root.name}: {different}"
