"""The fla backend of WKV-7 (`wkv_backend: fla`) on the CPU under Triton's interpreter, in float32.

Through our dispatcher (`wkv7(..., backend="fla", self_check="error")`, so fla's self-check runs
first and must pass), over a sequence cut into uneven segments with the state carried undetached,
against our float64 reference over the whole sequence: y, the final state and the gradients of all
inputs, the initial state's included, within 1e-4 relative. The interpreter needs three patches
(`fla_interpreter.py`, test harness only). Each fla call takes seconds here: a few small shapes.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.ops import self_check
from rwkv_infctx.ops.wkv7 import fla_kernel, wkv7, wkv7_reference

from . import fla_interpreter
from .fla_interpreter import FLA_READY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FLA_READY, reason="needs fla-core and triton: pip install -e '.[test]'"),
    pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests, for machines without CUDA"),
]

NAMES = ("r", "w", "k", "v", "a", "b", "S0")


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    with fla_interpreter.patched():
        yield


def _inputs(B: int, T: int, H: int, N: int, seed: int) -> list[torch.Tensor]:
    """Block-like float64 inputs: w soft-clamped, a = -κ̂, b = κ̂·ICLR, a non-zero S0 [value, key]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.nn.functional.softplus(-(randn(B, T, H, N) - 1)) - 0.5
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    iclr = torch.sigmoid(randn(B, T, H, N))
    return [r, w, k, v, -kk, kk * iclr, 0.5 * randn(B, H, N, N)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize(
    "B,H,N,segments",
    [
        (2, 2, 64, (5, 29, 19)),  # a segment shorter than fla's 16-token chunk, partial chunks
        (1, 1, 32, (70,)),  # one segment, T = 70
    ],
)
def test_segments_match_fp64_reference(B, H, N, segments):
    self_check.reset()
    T = sum(segments)
    x64 = [t.requires_grad_() for t in _inputs(B, T, H, N, seed=T + N)]
    x32 = [t.detach().float().requires_grad_() for t in x64]

    y_ref, S_ref = wkv7_reference(*x64)
    state, ys, t0 = x32[6], [], 0
    calls = []
    real = fla_kernel.wkv7_fla

    def counted(*args):
        calls.append(args[0].shape[1])
        return real(*args)

    fla_kernel.wkv7_fla = counted
    try:
        for n in segments:
            seg = [x[:, t0 : t0 + n] for x in x32[:6]]
            y, state = wkv7(*seg, state, backend="fla", self_check="error")
            ys.append(y)
            t0 += n
    finally:
        fla_kernel.wkv7_fla = real
    y = torch.cat(ys, 1)
    assert calls == [37, *segments]  # the self-check's problem (T=37, it passed), then every segment
    assert self_check._verdicts == {self_check.CheckKey("WKV-7", "fla", torch.float32, "cpu", N): None}
    assert state.dtype == torch.float32 and state.is_contiguous()
    assert _rel(y, y_ref) <= 1e-4
    assert _rel(state, S_ref) <= 1e-4

    g = torch.Generator().manual_seed(1)
    wy, wS = torch.randn(y_ref.shape, generator=g), torch.randn(S_ref.shape, generator=g)
    ref_grads = torch.autograd.grad((y_ref * wy.double()).sum() + (S_ref * wS.double()).sum(), x64)
    grads = torch.autograd.grad((y * wy).sum() + (state * wS).sum(), x32)
    for name, got, want in zip(NAMES, grads, ref_grads, strict=True):
        assert got.dtype == torch.float32, name
        assert _rel(got, want) <= 1e-4, (name, _rel(got, want))
