"""The analytic forward FLOPs (model/rwkv4_flops.py) against what torch and Lightning measure.

- The matmul part: torch's FlopCounterMode over a real forward measures exactly
  ctx_len × matmul_flops_per_token (it counts matrix products only).
- The WKV part: WKV_OPS_PER_CHANNEL against the elementwise ops the reference recurrence runs,
  counted op by op. FlopCounterMode cannot see elementwise work, so RWKVModule.forward declares it
  (training/wkv_flops.py); Lightning's summary total is then the whole analytic count.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from lightning.pytorch.utilities.model_summary import summarize
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from rwkv_infctx.model import RWKV4, RWKV7, RWKV4Config, RWKV7Config
from rwkv_infctx.model.registry import family_named
from rwkv_infctx.model.rwkv4_flops import (
    WKV_OPS_PER_CHANNEL,
    forward_flops_per_token,
    matmul_flops_per_token,
    matmul_weights,
    wkv_flops_per_token,
)
from rwkv_infctx.model.rwkv7 import family as rwkv7_family
from rwkv_infctx.ops.wkv4 import fresh_wkv4_state, wkv4_reference
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.throughput import mfu, train_flops_per_token

DIMS = {"n_layer": 2, "n_embd": 32, "vocab_size": 97, "dim_att": 24, "dim_ffn": 80}
FAMILY_DIMS = {
    "rwkv4": {"arch": "rwkv4", **DIMS},
    "rwkv7": {"arch": "rwkv7", "n_layer": 2, "n_embd": 128, "vocab_size": 97, "d_mv_lora": 16},
}
ARITHMETIC = {"aten.add", "aten.sub", "aten.mul", "aten.div", "aten.exp", "aten.maximum", "aten.neg"}


class ElementwiseCount(TorchDispatchMode):
    """Elements produced by each arithmetic aten op (copies, views and allocations not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if name in ARITHMETIC:
            self.ops[name] += out.numel()
        return out


def test_matmul_weights_are_the_linear_layers():
    cfg = RWKV4Config(**DIMS)
    model = RWKV4(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert matmul_weights(cfg) == linear
    assert forward_flops_per_token(cfg) == 2 * linear + WKV_OPS_PER_CHANNEL * 2 * 24


def test_wkv_ops_per_channel_is_what_the_reference_runs():
    B, T, C = 2, 5, 3
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(B, T, C, generator=gen), torch.randn(B, T, C, generator=gen)
    decay, first = torch.randn(C, generator=gen), torch.randn(C, generator=gen)
    with ElementwiseCount() as count:
        wkv4_reference(decay, first, k, v, fresh_wkv4_state(B, C))
    per_call = 2 * C  # w = -exp(time_decay), once per call
    assert sum(count.ops.values()) == WKV_OPS_PER_CHANNEL * B * T * C + per_call


def test_torch_measures_the_matmul_part():
    cfg = RWKV4Config(**DIMS, wkv_backend="reference")
    model, T = RWKV4(cfg), 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, T, dtype=torch.long))
    assert counter.get_total_flops() == T * matmul_flops_per_token(cfg)  # WKV: not seen


def test_torch_measures_the_rwkv7_matmul_part():
    cfg = RWKV7Config(n_layer=2, n_embd=128, vocab_size=97, wkv_backend="reference")
    model, T = RWKV7(cfg), 16
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, T, dtype=torch.long))
    assert counter.get_total_flops() == T * rwkv7_family.matmul_flops_per_token(cfg)  # WKV: not seen


@pytest.mark.parametrize("family", FAMILY_DIMS)
@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
def test_lightning_summary_total_is_the_analytic_forward(family, backend):
    module = RWKVModule(**FAMILY_DIMS[family], ctx_len=16, loss_chunk=5, wkv_backend=backend)
    cfg, rules = module.model.cfg, family_named(family)
    summary = summarize(module, max_depth=1)  # what the ModelSummary callback prints at fit start
    assert summary.total_flops == 16 * rules.forward_flops_per_token(cfg)
    assert train_flops_per_token(module.model) == 3 * rules.forward_flops_per_token(cfg)
    assert mfu(1000.0, train_flops_per_token(module.model), 1.0) == pytest.approx(
        3 * rules.forward_flops_per_token(cfg) * 1000 / 1e12
    )
    if family == "rwkv4":
        assert summary.total_flops == 16 * (matmul_flops_per_token(cfg) + wkv_flops_per_token(cfg))


def test_forward_is_the_greedy_prediction_in_chunks():
    module = RWKVModule(**FAMILY_DIMS["rwkv4"], ctx_len=16, loss_chunk=5, wkv_backend="reference")
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = module.model(tokens)
        assert torch.equal(module(tokens), logits.argmax(-1))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lightning_summary_on_cuda_with_the_triton_op():
    """auto on CUDA: the Triton WKV op (a custom op with no flop formula, invisible to the counter)."""
    module = RWKVModule(**FAMILY_DIMS["rwkv4"], ctx_len=64, loss_chunk=20).cuda()
    assert summarize(module, max_depth=1).total_flops == 64 * forward_flops_per_token(module.model.cfg)
