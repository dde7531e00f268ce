"""WKV-4 with state in Triton: chunked forward and backward, registered as torch custom ops.

`wkv4_triton(time_decay, time_first, k, v, state)` has the contract of `wkv4_reference` (same
outputs, same gradients for all seven inputs, including a gradient arriving on the outgoing running
max pp). The algorithm (chunks of L steps walked in parallel, a short sequential pass over chunk
states, backward from a saved per-step log-denominator) is described in `bench/wkv4_kernel.md`.

Triton is imported lazily, on the first call: this module imports without triton. On a machine
without CUDA the kernels can only run under Triton's CPU interpreter, so the first call sets
TRITON_INTERPRET=1 when CUDA is unavailable and the variable is unset (tests rely on this).

The forward and backward are `torch.library.custom_op`s (`rwkv_infctx::wkv4_fwd`,
`rwkv_infctx::wkv4_bwd`) with fake implementations and a registered autograd formula, so
`torch.compile` treats the op as one opaque node instead of breaking the graph around it.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch
from torch import Tensor

from rwkv_infctx.ops.self_check import TOLERANCE, CheckKey, compare, generator
from rwkv_infctx.ops.wkv4.reference import WKV4Reference, WKV4State

_kernels_module = None


def triton_available() -> bool:
    """Whether triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _kernels():
    global _kernels_module
    if _kernels_module is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from rwkv_infctx.ops.wkv4 import _triton_kernels

        _kernels_module = _triton_kernels
    return _kernels_module


def default_chunk(T: int) -> int:
    """Chunk length L: about sqrt(T) (balances the in-chunk walks against the pass over chunks)."""
    return int(min(256, max(16, 2 ** math.ceil(math.log2(max(T, 1)) / 2))))


def _blocks(C: int, device: torch.device, block: int = 0) -> tuple[int, int, int]:
    """(channels per program for the chunk kernels, for the scan kernels, num_warps of the former).

    `block` > 0 overrides the channels per program of the chunk kernels on CUDA (for tuning).
    """
    if device.type != "cuda":  # the interpreter: big blocks mean fewer (slow) program instances
        bc = min(128, triton_next_pow2(C))
        return bc, bc, 1
    bc = block if block > 0 else 128 if C >= 1024 else 64 if C >= 64 else 32
    return bc, 32, max(1, bc // 32)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, aa: Tensor) -> None:
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"wkv4 triton: k and v must be (B, T, C) of one shape, got {k.shape}, {v.shape}")
    B, _, C = k.shape
    if time_decay.shape != (C,) or time_first.shape != (C,) or aa.shape != (B, C):
        raise ValueError("wkv4 triton: time_decay, time_first must be (C,) and the state (B, C)")
    if k.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"wkv4 triton: k, v must be fp32, bf16 or fp16, got {k.dtype}")


