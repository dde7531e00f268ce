"""The chunked WKV-4 op against the reference op and independent fp64 oracles."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.ops.wkv4 import FRESH_MAX, WKV4State, chunked, fresh_wkv4_state, wkv4
from rwkv_infctx.ops.wkv4.chunked import CHUNK_LEN, WKV4Chunked, wkv4_chunked
from rwkv_infctx.ops.wkv4.reference import WKV4Reference

from .wkv_oracles import random_wkv_inputs, wkv4_logstable_autograd, wkv4_naive

NAMES = ("time_decay", "time_first", "k", "v", "aa", "bb", "pp")
L = CHUNK_LEN


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _leaves(inputs):
    return [t.detach().clone().requires_grad_() for t in inputs]


def _run(apply, inputs, seed=1):
    """Outputs of `apply` and the gradients of all 7 inputs under random weights on all 4 outputs."""
    inputs = _leaves(inputs)
    outs = apply(*inputs)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    loss = sum((o.double() * w.double()).sum() for o, w in zip(outs, weights, strict=True))
    return [o.detach() for o in outs], torch.autograd.grad(loss, inputs)


def _chunked(chunk_len=None):
    return lambda *xs: WKV4Chunked.apply(*xs, chunk_len)


SHAPES = [(1, 1, 4), (3, L - 1, 5), (1, L, 5), (3, L + 1, 6), (3, 130, 8), (1, 130, 3)]


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_matches_reference_fp64(B, T, C):
    inputs = random_wkv_inputs(B, T, C, seed=T + B)
    (y, aa, bb, pp), grads = _run(_chunked(), inputs)
    (y_r, aa_r, bb_r, pp_r), grads_r = _run(WKV4Reference.apply, inputs)
    assert torch.equal(pp, pp_r)  # the same running max, bit for bit
    assert _rel(y, y_r) < 1e-12 and _rel(aa, aa_r) < 1e-12 and _rel(bb, bb_r) < 1e-12
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("B,T,C", [(1, 1, 4), (3, L + 1, 5), (2, 130, 6)])
def test_matches_naive_definition_and_logstable_autograd_fp64(B, T, C):
    inputs = _leaves(random_wkv_inputs(B, T, C, seed=7))
    td, tf, k, v, aa, bb, pp = inputs
    y, new = wkv4_chunked(td, tf, k, v, WKV4State(aa, bb, pp))
    A_T, B_T = new.aa * torch.exp(new.pp), new.bb * torch.exp(new.pp)
    y_n, A_n, B_n = wkv4_naive(td, tf, k, v, aa * torch.exp(pp), bb * torch.exp(pp))
    assert _rel(y, y_n) < 1e-12 and _rel(A_T, A_n) < 1e-12 and _rel(B_T, B_n) < 1e-12
    g = torch.Generator().manual_seed(2)
    gy, gA, gB = (torch.randn(x.shape, generator=g, dtype=x.dtype) for x in (y, A_T, B_T))
    ours = torch.autograd.grad((y * gy).sum() + (A_T * gA).sum() + (B_T * gB).sum(), inputs)
    ref = torch.autograd.grad((y_n * gy).sum() + (A_n * gA).sum() + (B_n * gB).sum(), inputs)
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert _rel(a, b) < 1e-10, name

    # a loss on every output of the log-stable state, pp_T included (the arg-max routing)
    _, ours = _run(_chunked(), inputs, seed=3)
    _, ref = _run(wkv4_logstable_autograd, inputs, seed=3)
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert _rel(a, b) < 1e-10, name


@pytest.mark.parametrize("B,T,C", [(1, L - 1, 8), (3, L + 1, 8), (3, 130, 16)])
def test_matches_reference_fp32(B, T, C):
    inputs = random_wkv_inputs(B, T, C, dtype=torch.float32, seed=T)
    outs, grads = _run(_chunked(), inputs)
    outs_r, grads_r = _run(WKV4Reference.apply, inputs)
    outs_64, grads_64 = _run(WKV4Reference.apply, [x.double() for x in inputs])
    assert torch.equal(outs[3], outs_r[3])
    assert all(o.dtype == torch.float32 for o in outs)
    for a, b, c in zip(outs[:3], outs_r[:3], outs_64[:3], strict=True):
        assert _rel(a, b) < 1e-5 and _rel(a, c) < 1e-5
    for name, a, b, c in zip(NAMES, grads, grads_r, grads_64, strict=True):
        assert a.dtype == torch.float32, name
        assert _rel(a, b) < 1e-5 and _rel(a, c) < 1e-5, name


def test_long_segment_fp32_against_fp64_truth():
    """At T = 512 the fp32 reference itself drifts ~1e-5 from fp64; the chunked op stays closer."""
    inputs = random_wkv_inputs(2, 512, 16, dtype=torch.float32, seed=11)
    outs, grads = _run(_chunked(), inputs)
    outs_64, grads_64 = _run(WKV4Reference.apply, [x.double() for x in inputs])
    assert torch.equal(outs[3], _run(WKV4Reference.apply, inputs)[0][3])
    for a, c in zip(outs[:3], outs_64[:3], strict=True):
        assert _rel(a, c) < 1e-5
    for name, a, c in zip(NAMES, grads, grads_64, strict=True):
        assert _rel(a, c) < 1e-5, name


@pytest.mark.parametrize("chunk_len", [1, 3, 16, 64, 200])
def test_chunk_length_does_not_change_the_result(chunk_len):
    inputs = random_wkv_inputs(2, 70, 5, seed=5)
    outs, grads = _run(_chunked(chunk_len), inputs)
    outs_r, grads_r = _run(WKV4Reference.apply, inputs)
    assert torch.equal(outs[3], outs_r[3])
    for a, b in zip([*outs[:3], *grads], [*outs_r[:3], *grads_r], strict=True):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", [1, L + 1, 40])
def test_fresh_state(dtype, T):
    td, tf, k, v, *_ = random_wkv_inputs(3, T, 6, dtype=dtype, seed=T)
    inputs = [td, tf, k, v, *fresh_wkv4_state(3, 6, dtype=dtype)]
    assert (inputs[-1] == FRESH_MAX).all()
    outs, grads = _run(_chunked(), inputs)
    outs_r, grads_r = _run(WKV4Reference.apply, inputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert torch.equal(outs[3], outs_r[3])
    for name, a, b in zip(
        ("y", "aa", "bb", *NAMES), [*outs[:3], *grads], [*outs_r[:3], *grads_r], strict=True
    ):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < tol, name


def test_ties_in_the_running_max_split_like_the_reference():
    """w + pp_{t-1} == k_t exactly: the reference gives half the pp_T gradient to each side."""
    C = 3
    td = torch.zeros(C, dtype=torch.float64)  # w = -1
    tf = torch.full((C,), 0.5, dtype=torch.float64)
    k = torch.tensor([[[0.0, 0.0, 1.0], [-1.0, 2.0, 0.0], [-2.0, 1.0, 3.0]]], dtype=torch.float64)
    v = torch.randn(1, 3, C, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    aa, bb = torch.ones(1, C, dtype=torch.float64), torch.ones(1, C, dtype=torch.float64)
    pp = torch.tensor([[1.0, -5.0, 2.0]], dtype=torch.float64)
    inputs = [td, tf, k, v, aa, bb, pp]
    outs, grads = _run(_chunked(2), inputs)
    outs_r, grads_r = _run(WKV4Reference.apply, inputs)
    assert torch.equal(outs[3], outs_r[3])
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert _rel(a, b) < 1e-12, name


def test_empty_sequence():
    td, tf, k, v, aa, bb, pp = _leaves(random_wkv_inputs(2, 0, 3, dtype=torch.float32))
    y, aa_T, bb_T, pp_T = WKV4Chunked.apply(td, tf, k, v, aa, bb, pp)
    assert y.shape == (2, 0, 3)
    for new, old in ((aa_T, aa), (bb_T, bb), (pp_T, pp)):
        assert torch.equal(new, old) and new.data_ptr() != old.data_ptr()
    g = torch.autograd.grad(aa_T.sum() + 2 * bb_T.sum() + 3 * pp_T.sum(), [td, k, aa, bb, pp])
    assert (g[0] == 0).all() and g[1].shape == k.shape
    assert (g[2] == 1).all() and (g[3] == 2).all() and (g[4] == 3).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keys_and_values(dtype):
    td, tf, k, v, aa, bb, pp = random_wkv_inputs(2, 40, 8, dtype=torch.float32, seed=3)
    inputs = [td, tf, k.to(dtype), v.to(dtype), aa, bb, pp]
    outs, grads = _run(_chunked(), inputs)
    outs_r, grads_r = _run(WKV4Reference.apply, inputs)
    assert outs[0].dtype == dtype and all(o.dtype == torch.float32 for o in outs[1:])
    assert torch.equal(outs[3], outs_r[3])
    assert _rel(outs[0], outs_r[0]) < 1e-2  # one rounding to dtype apart at most
    for a, b in zip(outs[1:3], outs_r[1:3], strict=True):
        assert _rel(a, b) < 1e-5
    for name, a, b in zip(NAMES, grads, grads_r, strict=True):
        assert a.dtype == b.dtype, name
        assert _rel(a, b) < (1e-2 if name in ("k", "v") else 1e-5), name


@pytest.mark.parametrize("forced", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_form_for_widely_spread_keys(dtype, forced, monkeypatch):
    """Keys spread by ~200 nats inside a chunk take the entry-by-entry path in fp32 (forced: always).

    With |k| ~ 100 the fp32 reference's own running max drifts by rounding (one ulp of ~100 per step),
    so its A_T = aa_T·e^{pp_T} is only good to ~1e-4; compare fp32 against the fp64 reference there.
    """
    td, tf, k, v, aa, bb, pp = random_wkv_inputs(2, 45, 6, dtype=torch.float64, seed=8)
    inputs = [x.to(dtype) for x in (td, tf, k * 40, v, aa, bb, pp)]
    calls = []
    original = chunked._Group.entries
    monkeypatch.setattr(chunked._Group, "entries", lambda self, D: calls.append(1) or original(self, D))
    if forced:
        monkeypatch.setitem(chunked._FACTOR_LIMIT, dtype, float("-inf"))
    outs, grads = _run(_chunked(), inputs)
    outs_r, grads_r = _run(WKV4Reference.apply, inputs)
    outs_64, grads_64 = _run(WKV4Reference.apply, [x.double() for x in inputs])
    assert bool(calls) == (forced or dtype == torch.float32)
    assert torch.equal(outs[3], outs_r[3])
    if dtype == torch.float64:
        for a, b in zip([*outs[:3], *grads], [*outs_r[:3], *grads_r], strict=True):
            assert _rel(a, b) < 1e-10
        return
    assert _rel(outs[0], outs_64[0]) < 1e-5
    for x in (1, 2):  # the true state A = aa·e^{pp}, B = bb·e^{pp}
        assert _rel(outs[x].double() * outs[3].double().exp(), outs_64[x] * outs_64[3].exp()) < 1e-4
    for name, a, c in zip(NAMES, grads, grads_64, strict=True):
        assert torch.isfinite(a).all() and _rel(a, c) < 1e-4, name


def test_gradcheck():
    inputs = _leaves(random_wkv_inputs(2, 7, 3, seed=4))
    assert torch.autograd.gradcheck(_chunked(3), inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_states_are_interchangeable_with_the_reference():
    td, tf, k, v, aa, bb, pp = random_wkv_inputs(2, 60, 4, dtype=torch.float32, seed=6)
    state = WKV4State(aa, bb, pp)
    y_full, s_full = wkv4(td, tf, k, v, state, backend="reference")
    y1, s1 = wkv4_chunked(td, tf, k[:, :25], v[:, :25], state)
    y2, s2 = wkv4(td, tf, k[:, 25:], v[:, 25:], s1, backend="reference")
    y3, s3 = wkv4(td, tf, k[:, 25:], v[:, 25:], s1, backend="chunked")
    assert torch.equal(s2.pp, s_full.pp) and torch.equal(s3.pp, s_full.pp)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.cat([y1, y3], 1), y_full, rtol=0, atol=1e-6)
    for a, b, c in zip(s2, s3, s_full, strict=True):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_chunked_backend_is_one_autograd_node():
    td, tf, k, v, aa, bb, pp = _leaves(random_wkv_inputs(1, 20, 4, dtype=torch.float32))
    y, s = wkv4(td, tf, k, v, WKV4State(aa, bb, pp), backend="chunked")
    assert type(y.grad_fn).__name__ == "WKV4ChunkedBackward"
    assert s.aa.grad_fn is y.grad_fn and s.pp.grad_fn is y.grad_fn
