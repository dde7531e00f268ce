"""Parameter groups (weight decay on matrices, layerwise lr) and the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.training.optim import OptimConfig, lr_at, make_optimizer, make_scheduler, param_groups
from tests.conftest import random_model

CFG = RWKV4Config(n_layer=2, n_embd=16, vocab_size=50)


def test_weight_decay_only_on_matrices_and_layerwise_rates():
    model = random_model(CFG)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, OptimConfig(weight_decay=0.1, lr_init=1.0))
    seen = 0
    for g in groups:
        for p in g["params"]:
            name = names[id(p)]
            seen += 1
            assert g["weight_decay"] == (0.1 if p.squeeze().dim() >= 2 else 0.0), name
            scale = 2.0 if name.endswith("time_decay") else 3.0 if name.endswith("time_first") else 1.0
            assert g["lr"] == scale, name
    assert seen == len(list(model.parameters()))
    flat = param_groups(model, OptimConfig(layerwise_lr=False))
    assert {g["lr_scale"] for g in flat} == {1.0}


def test_sgd_is_plain_gradient_descent():
    model = random_model(CFG)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt = make_optimizer(model, OptimConfig(optimizer="sgd", lr_init=0.5, layerwise_lr=False))
    opt.step()
    for b, p in zip(before, model.parameters(), strict=True):
        assert torch.allclose(p, b - 0.5)


def test_schedule_warmup_then_decay_to_lr_final():
    base = {"lr_init": 1e-3, "lr_final": 1e-5, "warmup_steps": 10}
    for decay in ("cosine", "linear", "exponential"):
        cfg = OptimConfig(lr_decay=decay, **base)
        assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
        assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
        assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
        assert lr_at(110, cfg, 110) == pytest.approx(1e-5)
        assert lr_at(500, cfg, 110) == pytest.approx(1e-5)
    mid = {d: lr_at(60, OptimConfig(lr_decay=d, **base), 110) for d in ("cosine", "linear", "exponential")}
    assert mid["linear"] == pytest.approx((1e-3 + 1e-5) / 2)
    assert mid["cosine"] == pytest.approx((1e-3 + 1e-5) / 2)
    assert mid["exponential"] == pytest.approx(math.sqrt(1e-3 * 1e-5))
    assert lr_at(1000, OptimConfig(**base), float("inf")) == 1e-3  # unknown length: constant


def test_scheduler_keeps_layerwise_scales():
    model = random_model(CFG)
    cfg = OptimConfig(lr_init=1e-3, lr_final=1e-4, lr_decay="linear")
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["lr_scale"] * lr_at(5, cfg, 10))


@pytest.mark.parametrize(
    "bad", [{"lr_init": -1.0}, {"warmup_steps": -1}, {"lr_decay": "exponential", "lr_final": 0.0}]
)
def test_bad_optimizer_options(bad):
    with pytest.raises(UserError):
        OptimConfig(**bad)
