"""The WKV-4 reference op against independent oracles (fp64 autograd of the naive definition)."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.ops.wkv4 import FRESH_MAX, WKV4State, fresh_wkv4_state, wkv4, wkv4_reference
from rwkv_infctx.ops.wkv4.reference import WKV4Reference

from .wkv_oracles import random_wkv_inputs, wkv4_logstable_autograd, wkv4_naive


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("B,T,C", [(1, 1, 4), (2, 7, 5), (3, 33, 8)])
def test_forward_and_gradients_match_naive_definition_fp64(B, T, C):
    inputs = [t.requires_grad_() for t in random_wkv_inputs(B, T, C)]
    td, tf, k, v, aa, bb, pp = inputs
    y, new = wkv4_reference(td, tf, k, v, WKV4State(aa, bb, pp))
    A_T, B_T = new.aa * torch.exp(new.pp), new.bb * torch.exp(new.pp)

    y_ref, A_ref, B_ref = wkv4_naive(td, tf, k, v, aa * torch.exp(pp), bb * torch.exp(pp))
    assert _rel(y, y_ref) < 1e-12
    assert _rel(A_T, A_ref) < 1e-12 and _rel(B_T, B_ref) < 1e-12

    g = torch.Generator().manual_seed(1)
    gy, gA, gB = (torch.randn(x.shape, generator=g, dtype=x.dtype) for x in (y, A_T, B_T))
    ours = torch.autograd.grad((y * gy).sum() + (A_T * gA).sum() + (B_T * gB).sum(), inputs)
    ref = torch.autograd.grad((y_ref * gy).sum() + (A_ref * gA).sum() + (B_ref * gB).sum(), inputs)
    for name, a, b in zip(("time_decay", "time_first", "k", "v", "aa", "bb", "pp"), ours, ref, strict=True):
        assert _rel(a, b) < 1e-9, name


def test_gradient_on_outgoing_running_max_matches_autograd_of_logstable_loop():
    """A loss on every output, pp_T included, exercises the arg-max routing of the backward."""
    inputs = [t.requires_grad_() for t in random_wkv_inputs(2, 9, 6, seed=3)]
    ours = WKV4Reference.apply(*inputs)
    ref = wkv4_logstable_autograd(*inputs)
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in ref]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ours, weights, strict=True)), inputs)
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights, strict=True)), inputs)
    for a, b in zip(grads, ref_grads, strict=True):
        assert _rel(a, b) < 1e-12


def test_gradcheck():
    inputs = [t.requires_grad_() for t in random_wkv_inputs(2, 5, 3, seed=4)]
    assert torch.autograd.gradcheck(WKV4Reference.apply, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "chunked"])
def test_split_sequence_carries_state_exactly(backend):
    """fp32: equal to rounding, relative to each tensor's scale (pp and bb reach ~5 here)."""
    td, tf, k, v, aa, bb, pp = random_wkv_inputs(2, 20, 4, dtype=torch.float32, seed=5)
    state = WKV4State(aa, bb, pp)
    y_full, s_full = wkv4(td, tf, k, v, state, backend)
    y1, s1 = wkv4(td, tf, k[:, :7], v[:, :7], state, backend)
    y2, s2 = wkv4(td, tf, k[:, 7:], v[:, 7:], s1, backend)
    for a, b in zip((torch.cat([y1, y2], 1), *s2), (y_full, *s_full), strict=True):
        assert (a - b).abs().max() <= 1e-6 * b.abs().max().clamp_min(1.0)


def test_fresh_state_convention_and_empty_sequence():
    s = fresh_wkv4_state(2, 3)
    assert (s.pp == FRESH_MAX).all() and (s.aa == 0).all() and (s.bb == 0).all()
    td, tf = torch.zeros(3), torch.zeros(3)
    k = torch.randn(2, 1, 3)
    y, _ = wkv4(td, tf, k, k, s)
    torch.testing.assert_close(y, k)  # the first token only sees itself
    y0, s0 = wkv4(td, tf, k[:, :0], k[:, :0], s)
    assert y0.shape == (2, 0, 3) and torch.equal(s0.pp, s.pp)


def test_low_precision_inputs_keep_fp32_state():
    td, tf, k, v, aa, bb, pp = random_wkv_inputs(1, 4, 8, dtype=torch.float32)
    y, s = wkv4(td, tf, k.bfloat16(), v.bfloat16(), WKV4State(aa, bb, pp))
    assert y.dtype == torch.bfloat16 and s.aa.dtype == torch.float32


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        wkv4(*random_wkv_inputs(1, 2, 2, dtype=torch.float32)[:4], fresh_wkv4_state(1, 2), backend="cuda9")
