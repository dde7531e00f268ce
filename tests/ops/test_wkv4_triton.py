"""The Triton WKV-4 kernels against the fp64 reference, on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before the kernels are decorated; the kernel module is imported lazily
on the first call, so setting it here (at collection) is enough. Without CUDA the op also sets it
itself. The interpreter is slow: shapes are small and block sizes cover C in one program.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)"
)

from rwkv_infctx.ops.wkv4 import FRESH_MAX, WKV4State, wkv4  # noqa: E402
from rwkv_infctx.ops.wkv4.reference import WKV4Reference  # noqa: E402
from rwkv_infctx.ops.wkv4.triton_kernel import default_chunk, wkv4_triton  # noqa: E402

from .wkv_oracles import random_wkv_inputs  # noqa: E402

NAMES = ("time_decay", "time_first", "k", "v", "aa", "bb", "pp")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare(B, T, C, *, seed=0, chunk=None, fresh=False, big_carry=False, dtype=torch.float32, tol=1e-5):
    """Forward outputs and all seven gradients of the kernel vs the fp64 reference, with a random
    loss on every output (y, aa_T, bb_T and pp_T, so the running-max routing is exercised)."""
    x = list(random_wkv_inputs(B, T, C, seed=seed))
    if fresh:
        x[4], x[5], x[6] = torch.zeros_like(x[4]), torch.zeros_like(x[5]), torch.full_like(x[6], FRESH_MAX)
    if big_carry:  # a carried max that dominates pp_T in weakly decaying channels: arg-max is pp_0
        x[6] = x[6] + 6.0
    x[2], x[3] = x[2].to(dtype).double(), x[3].to(dtype).double()  # the reference sees the same k, v
    x64 = [t.clone().requires_grad_() for t in x]
    xk = [t.to(DEVICE, torch.float32) for t in x]
    xk[2], xk[3] = xk[2].to(dtype), xk[3].to(dtype)
    xk = [t.requires_grad_() for t in xk]

    ref = WKV4Reference.apply(*x64)
    y, st = wkv4_triton(*xk[:4], WKV4State(*xk[4:]), chunk=chunk)
    out = (y, *st)
    assert y.dtype == dtype and all(s.dtype == torch.float32 for s in st)

    g = torch.Generator().manual_seed(seed + 100)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref]
    ref_grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(ref, weights, strict=True)), x64)
    loss = sum((o.float() * w.to(DEVICE, torch.float32)).sum() for o, w in zip(out, weights, strict=True))
    grads = torch.autograd.grad(loss, xk)

    for name, a, b in zip(("y", "aa_T", "bb_T", "pp_T"), out, ref, strict=True):
        assert torch.isfinite(a).all(), name
        assert _rel(a.cpu(), b) <= tol, (name, _rel(a.cpu(), b))
    for name, a, b in zip(NAMES, grads, ref_grads, strict=True):
        assert torch.isfinite(a).all(), name
        if fresh and name in ("aa", "bb", "pp"):  # the reference gives exact zeros here
            assert a.abs().max() == 0 and b.abs().max() == 0, name
            continue
        assert _rel(a.cpu(), b) <= tol, (name, _rel(a.cpu(), b))


# T 1, 7, 64, 130 x C 32, 96 x B 1, 3, not the full cross product (the interpreter is slow): every
# value of each axis appears, and every T meets both C and both B across the list.
SHAPES = [
    (1, 1, 32),
    (3, 1, 96),
    (1, 7, 96),
    (3, 7, 32),
    (3, 64, 32),
    (1, 64, 96),
    (1, 130, 32),
    (3, 130, 96),
]


@pytest.mark.parametrize("B,T,C", SHAPES)
def test_matches_fp64_reference(B, T, C):
    _compare(B, T, C, seed=B * 1000 + T * 10 + C)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 200])
def test_any_chunk_length_gives_the_same_result(chunk):
    """Chunk boundaries (partial last chunk, one chunk, chunk longer than T) change nothing."""
    _compare(2, 37, 32, seed=7, chunk=chunk)


@pytest.mark.parametrize("B,T,C", [(1, 7, 32), (3, 130, 96)])
def test_fresh_state(B, T, C):
    _compare(B, T, C, seed=11, fresh=True)


def test_running_max_routed_to_the_carried_state():
    """pp_T's arg-max is pp_0 in some channels and a key in others; both routes are checked."""
    _compare(2, 20, 64, seed=13, big_carry=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """bf16/fp16 k, v: y in that dtype, the state in fp32, gradients within 2e-2 of fp64."""
    _compare(2, 64, 32, seed=17, dtype=dtype, tol=2e-2)


def test_dispatch_and_split_sequence():
    """backend="triton" is this kernel; two calls carrying the state equal one call over the whole."""
    td, tf, k, v, aa, bb, pp = (t.to(DEVICE) for t in random_wkv_inputs(2, 40, 32, dtype=torch.float32))
    state = WKV4State(aa, bb, pp)
    y_full, s_full = wkv4(td, tf, k, v, state, backend="triton")
    y1, s1 = wkv4(td, tf, k[:, :17], v[:, :17], state, backend="triton")
    y2, s2 = wkv4(td, tf, k[:, 17:], v[:, 17:], s1, backend="triton")
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, rtol=0, atol=1e-5)
    for a, b in zip(s2, s_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    y_ref, _ = wkv4(td, tf, k, v, state, backend="reference")
    torch.testing.assert_close(y_full, y_ref, rtol=0, atol=1e-5)


def test_auto_sends_cpu_tensors_to_the_reference(monkeypatch):
    import rwkv_infctx.ops.wkv4.triton_kernel as tk

    def boom(*a, **kw):
        raise AssertionError("auto must not use the Triton kernel for CPU tensors")

    monkeypatch.setattr(tk, "wkv4_triton", boom)
    td, tf, k, v, aa, bb, pp = random_wkv_inputs(1, 3, 4, dtype=torch.float32)
    wkv4(td, tf, k, v, WKV4State(aa, bb, pp), backend="auto")


def test_empty_sequence():
    td, tf, k, v, aa, bb, pp = (t.to(DEVICE) for t in random_wkv_inputs(2, 0, 32, dtype=torch.float32))
    y, s = wkv4_triton(td, tf, k, v, WKV4State(aa, bb, pp))
    assert y.shape == (2, 0, 32) and torch.equal(s.pp, pp)


def test_default_chunk_is_about_sqrt_t():
    assert default_chunk(4096) == 64 and default_chunk(7) == 16 and default_chunk(1 << 20) == 256


def test_torch_compile_keeps_one_graph():
    """The op is a registered custom op: fullgraph compilation (no graph break) works, forward and
    backward, and gives the eager result."""
    td, tf, k, v, aa, bb, pp = (
        t.to(DEVICE).requires_grad_() for t in random_wkv_inputs(1, 9, 32, dtype=torch.float32, seed=3)
    )

    def f(td, tf, k, v, aa, bb, pp):
        y, s = wkv4(td, tf, k, v, WKV4State(aa, bb, pp), backend="triton")
        return (y * y).sum() + s.aa.sum() + s.bb.sum() + s.pp.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = (td, tf, k, v, aa, bb, pp)
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = f(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for a, b in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(a, b)


def test_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) implementation and autograd registration agree."""
    from rwkv_infctx.ops.wkv4.triton_kernel import wkv4_fwd

    td, tf, k, v, aa, bb, pp = (t.to(DEVICE) for t in random_wkv_inputs(1, 5, 32, dtype=torch.float32))
    args = (td, tf, k.requires_grad_(), v, aa, bb, pp, 4, 0)
    torch.library.opcheck(
        wkv4_fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration")
    )
