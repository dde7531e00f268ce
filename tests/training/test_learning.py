"""Some tens of optimizer steps of segmented full BPTT on real text lower the loss clearly."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.model.init import init_weights
from rwkv_infctx.tokenizer import asset_path, load_tokenizer
from rwkv_infctx.training.optim import OptimConfig, make_optimizer
from rwkv_infctx.training.segments import bptt_step


@pytest.mark.slow
def test_loss_falls_on_tiny_shakespeare():
    torch.manual_seed(0)
    text = asset_path("tinyshakespeare.txt").read_text()[:60_000]
    ids = torch.tensor(load_tokenizer("neox").encode(text))
    T, steps = 256, 24
    model = init_weights(RWKV4(RWKV4Config(n_layer=2, n_embd=64, vocab_size=50277)), seed=0)
    opt = make_optimizer(model, OptimConfig(lr_init=3e-3))
    losses = []
    for step in range(steps):
        start = (step * T) % (len(ids) - T - 1)
        chunk = ids[start : start + T + 1].unsqueeze(0)
        batch = {"input_ids": chunk[:, :-1], "target_ids": chunk[:, 1:], "loss_mask": torch.ones(1, T)}
        proxy, report = bptt_step(model, batch, ctx_len=64)
        proxy.backward()
        opt.step()
        opt.zero_grad()
        losses.append(report.loss)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > 10.0  # ln(50277) ≈ 10.8 at initialisation
    assert last < first - 2.5, losses
