"""WKV-7 reference: the definition of the op in plain PyTorch, one token at a time.

Shape legend: B batch, T time, H heads, N head size (64 in every released model).

Per head, the state S is an N×N matrix with rows indexed by value and columns by key (RWKV-LM's
layout). With the decay d_t = exp(-exp(w_t)) ∈ (0, 1) per key channel:

    S_t = S_{t-1} · (diag(d_t) + a_t b_tᵀ) + v_t k_tᵀ
    y_t = S_t r_t

i.e. S_t[i, j] = S_{t-1}[i, j]·d_t[j] + (Σ_l S_{t-1}[i, l]·a_t[l])·b_t[j] + v_t[i]·k_t[j].
The RWKV-7 block passes w = the soft-clamped decay logit, a = -κ̂ and b = κ̂·a (κ̂ the normalised
removal key, a the in-context learning rate), so that the state first forgets (d), then removes
the old value stored at κ̂ (a, b), then writes v at k.

This is a per-token loop differentiated by autograd: slow, and its graph grows with T, so it is
for tests and debugging only (`wkv_backend: reference`). It uses elementwise ops only (no matmul), so
a FLOP counter sees none of its work (`training/wkv_flops.py`). It runs in any dtype: float64 inputs are
computed in float64, everything else in float32 (the state is float32 in every model dtype).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*xs: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (the WKV-7 state's dtype)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def wkv7_reference(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Run WKV-7 over (B, T, H, N) inputs from `state` (B, H, N, N) [value, key].

    Returns y (B, T, H, N) in r's dtype and the final state (B, H, N, N) in the compute dtype
    (float32, or float64 for float64 inputs).
    """
    dt = compute_dtype(r, w, k, v, a, b, state)
    out_dtype = r.dtype
    r, w, k, v, a, b = (x.to(dt) for x in (r, w, k, v, a, b))
    decay = torch.exp(-torch.exp(w))
    S = state.to(dt)
    ys = []
    for t in range(r.shape[1]):
        removed = (S * a[:, t, :, None, :]).sum(-1)  # S a: what the state holds at κ̂
        S = (
            S * decay[:, t, :, None, :]
            + removed[..., :, None] * b[:, t, :, None, :]
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        )
        ys.append((S * r[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(r.shape)
    return y.to(out_dtype), S