@torch.library.custom_op("rwkv_infctx::wkv4_fwd", mutates_args=())
def wkv4_fwd(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    aa: Tensor,
    bb: Tensor,
    pp: Tensor,
    chunk: int,
    block: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, aa_T, bb_T, pp_T, logden, argmax_T): outputs, then what the backward needs."""
    kern = _kernels()
    B, T, C = k.shape
    dev = k.device
    td = time_decay.float().contiguous()
    tf = time_first.float().contiguous()
    k, v = k.contiguous(), v.contiguous()
    aa, bb, pp = (s.float().contiguous() for s in (aa, bb, pp))
    L = chunk
    NC = -(-T // L)
    bc, bcs, nw = _blocks(C, dev, block)
    f32 = torch.float32
    loc = torch.empty(3, B, NC, C, device=dev, dtype=f32)
    locidx = torch.empty(B, NC, C, device=dev, dtype=torch.int32)
    sin = torch.empty(3, B, NC, C, device=dev, dtype=f32)
    aaT, bbT, ppT = (torch.empty(B, C, device=dev, dtype=f32) for _ in range(3))
    idxT = torch.empty(B, C, device=dev, dtype=torch.int32)
    y = torch.empty(B, T, C, device=dev, dtype=k.dtype)
    logden = torch.empty(B, T, C, device=dev, dtype=f32)
    grid = (NC, -(-C // bc), B)
    kern.wkv4_fwd_local[grid](k, v, td, loc, locidx, B, T, C, NC, L, BC=bc, num_warps=nw)
    kern.wkv4_fwd_scan[(-(-C // bcs), B)](
        loc, locidx, aa, bb, pp, td, sin, aaT, bbT, ppT, idxT, B, T, C, NC, L, BC=bcs, num_warps=1
    )
    kern.wkv4_fwd_out[grid](k, v, td, tf, sin, y, logden, B, T, C, NC, L, BC=bc, WRITE_Y=True, num_warps=nw)
    return y, aaT, bbT, ppT, logden, idxT


@wkv4_fwd.register_fake
def _(time_decay, time_first, k, v, aa, bb, pp, chunk, block):
    B, T, C = k.shape
    st = aa.new_empty(B, C, dtype=torch.float32)
    return (
        k.new_empty(B, T, C),
        st,
        st.clone(),
        st.clone(),
        k.new_empty(B, T, C, dtype=torch.float32),
        aa.new_empty(B, C, dtype=torch.int32),
    )


@torch.library.custom_op("rwkv_infctx::wkv4_bwd", mutates_args=())
def wkv4_bwd(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    y: Tensor,
    logden: Tensor,
    aa0: Tensor,
    bb0: Tensor,
    pp0: Tensor,
    aaT: Tensor,
    bbT: Tensor,
    ppT: Tensor,
    idxT: Tensor,
    gy: Tensor,
    gaaT: Tensor,
    gbbT: Tensor,
    gppT: Tensor,
    chunk: int,
    block: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (time_decay, time_first, k, v, aa0, bb0, pp0) from those of (y, aa_T, bb_T, pp_T)."""
    kern = _kernels()
    B, T, C = k.shape
    dev = k.device
    f32 = torch.float32
    td = time_decay.float().contiguous()
    tf = time_first.float().contiguous()
    gy = gy.contiguous()
    gaaT, gbbT, gppT = (g.float().contiguous() for g in (gaaT, gbbT, gppT))
    aa0, bb0, pp0 = (s.float().contiguous() for s in (aa0, bb0, pp0))
    L = chunk
    NC = -(-T // L)
    bc, bcs, nw = _blocks(C, dev, block)
    grid = (NC, -(-C // bc), B)
    gloc = torch.empty(3, B, NC, C, device=dev, dtype=f32)
    gout = torch.empty(3, B, NC, C, device=dev, dtype=f32)
    gmax, gaa0, gbb0, gpp0 = (torch.empty(B, C, device=dev, dtype=f32) for _ in range(4))
    gk = torch.empty_like(k)
    gv = torch.empty_like(v)
    gpart = torch.empty(2, B, NC, C, device=dev, dtype=f32)
    kern.wkv4_bwd_local[grid](y, gy, logden, td, gloc, B, T, C, NC, L, BC=bc, num_warps=nw)
    kern.wkv4_bwd_scan[(-(-C // bcs), B)](
        gloc, gaaT, gbbT, gppT, aaT, bbT, ppT, idxT, aa0, bb0, pp0, td, gout, gmax, gaa0, gbb0, gpp0,
        B, T, C, NC, L, BC=bcs, num_warps=1,
    )  # fmt: skip
    kern.wkv4_bwd_out[grid](
        k, v, y, gy, logden, td, tf, gout, idxT, gmax, gk, gv, gpart, B, T, C, NC, L, BC=bc, num_warps=nw
    )
    sums = gpart.sum((1, 2))  # outputs of a custom op must not alias each other: copy the rows
    g_decay, g_first = sums[0].to(time_decay.dtype, copy=True), sums[1].to(time_first.dtype, copy=True)
    return g_decay, g_first, gk, gv, gaa0, gbb0, gpp0


@wkv4_bwd.register_fake
def _(
    time_decay,
    time_first,
    k,
    v,
    y,
    logden,
    aa0,
    bb0,
    pp0,
    aaT,
    bbT,
    ppT,
    idxT,
    gy,
    gaaT,
    gbbT,
    gppT,
    chunk,
    block,
):
    return (
        torch.empty_like(time_decay),
        torch.empty_like(time_first),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(aa0, dtype=torch.float32),
        torch.empty_like(bb0, dtype=torch.float32),
        torch.empty_like(pp0, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output):
    time_decay, time_first, k, v, aa, bb, pp, chunk, block = inputs
    y, aaT, bbT, ppT, logden, idxT = output
    ctx.save_for_backward(time_decay, time_first, k, v, y, logden, aa, bb, pp, aaT, bbT, ppT, idxT)
    ctx.chunk, ctx.block = chunk, block
    ctx.state_dtypes = (aa.dtype, bb.dtype, pp.dtype)


def _backward(ctx, gy, gaaT, gbbT, gppT, _glogden, _gidx):
    time_decay, time_first, k, v, y, logden, aa, bb, pp, aaT, bbT, ppT, idxT = ctx.saved_tensors
    gy = torch.zeros_like(y) if gy is None else gy
    gaaT, gbbT, gppT = (torch.zeros_like(aaT) if g is None else g for g in (gaaT, gbbT, gppT))
    g = wkv4_bwd(
        time_decay,
        time_first,
        k,
        v,
        y,
        logden,
        aa,
        bb,
        pp,
        aaT,
        bbT,
        ppT,
        idxT,
        gy,
        gaaT,
        gbbT,
        gppT,
        ctx.chunk,
        ctx.block,
    )
    g_decay, g_first, gk, gv, gaa0, gbb0, gpp0 = g
    da, db, dp = ctx.state_dtypes
    return g_decay, g_first, gk, gv, gaa0.to(da), gbb0.to(db), gpp0.to(dp), None, None


wkv4_fwd.register_autograd(_backward, setup_context=_setup_context)


def wkv4_triton(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    state: WKV4State,
    chunk: int | None = None,
    block: int | None = None,
) -> tuple[Tensor, WKV4State]:
    """The Triton WKV-4: y (B, T, C) in k's dtype and the fp32 state after the last step.

    Same contract as `wkv4_reference`. Tuning knobs (for benchmarks): `chunk` overrides the
    chunk length L (default `default_chunk`), `block` the channels per program on CUDA.
    """
    aa, bb, pp = state
    _check(time_decay, time_first, k, v, aa)
    T = k.shape[1]
    if T == 0:  # nothing to walk; the reference handles the empty sequence exactly
        y, aa, bb, pp = WKV4Reference.apply(time_decay, time_first, k, v, aa, bb, pp)
        return y, WKV4State(aa, bb, pp)
    L = min(int(chunk) if chunk else default_chunk(T), T)
    y, aaT, bbT, ppT, _, _ = wkv4_fwd(time_decay, time_first, k, v, aa, bb, pp, L, int(block or 0))
    return y, WKV4State(aaT, bbT, ppT)


def check_problem(dtype: torch.dtype, device: torch.device | str, C: int) -> list[Tensor]:
    """A small random WKV-4 problem: B=2, T=37, k, v ~ N(0, 1) in `dtype`, time_decay ~ U(-5, 3),
    time_first ~ U(-2, 1), and a carried state as a previous segment leaves it (all float32)."""
    gen = generator()
    B, T = 2, 37
    time_decay = torch.rand(C, generator=gen) * 8 - 5
    time_first = torch.rand(C, generator=gen) * 3 - 2
    k, v = torch.randn(B, T, C, generator=gen), torch.randn(B, T, C, generator=gen)
    pp = torch.randn(B, C, generator=gen) + 1.0
    bb = torch.rand(B, C, generator=gen) * 3 + 0.5
    aa = torch.randn(B, C, generator=gen) * bb
    xs = [time_decay, time_first, k.to(dtype), v.to(dtype), aa, bb, pp]
    return [x.to(device) for x in xs]


def self_check(key: CheckKey) -> str | None:
    """The Triton kernels against the chunked op on `check_problem` (see `ops/self_check.py`)."""
    from rwkv_infctx.ops.wkv4.chunked import wkv4_chunked

    def flat(op):
        def run(time_decay, time_first, k, v, aa, bb, pp):
            y, state = op(time_decay, time_first, k, v, WKV4State(aa, bb, pp))
            return (y, *state)

        return run

    return compare(
        flat(wkv4_triton),
        flat(wkv4_chunked),
        check_problem(key.dtype, key.device, key.size),
        ("time_decay", "time_first", "k", "v", "aa", "bb", "pp"),
        ("y", "aa_T", "bb_T", "pp_T"),
        TOLERANCE.get(key.dtype, TOLERANCE[torch.float32]),
    )
