"""NaN guard: a non-finite loss stops training naming the step and samples (stop), or the step is
skipped and counted (skip); no checkpoint is written for a non-finite step."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV7Config
from rwkv_infctx.training.checkpointing import read_checkpoint
from tests.conftest import random_rwkv7
from tests.reliability.conftest import VOCAB, fit_config, write_config

BAD_STEP = 2


class InjectNaN(pl.Callback):
    """Makes the logits (so the loss and every gradient) NaN during the micro-batch of global step `step`."""

    def __init__(self, step: int = BAD_STEP) -> None:
        self.step = step
        self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self._hook = pl_module.model.head.register_forward_hook(lambda m, i, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_batch_end(trainer, pl_module, None, None, 0)


def nan_config(root, corpus, policy: str, family: str):
    callbacks = [
        {"class_path": "tests.reliability.test_nan_guard.InjectNaN"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 1, "save_top_k": -1},
        },
    ]
    cfg = fit_config(root, *corpus, family, **{"trainer.callbacks": callbacks, "model.nan_policy": policy})
    return write_config(root / f"{policy}.yaml", cfg)


def steps(root) -> list[int]:
    return sorted(int(p.stem.split("step=")[1]) for p in root.rglob("*.ckpt"))


def test_stop_names_step_and_samples_and_keeps_last_checkpoint(family, corpus, run_root, capsys):
    assert main(["fit", "-c", str(nan_config(run_root, corpus, "stop", family))]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "non-finite loss at global step 2 (samples " in line and "nan_policy: skip" in line
    assert steps(run_root) == [1, 2]  # nothing after the bad step
    last = read_checkpoint(max(run_root.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns))
    assert last is not None and last["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not list(run_root.rglob(".*.tmp"))


def test_skip_counts_and_goes_on(family, corpus, run_root):
    assert main(["fit", "-c", str(nan_config(run_root, corpus, "skip", family))]) == 0
    assert steps(run_root) == [1, 2, 3, 4]
    ckpt = read_checkpoint(next(p for p in run_root.rglob("*.ckpt") if "step=4" in p.name))
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    assert ckpt["callbacks"]["NanGuard"] == {"skipped": 1}
    before, after = (read_checkpoint(next(run_root.rglob(f"*step={s}.ckpt"))) for s in (2, 3))
    for key, value in before["state_dict"].items():  # the skipped step changed nothing
        assert torch.equal(value, after["state_dict"][key]), key
    moments = [
        (before["optimizer_states"][0]["state"][i], after["optimizer_states"][0]["state"][i]) for i in (0, 1)
    ]
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) for a, b in moments)
    rows = list(csv.DictReader(next(run_root.rglob("metrics.csv")).open()))
    assert {float(r["nan_skips"]) for r in rows if r.get("nan_skips")} == {1.0}


@pytest.mark.parametrize("mode", ["lora", "state"])
def test_skip_in_tuning_modes(mode, corpus, run_root):
    """The NaN policy with frozen weights: only what trains has gradients; the bad step is skipped
    and changes nothing, later steps train on."""
    tuning = {"model.train_mode": mode, **({"model.lora_r": 4} if mode == "lora" else {})}
    callbacks = [
        {"class_path": "tests.reliability.test_nan_guard.InjectNaN"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": 1, "save_top_k": -1},
        },
    ]
    base = run_root / "base.pth"  # a random model: from scratch, zero output matrices hide S0's gradient
    save_model(random_rwkv7(RWKV7Config(n_layer=2, n_embd=64, vocab_size=VOCAB)), base, "fp32")
    extra = {
        "trainer.callbacks": callbacks,
        "model.nan_policy": "skip",
        "model.load_model": str(base),
        **tuning,
    }
    cfg = write_config(run_root / f"{mode}.yaml", fit_config(run_root, *corpus, "rwkv7", **extra))
    assert main(["fit", "-c", str(cfg)]) == 0
    assert steps(run_root) == [1, 2, 3, 4]
    ckpts = {s: read_checkpoint(next(run_root.rglob(f"*step={s}.ckpt"))) for s in (2, 3, 4)}
    assert ckpts[4]["callbacks"]["NanGuard"] == {"skipped": 1}
    trained = "init_state." if mode == "state" else ".lora_"
    keys = [k for k in ckpts[2]["state_dict"] if trained in k]
    assert keys
    for key, value in ckpts[2]["state_dict"].items():  # the skipped step changed nothing
        assert torch.equal(value, ckpts[3]["state_dict"][key]), key
    assert any(not torch.equal(ckpts[3]["state_dict"][k], ckpts[4]["state_dict"][k]) for k in keys)
