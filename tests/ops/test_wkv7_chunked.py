"""The chunked WKV-7 op against autograd of the per-token reference in float64, and its contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_infctx.ops.wkv7 import chunked, wkv7
from rwkv_infctx.ops.wkv7.chunked import CHUNK_LEN, WKV7Chunked, chunk_len_for, wkv7_chunked
from rwkv_infctx.ops.wkv7.reference import wkv7_reference

NAMES = ("r", "w", "k", "v", "a", "b", "S0")
L = CHUNK_LEN


def model_inputs(B: int, T: int, H: int, N: int, seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    """Inputs as the RWKV-7 block makes them: w = -softplus(-w̃) - 0.5, a = -κ̂, b = κ̂·α, κ̂ unit
    per head, α in (0, 1); plus a non-zero starting state (B, H, N, N) in float32 (float64 for
    float64 inputs)."""
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, H, N)
    r = torch.randn(shape, generator=g) * 0.5
    w = -F.softplus(-(torch.randn(shape, generator=g) * 2 - 1)) - 0.5
    k = torch.randn(shape, generator=g) * 0.5
    v = torch.randn(shape, generator=g)
    kappa = F.normalize(torch.randn(shape, generator=g), dim=-1)
    alpha = torch.rand(shape, generator=g)
    S0 = torch.randn(B, H, N, N, generator=g) * 0.3
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [x.to(dtype) for x in (r, w, k, v, -kappa, kappa * alpha)] + [S0.to(state_dtype)]


def generic_inputs(B: int, T: int, H: int, N: int, seed: int = 0, w_scale: float = 1.0) -> list[torch.Tensor]:
    """Unstructured float64 inputs: every argument random, w anywhere (decays far outside the
    model's range when w_scale is large)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, T, H, N, generator=g, dtype=torch.float64) * 0.5 for _ in range(6)]
    xs[1] = xs[1] * 2 * w_scale
    return [*xs, torch.randn(B, H, N, N, generator=g, dtype=torch.float64) * 0.3]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _run(fn, inputs, seed: int = 1, gy_dtype=torch.float64):
    """fn's (y, S_T) and the gradients of all 7 inputs under random weights on y (values that
    gy_dtype represents) and on S_T."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    y, S = fn(*inputs)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(gy_dtype).double()
    gS = torch.randn(S.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * gy).sum() + (S.double() * gS).sum()
    return [y.detach(), S.detach()], list(torch.autograd.grad(loss, inputs))


def _chunked(chunk_len=None):
    return lambda *xs: wkv7_chunked(*xs, chunk_len=chunk_len)


def _reference64(inputs, gy_dtype=torch.float64):
    return _run(wkv7_reference, [x.double() for x in inputs], gy_dtype=gy_dtype)


@pytest.mark.parametrize(
    "B,T,H,N,chunk_len",
    [(2, 5, 1, 3, 2), (1, 4, 2, 2, 1), (1, 3, 1, 4, None)],
)
def test_gradcheck_generic_inputs(B, T, H, N, chunk_len):
    """fp64 gradcheck of every input, S0 non-zero, gradients arriving on y and on S_T."""
    inputs = [x.requires_grad_() for x in generic_inputs(B, T, H, N, seed=T)]
    assert torch.autograd.gradcheck(lambda *xs: WKV7Chunked.apply(*xs, chunk_len), inputs)


def test_gradcheck_model_range_and_decays_past_the_range():
    inputs = [x.requires_grad_() for x in model_inputs(1, 6, 1, 4, seed=3, dtype=torch.float64)]
    assert torch.autograd.gradcheck(lambda *xs: WKV7Chunked.apply(*xs, 4), inputs)
    # w up to ~8: one-token chunks in fp64 (decay rate e^8 > 600 / 4)
    inputs = [x.requires_grad_() for x in generic_inputs(1, 5, 1, 3, seed=4, w_scale=8.0)]
    assert torch.autograd.gradcheck(lambda *xs: WKV7Chunked.apply(*xs, 4), inputs)


@pytest.mark.parametrize(
    "B,T,H,N",
    [
        (1, 1, 2, 64),
        (2, L - 1, 2, 64),
        (1, L, 2, 64),
        (2, L + 1, 2, 64),
        (3, 2 * L + 7, 2, 16),
        (1, 200, 1, 64),
    ],
)
def test_fp32_matches_fp64_reference(B, T, H, N):
    inputs = model_inputs(B, T, H, N, seed=T + B)
    outs, grads = _run(_chunked(), inputs)
    outs64, grads64 = _reference64(inputs)
    assert outs[0].dtype == torch.float32 and outs[1].dtype == torch.float32
    for name, a, b in zip(("y", "S_T"), outs, outs64, strict=True):
        assert _rel(a, b) < 1e-5, name
    for name, a, b in zip(NAMES, grads, grads64, strict=True):
        assert a.dtype == torch.float32, name
        assert _rel(a, b) < 1e-5, name


@pytest.mark.parametrize("chunk_len", [1, 3, 16, 64, 500])
def test_fp64_matches_fp64_reference_for_any_chunk_length(chunk_len):
    inputs = model_inputs(2, 70, 2, 8, seed=5, dtype=torch.float64)
    outs, grads = _run(_chunked(chunk_len), inputs)
    outs64, grads64 = _reference64(inputs)
    for name, a, b in zip(("y", "S_T", *NAMES), outs + grads, outs64 + grads64, strict=True):
        assert a.dtype == torch.float64, name
        assert _rel(a, b) < 1e-12, name


@pytest.mark.parametrize("w_scale,dtype", [(1.0, torch.float32), (4.0, torch.float32), (4.0, torch.float64)])
def test_generic_inputs_and_fast_decays(w_scale, dtype):
    """Decays outside the model's range (w up to ~e^5 per step) shorten the chunk for the call and
    stay exact; unstructured a, b (the transition need not contract)."""
    inputs = [x.to(dtype) for x in generic_inputs(2, 45, 2, 8, seed=9, w_scale=w_scale)]
    outs, grads = _run(_chunked(), inputs)
    outs64, grads64 = _reference64(inputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-11
    for name, a, b in zip(("y", "S_T", *NAMES), outs + grads, outs64 + grads64, strict=True):
        assert torch.isfinite(a).all() and _rel(a, b) < tol, name


def test_chunk_len_for():
    assert chunk_len_for(-0.61, torch.float32, 32) == 32  # the model's range never shortens a chunk
    assert chunk_len_for(-0.61, torch.float32, 64) == 64
    assert chunk_len_for(-3.0, torch.float32, 32) == 20  # 60 nats / 3 per token
    assert chunk_len_for(-1e4, torch.float32, 32) == 1
    assert chunk_len_for(-3.0, torch.float64, 32) == 32
    assert chunk_len_for(-math.nan, torch.float32, 32) == 32


def _split_run(inputs, cuts, chunk_len=None):
    """Outputs and gradients with T cut into pieces, each piece starting from the state the
    previous one returned (not detached): y and the gradients concatenated over the pieces."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    S, ys = leaves[6], []
    bounds = [0, *cuts, inputs[0].shape[1]]
    for t0, t1 in itertools.pairwise(bounds):
        y, S = wkv7_chunked(*(x[:, t0:t1] for x in leaves[:6]), S, chunk_len=chunk_len)
        ys.append(y)
    y = torch.cat(ys, 1)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gS = torch.randn(S.shape, generator=g, dtype=torch.float64)
    loss = (y.double() * gy).sum() + (S.double() * gS).sum()
    return [y.detach(), S.detach()], list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_split_with_state_carried_equals_one_pass(dtype, tol):
    inputs = model_inputs(2, 150, 2, 64, seed=13, dtype=dtype)
    outs, grads = _run(_chunked(), inputs)
    outs_s, grads_s = _split_run(inputs, [1, 33, 64, 111])
    for name, a, b in zip(("y", "S_T", *NAMES), outs_s + grads_s, outs + grads, strict=True):
        assert _rel(a, b) < tol, name


def test_bf16_inputs_give_an_fp32_state_and_bf16_outputs():
    inputs = model_inputs(2, 40, 2, 16, seed=17)
    inputs = [x.to(torch.bfloat16) for x in inputs[:6]] + [inputs[6]]
    outs, grads = _run(_chunked(), inputs, gy_dtype=torch.bfloat16)  # y's gradient arrives in bf16
    assert outs[0].dtype == torch.bfloat16 and outs[1].dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.bfloat16] * 6 + [torch.float32]
    outs64, grads64 = _reference64(inputs, gy_dtype=torch.bfloat16)  # the same values, in fp64
    assert _rel(outs[0], outs64[0]) < 1e-2  # bf16 rounding of y
    assert _rel(outs[1], outs64[1]) < 1e-5  # the state never passes through bf16
    assert _rel(grads[6], grads64[6]) < 1e-5
    for name, a, b in zip(NAMES[:6], grads[:6], grads64[:6], strict=True):
        assert _rel(a, b) < 1e-2, name


