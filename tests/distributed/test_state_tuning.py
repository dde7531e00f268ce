"""`model.train_mode: state` under DeepSpeed ZeRO-2 on 2 CPU ranks: S0 takes the SGD steps of one
process on the global batch (exact gradients across ranks and segments), the weights stay as loaded,
and both the end-of-fit export and `export` of the checkpoint folder are the same state file."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.data.collator import collate
from rwkv_infctx.io.model_file import load_model, read_state_dict, save_model
from rwkv_infctx.training.segments import bptt_step
from rwkv_infctx.training.tuning.state import apply_state_tuning, initial_states
from rwkv_infctx.training.tuning.state_files import STATE_KEY
from tests.conftest import family_config, random_family_model
from tests.distributed.test_deepspeed import CTX_LEN, LENGTHS, run_zero2_tuning
from tests.distributed.worker import synthetic_samples
from tests.training.batches import rel

pytest.importorskip("deepspeed")

LR = 1.0


def reference_states(model_path, steps: int = 2) -> list[torch.Tensor]:
    """One process: each step takes both ranks' samples as one batch, then S0 -= LR · grad."""
    model = load_model(model_path)
    apply_state_tuning(model, None)
    samples = synthetic_samples(LENGTHS, model.cfg.vocab_size)
    for step in range(steps):
        proxy, _ = bptt_step(model, collate(samples[2 * step : 2 * step + 2]), CTX_LEN)
        proxy.backward()
        with torch.no_grad():
            for s in initial_states(model):
                s -= LR * s.grad
                s.grad = None
    return [s.detach() for s in initial_states(model)]


@pytest.mark.slow
def test_zero2_state_tuning_trains_exactly_and_exports(tmp_path):
    init_model = save_model(
        random_family_model(family_config("rwkv7", vocab_size=100)), tmp_path / "i.pth", "fp32"
    )
    run_zero2_tuning(tmp_path, init_model, "state", LR)

    trained = [torch.load(tmp_path / f"final_rank{r}.pt") for r in (0, 1)]
    assert all(torch.equal(trained[0][k], trained[1][k]) for k in trained[0]), "ranks disagree"
    initial = read_state_dict(init_model)
    assert all(torch.equal(trained[0][k], v) for k, v in initial.items()), "a frozen weight changed"
    got = [trained[0][f"init_state.wkv.{i}"] for i in range(2)]
    for g, want in zip(got, reference_states(init_model), strict=True):
        assert want.abs().max() > 0 and rel(g, want) <= 1e-4

    out = tmp_path / "state.pth"
    assert main(["export", str(tmp_path / "last.ckpt"), str(out)]) == 0
    for path in (out, tmp_path / "fit_export.pth"):
        sd = torch.load(path, weights_only=True)
        assert sorted(sd) == [STATE_KEY.format(i) for i in range(2)]
        assert all(torch.equal(sd[STATE_KEY.format(i)], g) for i, g in enumerate(got))
