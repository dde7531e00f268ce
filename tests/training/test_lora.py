"""model.train_mode: lora (peft adapters): exact gradients across segments, the merge, what trains.

Oracles: plain autograd over the whole unsegmented sample (`plain_objective`) for the gradients;
the run-time adapted model's logits (peft's forward, unmerged) for the merged weights; counting the
trainable parameters by hand for the optimizer state.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.optim import OptimConfig, make_optimizer
from rwkv_infctx.training.segments import bptt_step
from rwkv_infctx.training.tuning.lora import LoraOptions, apply_lora, is_adapter_key, merged_state_dict
from tests.conftest import family_config, random_family_model

from .batches import make_batch, plain_objective, rel

VOCAB = 97
T = 64  # 4 segments of 16
TOL = 1e-6


def lora_model(family: str, seed: int = 0, **options):
    """The family's tiny random model with rank-4 adapters whose B is random too (peft's B starts at
    zero, which would make every A gradient zero)."""
    model = random_family_model(family_config(family, VOCAB), seed=seed)
    apply_lora(model, LoraOptions(**{"r": 4, "alpha": 8.0, **options}), seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def adapter_grads(model) -> dict[str, torch.Tensor]:
    """The trainable parameters' gradients (cleared); asserts no frozen parameter got one."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = p.grad.clone()
        else:
            assert p.grad is None, name
    model.zero_grad(set_to_none=True)
    return out


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def test_only_adapters_train(family):
    model = lora_model(family)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    per_layer = 7 if family == "rwkv4" else 6  # the family's projections (model/*family.py)
    assert len(trainable) == 2 * per_layer * 2  # A and B, per projection, 2 layers
    assert all(is_adapter_key(n) for n in trainable)


def test_bptt_full_adapter_grads_equal_one_pass(family):
    """A 64-token sample in 4 segments beside a padded 41-token one (batch 2), with and without
    grad_cp, against plain autograd over the whole batch; truncated BPTT must differ."""
    model = lora_model(family, seed=1)
    batch = make_batch([T, 41], VOCAB, seed=2)
    plain_objective(model, batch).backward()
    oracle = adapter_grads(model)
    assert flat(oracle).abs().max() > 0 and all(g.abs().max() > 0 for g in oracle.values())
    for ctx_len, grad_cp in ((T, False), (T // 4, False), (T // 4, True)):  # 1 segment; 4 segments
        proxy, _ = bptt_step(model, batch, ctx_len, bptt="full", grad_cp=grad_cp)
        proxy.backward()
        got = adapter_grads(model)
        assert got.keys() == oracle.keys()
        assert rel(flat(got), flat(oracle)) <= TOL, (ctx_len, grad_cp)
    proxy, _ = bptt_step(model, batch, T // 4, bptt="truncated")
    proxy.backward()
    assert rel(flat(adapter_grads(model)), flat(oracle)) >= 1e-3


def test_train_also_trains_those_in_full(family):
    pattern = "att.x_" if family == "rwkv7" else "att.time_mix"
    model = lora_model(family, seed=1, train_also=("ln", pattern))
    full = {n for n, p in model.named_parameters() if p.requires_grad and not is_adapter_key(n)}
    assert full and all(".ln" in n or n.startswith("ln_") or pattern in n for n in full)
    assert any(n.startswith("ln_out") for n in full)
    batch = make_batch([T], VOCAB, seed=2)
    plain_objective(model, batch).backward()
    oracle = adapter_grads(model)
    proxy, _ = bptt_step(model, batch, T // 4, bptt="full")
    proxy.backward()
    assert rel(flat(adapter_grads(model)), flat(oracle)) <= TOL


@pytest.mark.parametrize("init", ["default", "pissa"])
def test_merged_weights_give_the_adapted_logits(family, init):
    model = lora_model(family, seed=4, init=init)
    tokens = make_batch([40], VOCAB, seed=5)["input_ids"]
    with torch.no_grad():
        adapted, _ = model(tokens)
        plain = random_family_model(family_config(family, VOCAB))
        plain.load_state_dict(merged_state_dict(model))
        merged, _ = plain(tokens)
    assert set(merged_state_dict(model)) == set(plain.state_dict())
    assert rel(merged, adapted) <= 1e-5
    if init == "pissa":  # PiSSA's base is the residual: without the adapters the logits differ
        base = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
        plain.load_state_dict(base)
        with torch.no_grad():
            assert rel(plain(tokens)[0], adapted) > 1e-3


def test_optimizer_state_only_for_adapters(family):
    model = lora_model(family)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < n_train < sum(p.numel() for p in model.parameters()) / 4
    optimizer = make_optimizer(model, OptimConfig(lr_init=1e-3))
    batch = make_batch([T], VOCAB, seed=2)
    proxy, _ = bptt_step(model, batch, 16)
    proxy.backward()
    optimizer.step()
    state_bytes = sum(
        t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim() > 0
    )
    assert state_bytes == 2 * 4 * n_train  # exp_avg and exp_avg_sq, fp32, per trained weight


def test_module_lora_options_refused_in_one_line():
    kw = {"arch": "rwkv7", "n_layer": 2, "n_embd": 64, "vocab_size": VOCAB, "train_mode": "lora"}
    bad = [
        ({"lora_r": 0}, "model.lora_r: 0"),
        ({"lora_targets": ["att.nothing"]}, "model.lora_targets: 'att.nothing'"),
        ({"lora_train_also": ["nothing"]}, "model.lora_train_also: 'nothing'"),
        ({"train_mode": "partial"}, "model.train_mode: 'partial'"),
        ({"lora_init": "pissa", "load_adapter": "x"}, "model.load_adapter: x"),
        ({"train_mode": "full", "load_adapter": "x"}, "model.load_adapter: 'x' is set, but model.train_mode"),
        ({"train_mode": "full", "lora_train_also": ["ln"]}, "model.lora_train_also: ['ln'] is set"),
    ]
    for options, start in bad:
        with pytest.raises(UserError) as e:
            RWKVModule(**{**kw, **options})
        assert str(e.value).startswith(start) and "\n" not in str(e.value)