def _saved_bytes(fn, inputs) -> int:
    """Bytes of the distinct storages autograd saves for backward while running fn."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


@pytest.mark.parametrize("T", [64, 256, 1000])
@pytest.mark.parametrize("keep", [False, True])
def test_saved_memory_is_inputs_plus_one_state_per_chunk(T, keep, monkeypatch):
    """Inputs and chunk start states; plus, when the call keeps its chunk terms, exactly the bytes
    `_terms_bytes` budgets for them."""
    B, H, N = 1, 2, 64
    monkeypatch.setattr(chunked, "KEEP_TERMS_BYTES", 1 << 40 if keep else 0)
    inputs = [x.requires_grad_() for x in model_inputs(B, T, H, N)]
    saved = _saved_bytes(_chunked(), inputs)
    n_chunks = -(-T // L)
    terms = chunked._terms_bytes(B * H, T, L, N, torch.float32) if keep else 0
    assert saved == 6 * B * T * H * N * 4 + n_chunks * B * H * N * N * 4 + terms
    assert saved < (0.6 if keep else 0.2) * B * T * H * N * N * 4  # below one state per token
    assert _saved_bytes(wkv7_reference, inputs) > B * T * H * N * N * 4  # what the loop keeps


def test_terms_are_kept_only_within_the_budget_and_one_group(monkeypatch):
    B, H, N = 1, 2, 64
    budget = chunked._terms_bytes(B * H, 256, L, N, torch.float32)
    monkeypatch.setattr(chunked, "KEEP_TERMS_BYTES", budget)
    with_grad = [x.requires_grad_() for x in model_inputs(B, 256, H, N)]
    base = 6 * B * 256 * H * N * 4 + (256 // L) * B * H * N * N * 4
    assert _saved_bytes(_chunked(), with_grad) == base + budget
    longer = [x.requires_grad_() for x in model_inputs(B, 257, H, N)]  # one more chunk: over budget
    assert _saved_bytes(_chunked(), longer) == 6 * B * 257 * H * N * 4 + (256 // L + 1) * B * H * N * N * 4
    monkeypatch.setattr(chunked, "KEEP_TERMS_BYTES", 1 << 40)
    monkeypatch.setattr(chunked, "GROUP_TOKENS", 128)  # two groups: recomputed whatever the budget
    assert _saved_bytes(_chunked(), with_grad) == base


@pytest.mark.parametrize("T", [40, 300])
def test_kept_terms_give_the_recomputed_gradients_bit_for_bit(T, monkeypatch):
    inputs = model_inputs(2, T, 2, 16, seed=3)
    results = []
    for budget in (1 << 40, 0):
        monkeypatch.setattr(chunked, "KEEP_TERMS_BYTES", budget)
        results.append(_run(_chunked(), inputs))
    (outs_kept, grads_kept), (outs_again, grads_again) = results
    for a, b in zip(outs_kept + grads_kept, outs_again + grads_again, strict=True):
        assert torch.equal(a, b)


def test_one_autograd_node():
    inputs = [x.requires_grad_() for x in model_inputs(1, 100, 2, 8)]
    y, S = wkv7(*inputs, backend="chunked")
    assert y.grad_fn is S.grad_fn and type(y.grad_fn).__name__ == "WKV7ChunkedBackward"
    assert all(fn is None or type(fn).__name__ == "AccumulateGrad" for fn, _ in y.grad_fn.next_functions)


def test_dispatch():
    inputs = model_inputs(1, 20, 2, 8)
    y, S = wkv7(*inputs, backend="chunked")
    y_c, S_c = wkv7_chunked(*inputs)
    assert torch.equal(y, y_c) and torch.equal(S, S_c)
    y_r, S_r = wkv7(*inputs, backend="reference")
    assert _rel(y, y_r) < 1e-5 and _rel(S, S_r) < 1e-5


def test_empty_sequence():
    inputs = [x.requires_grad_() for x in model_inputs(2, 0, 2, 4)]
    y, S = wkv7_chunked(*inputs)
    assert y.shape == (2, 0, 2, 4) and torch.equal(S, inputs[6]) and S.data_ptr() != inputs[6].data_ptr()
    gS = torch.randn(S.shape)
    grads = torch.autograd.grad((S * gS).sum(), inputs)
    assert torch.equal(grads[6], gS) and all(g.shape == (2, 0, 2, 4) for g in grads[:6])


def test_autocast_does_not_lower_precision():
    inputs = model_inputs(1, 40, 2, 16)
    y, S = wkv7_chunked(*inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_a, S_a = wkv7_chunked(*inputs)
    assert torch.equal(y, y_a) and torch.equal(S, S_a)


def test_bad_shapes_are_refused():
    r, w, k, v, a, b, S0 = model_inputs(2, 5, 2, 4)
    with pytest.raises(ValueError, match="one"):
        wkv7_chunked(r, w[:, :4], k, v, a, b, S0)
    with pytest.raises(ValueError, match="state"):
        wkv7_chunked(r, w, k, v, a, b, S0[:1])


def _per_token_backward(inputs, gy, gS):
    """The per-token backward recurrences written out (fp64, B = H = 1 as plain matrices): an
    oracle for the gradients that shares no code or formula layout with the chunked op."""
    r, w, k, v, a, b = (x[0, :, 0] for x in inputs[:6])  # (T, N)
    d = torch.exp(-torch.exp(w))
    states = [inputs[6][0, 0]]
    for t in range(r.shape[0]):
        S = states[-1]
        states.append(S * d[t] + torch.outer(S @ a[t], b[t]) + torch.outer(v[t], k[t]))
    dS, grads = gS[0, 0].clone(), [torch.zeros_like(r) for _ in range(6)]
    dr, dw, dk, dv, da, db = grads
    for t in reversed(range(r.shape[0])):
        S, S_prev = states[t + 1], states[t]
        dy = gy[0, t, 0]
        dr[t] = S.T @ dy
        dS += torch.outer(dy, r[t])
        dv[t], dk[t] = dS @ k[t], dS.T @ v[t]
        dSb = dS @ b[t]
        da[t], db[t] = S_prev.T @ dSb, dS.T @ (S_prev @ a[t])
        dw[t] = (S_prev * dS).sum(0) * d[t] * -torch.exp(w[t])
        dS = dS * d[t] + torch.outer(dSb, a[t])
    return [g[None, :, None] for g in grads] + [dS[None, None]]


def test_matches_per_token_backward_recurrences():
    inputs = model_inputs(1, 50, 1, 8, seed=21, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(inputs[0].shape, generator=g, dtype=torch.float64)
    gS = torch.randn(inputs[6].shape, generator=g, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in inputs]
    y, S = wkv7_chunked(*leaves, chunk_len=16)
    ours = torch.autograd.grad((y * gy).sum() + (S * gS).sum(), leaves)
    for name, a, b in zip(NAMES, ours, _per_token_backward(inputs, gy, gS), strict=True):
        assert _rel(a, b) < 1e-12, name


def test_second_derivatives_are_refused():
    inputs = [x.requires_grad_() for x in model_inputs(1, 5, 1, 4)]
    y, S = wkv7_chunked(*inputs)
    (gr, *_) = torch.autograd.grad(y.sum() + S.sum(), inputs, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gr.sum(), inputs)
