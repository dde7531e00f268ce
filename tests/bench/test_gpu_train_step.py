"""bench/gpu_train_step.py (part (c) of bench/gpu_check.py): the pieces that need no GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.model import rwkv4 as rwkv4_module
from rwkv_infctx.ops import wkv4 as wkv4_ops
from rwkv_infctx.training.throughput import peak_tflops_for_name

_PATH = Path(__file__).resolve().parents[2] / "bench" / "gpu_train_step.py"
_spec = importlib.util.spec_from_file_location("gpu_train_step", _PATH)
gts = sys.modules.setdefault("gpu_train_step", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gts)  # registered first: its dataclasses look their module up

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA GeForce RTX 4090", 165.0),
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_nominal_peak_by_device_name(name, peak):
    assert peak_tflops_for_name(name) == peak


def test_mfu():
    assert gts.mfu(1_000_000_000, 50_000.0, 600.0) == pytest.approx(6e9 * 5e4 / 6e14)
    assert gts.mfu(10, 1.0, None) is None


def test_grad_errors_global_worst_and_non_finite():
    ref = {"a": torch.tensor([10.0, -10.0]), "b": torch.tensor([0.1, 0.0]), "c": torch.ones(2)}
    got = {
        "a": torch.tensor([10.5, -10.0]),
        "b": torch.tensor([0.2, 0.0]),
        "c": torch.tensor([1.0, float("nan")]),
    }
    glob, worst, worst_name, bad = gts.grad_errors(got, ref)
    assert glob == pytest.approx(0.5 / 10)  # max |diff| over max |ref|, over all parameters
    assert (worst, worst_name) == (pytest.approx(1.0), "b")  # 0.1 / 0.1
    assert bad == ["c"]
    del got["a"]
    assert gts.grad_errors(got, ref)[3] == ["a", "c"]


def _tiny(backend: str = "chunked") -> RWKV4Config:
    return RWKV4Config(n_layer=2, n_embd=32, vocab_size=50, wkv_backend=backend)


def test_cheap_init_fills_every_parameter_in_range():
    model = gts.build_model(_tiny(), CPU, torch.bfloat16, seed=3)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all(), name
        if name.endswith("time_decay"):
            assert p.min() >= -5 and p.max() <= 3 and p.std() > 0.5
        elif name.endswith("time_first"):
            assert p.min() >= -2 and p.max() <= 1
        elif name.endswith("ln1.weight"):
            assert (p == 1).all()
        elif name.endswith("key.weight"):
            assert p.std() > 0.01
    again = gts.build_model(_tiny(), CPU, torch.bfloat16, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True))


def test_patched_wkv_replaces_and_restores():
    model = gts.build_model(_tiny(), CPU, torch.float32)
    tokens = torch.randint(50, (1, 9))
    with gts.patched_wkv(gts.stub_wkv) as calls:
        stubbed, state = model(tokens)
    assert calls[0] == 2  # one call per layer
    assert torch.equal(state.wkv_pp, model.fresh_state(1).wkv_pp)  # passed through
    assert rwkv4_module.wkv4 is wkv4_ops.wkv4
    real, _ = model(tokens)
    assert not torch.allclose(stubbed, real)


def test_whole_step_has_bptt_steps_objective():
    """The unsegmented side of the correctness rows: same loss and gradients as bptt_step (fp32)."""
    model = gts.build_model(_tiny(), CPU, torch.float32, seed=1)
    batch = gts.random_batch(50, 24, CPU, seed=1)
    loss_w = gts.whole_step(model, batch)
    ref = gts._grads(model)
    model.zero_grad(set_to_none=True)
    loss_s = gts.segmented_step(model, batch, ctx_len=8, grad_cp=False)
    glob, _, _, bad = gts.grad_errors(gts._grads(model), ref)
    assert loss_s == pytest.approx(loss_w, rel=1e-6)
    assert not bad and glob < 1e-5
