"""WKV-4 reference: the definition of the op in plain PyTorch, sequential in T, vectorized over B, C.

Shape legend: B batch, T time, C channels (dim_att).

The recurrence, with w = -exp(time_decay) and u = time_first, over the true numerator and
denominator A, B (start: A_0, B_0 from the carried state):

    y_t = (A_{t-1} + e^{u + k_t} v_t) / (B_{t-1} + e^{u + k_t})
    A_t = e^{w} A_{t-1} + e^{k_t} v_t
    B_t = e^{w} B_{t-1} + e^{k_t}

A and B overflow quickly, so the state is kept log-stable as (aa, bb, pp) with A = aa·e^{pp},
B = bb·e^{pp}; pp is a running max of the exponents. A fresh state is aa = bb = 0 and
pp = -1e38 (the convention of RWKV-LM's kernels, HF transformers and ChatRWKV): e^{pp - p} is then
exactly 0 for any finite exponent p, and -1e38 stays finite in fp32, so w + pp never overflows to -inf.

The backward pass is written out by hand (a single autograd node, so checkpointed segments do not
keep per-step graphs alive). It returns exact gradients for time_decay, time_first, k, v and the
incoming state, including any gradient arriving on the outgoing running max pp_T: pp_T is
max(pp_0 + T·w, max_s k_s + (T-1-s)·w), and that gradient is routed to the arg-max.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

FRESH_MAX = -1e38
"""Initial running max `pp` of a fresh WKV-4 state."""


class WKV4State(NamedTuple):
    """One layer's WKV-4 state: numerator aa, denominator bb, running max pp; each (B, C) fp32."""

    aa: Tensor
    bb: Tensor
    pp: Tensor


def fresh_wkv4_state(batch: int, channels: int, device=None, dtype=torch.float32) -> WKV4State:
    zeros = torch.zeros(batch, channels, device=device, dtype=dtype)
    return WKV4State(zeros, zeros.clone(), torch.full_like(zeros, FRESH_MAX))


def _compute_dtype(k: Tensor) -> torch.dtype:
    return torch.float64 if k.dtype == torch.float64 else torch.float32


class WKV4Reference(torch.autograd.Function):
    """Autograd node for the sequential WKV-4 recurrence with state in and out."""

    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, aa, bb, pp):
        dt = _compute_dtype(k)
        B, T, C = k.shape
        w = -torch.exp(time_decay.to(dt))
        u = time_first.to(dt)
        k32, v32 = k.to(dt), v.to(dt)
        aa, bb, pp = aa.to(dt), bb.to(dt), pp.to(dt)
        y = torch.empty(B, T, C, device=k.device, dtype=dt)
        prev = torch.empty(3, B, T, C, device=k.device, dtype=dt)  # state before each step
        for t in range(T):
            kt, vt = k32[:, t], v32[:, t]
            prev[0, :, t], prev[1, :, t], prev[2, :, t] = aa, bb, pp
            ww = u + kt
            p = torch.maximum(pp, ww)
            e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
            y[:, t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
            ww = w + pp
            p = torch.maximum(ww, kt)
            e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
            aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
        if T == 0:  # outputs must not alias inputs
            aa, bb, pp = aa.clone(), bb.clone(), pp.clone()
        ctx.save_for_backward(time_decay, time_first, k32, v32, y, prev, aa, bb)
        ctx.in_dtypes = (time_decay.dtype, time_first.dtype, k.dtype, v.dtype)
        return y.to(k.dtype), aa, bb, pp

    @staticmethod
    def backward(ctx, gy, gaa, gbb, gpp):
        time_decay, time_first, k, v, y, prev, aa_T, bb_T = ctx.saved_tensors
        dt = k.dtype
        B, T, C = k.shape
        w = -torch.exp(time_decay.to(dt))
        u = time_first.to(dt)
        zeros = torch.zeros(B, C, device=k.device, dtype=dt)
        gy = torch.zeros_like(y) if gy is None else gy.to(dt)
        gaa = zeros if gaa is None else gaa.to(dt)
        gbb = zeros if gbb is None else gbb.to(dt)
        gpp = zeros if gpp is None else gpp.to(dt)
        # Gradient on pp_T beyond what flows through the true state A_T = aa_T e^{pp_T}, B_T = bb_T e^{pp_T}.
        g_max = gpp - gaa * aa_T - gbb * bb_T
        gk, gv = torch.empty_like(k), torch.empty_like(v)
        gw, gu = zeros.clone(), zeros.clone()
        for t in range(T - 1, -1, -1):
            kt, vt, yt, gyt = k[:, t], v[:, t], y[:, t], gy[:, t]
            aa, bb, pp = prev[0, :, t], prev[1, :, t], prev[2, :, t]
            # state update: pp_t = max(w + pp, k_t)
            ww = w + pp
            p = torch.maximum(ww, kt)
            e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
            to_prev = (ww > kt).to(dt) + 0.5 * (ww == kt).to(dt)
            gw += (gaa * aa + gbb * bb) * e1 + g_max * to_prev
            gkt = (gaa * vt + gbb) * e2 + g_max * (1 - to_prev)
            gvt = gaa * e2
            g_max = g_max * to_prev
            gaa, gbb = gaa * e1, gbb * e1
            # output y_t
            ww = u + kt
            p = torch.maximum(pp, ww)
            e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
            inv_den = 1.0 / (e1 * bb + e2)
            g_first = gyt * e2 * (vt - yt) * inv_den
            gu += g_first
            gk[:, t] = gkt + g_first
            gv[:, t] = gvt + gyt * e2 * inv_den
            gaa = gaa + gyt * e1 * inv_den
            gbb = gbb - gyt * yt * e1 * inv_den
        aa0, bb0 = (prev[0, :, 0], prev[1, :, 0]) if T > 0 else (aa_T, bb_T)
        gpp0 = gaa * aa0 + gbb * bb0 + g_max
        g_decay = (gw * w).sum(0)
        td_dtype, tf_dtype, k_dtype, v_dtype = ctx.in_dtypes
        return (
            g_decay.to(td_dtype),
            gu.sum(0).to(tf_dtype),
            gk.to(k_dtype),
            gv.to(v_dtype),
            gaa,
            gbb,
            gpp0,
        )


@torch.compiler.disable  # model.compile: the op stays eager (a graph break), its own backward kept
def wkv4_reference(
    time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, state: WKV4State
) -> tuple[Tensor, WKV4State]:
    """y (B, T, C) in k's dtype and the state after the last step, from the state before the first.

    time_decay, time_first: (C,), raw parameters (the recurrence uses w = -exp(time_decay)).
    k, v: (B, T, C). state: WKV4State of (B, C) tensors, float32 (float64 when k is float64).
    """
    y, aa, bb, pp = WKV4Reference.apply(time_decay, time_first, k, v, *state)
    return y, WKV4State(aa, bb, pp)
