"""`model.train_mode: state` through `fit`: the state file written, read back with load_state and
trained on, the checkpoint's export equal to it, the weights untouched; and resume after SIGKILL
bit-identical (the harness of test_resume.py)."""

from __future__ import annotations

import subprocess

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import read_state_dict, save_model
from rwkv_infctx.model import RWKV7Config
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.tuning.state import initial_states
from rwkv_infctx.training.tuning.state_files import STATE_KEY
from tests.conftest import random_rwkv7
from tests.reliability.conftest import VOCAB, fit_config, write_config
from tests.reliability.test_resume import ENV, MAX_STEPS, checkpoint_steps, fit_command, run_and_kill


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A random RWKV-7 file (non-zero everywhere, so S0's gradient reaches the loss)."""
    cfg = RWKV7Config(n_layer=2, n_embd=64, vocab_size=VOCAB, wkv_backend="chunked")
    return save_model(random_rwkv7(cfg, seed=4), tmp_path_factory.mktemp("base") / "base.pth", "fp32")


def state_config(root, corpus, base_model, **overrides):
    cfg = fit_config(root, *corpus, "rwkv7", **overrides)
    for dim in ("arch", "n_layer", "n_embd", "vocab_size"):  # all read from the file
        del cfg["model"][dim]
    cfg["model"].update(load_model=str(base_model), train_mode="state", state_lr=0.5)
    cfg["model"].update({k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")})
    return write_config(root / "fit.yaml", cfg)


def states(path) -> list[torch.Tensor]:
    sd = torch.load(path, weights_only=True)
    assert sorted(sd) == [STATE_KEY.format(i) for i in range(2)]
    return [sd[STATE_KEY.format(i)] for i in range(2)]


def test_state_file_round_trip_through_fit(corpus, base_model, run_root):
    first = run_root / "first"
    first.mkdir()
    config = state_config(
        first, corpus, base_model, **{"trainer.max_steps": 3, "model.export": str(first / "s.pth")}
    )
    assert main(["fit", "-c", str(config)]) == 0
    trained = states(first / "s.pth")
    assert all(s.dtype == torch.float32 and s.shape == (1, 64, 64) for s in trained)
    assert all(s.abs().max() > 0 and torch.isfinite(s).all() for s in trained)  # learnt from zeros
    (ckpt,) = first.rglob("*.ckpt")
    base = read_state_dict(base_model)
    in_ckpt = read_state_dict(ckpt)
    assert all(torch.equal(in_ckpt[k], base[k]) for k in base)  # every weight frozen
    assert main(["export", str(ckpt), str(first / "exported.pth")]) == 0
    assert all(torch.equal(a, b) for a, b in zip(states(first / "exported.pth"), trained, strict=True))

    module = RWKVModule(load_model=str(base_model), train_mode="state", load_state=str(first / "s.pth"))
    assert all(torch.equal(a, b) for a, b in zip(initial_states(module.model), trained, strict=True))
    again = run_root / "again"  # trained on: a run that starts from the file
    again.mkdir()
    config = state_config(
        again, corpus, base_model, **{"trainer.max_steps": 2, "model.export": str(again / "s.pth")}
    )
    assert main(["fit", "-c", str(config), "--model.load_state", str(first / "s.pth")]) == 0
    assert not any(torch.equal(a, b) for a, b in zip(states(again / "s.pth"), trained, strict=True))


@pytest.mark.slow
def test_kill_and_resume_in_state_mode_is_bit_identical(corpus, base_model, tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    overrides = {
        "trainer.max_steps": MAX_STEPS,
        "trainer.callbacks": [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"every_n_train_steps": 1, "save_top_k": -1},
            }
        ],
    }
    for root in (straight, broken):
        root.mkdir()
        state_config(root, corpus, base_model, **overrides, **{"model.export": str(root / "final.pth")})
    done = subprocess.run(fit_command(straight / "fit.yaml"), env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    run_and_kill(broken / "fit.yaml", broken, 4)
    assert checkpoint_steps(broken)[-1] < MAX_STEPS
    resumed = subprocess.run(
        fit_command(broken / "fit.yaml", "--ckpt_path", "auto"), env=ENV, capture_output=True
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    a, b = states(straight / "final.pth"), states(broken / "final.pth")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.abs().max() > 0 for x in a)
