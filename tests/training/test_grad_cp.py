"""bptt_step's grad_cp: the model checkpoints its blocks; gradients and dropout masks are unchanged."""

from __future__ import annotations

import torch

from rwkv_infctx.training.segments import bptt_step
from tests.conftest import family_config, random_family_model
from tests.model.test_hidden import count_calls

from .batches import flat_grad, make_batch, rel


def test_grad_cp_with_dropout_gives_the_same_gradients(family):
    cfg = family_config(family, 97, dropout=0.3)
    model = random_family_model(cfg, seed=31, dtype=torch.float64)
    batch = make_batch([64, 50], cfg.vocab_size, seed=32)
    calls = []
    count_calls(model.blocks[1], calls)
    results = []
    for grad_cp in (False, True):
        calls.clear()
        torch.manual_seed(123)
        proxy, report = bptt_step(model, batch, 24, grad_cp=grad_cp)
        proxy.backward()
        results.append((flat_grad(model), report.loss, len(calls)))
    (plain, loss, n_plain), (cp, cp_loss, n_cp) = results
    assert rel(cp, plain) < 1e-12 and cp_loss == loss
    assert n_cp == n_plain + 3  # 3 segments: state pass, recompute, and one checkpoint replay each
