"""The first-use check of the fast WKV-7 kernels (fla's, our C kernel): a problem as the block
makes one, and the comparison with the chunked op (`ops/self_check.py` runs it and keeps the verdict)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rwkv_infctx.ops.self_check import TOLERANCE, CheckKey, compare, generator


def check_problem(dtype: torch.dtype, device: torch.device | str, N: int) -> list[Tensor]:
    """A small random WKV-7 problem as the block makes one: B=2, T=37 (two full 16-token chunks and
    a partial one), H=2, r/k/v ~ N(0, 1), w soft-clamped, κ̂ unit, a ∈ (0, 1), a non-zero S0.
    Inputs in `dtype` but w and S0, which are float32 as in the model."""
    gen = generator()
    B, T, H = 2, 37, 2

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.nn.functional.softplus(-(randn(B, T, H, N) - 1.0)) - 0.5
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    a = torch.sigmoid(randn(B, T, H, N))
    S0 = 0.5 * randn(B, H, N, N)
    xs = [r.to(dtype), w, k.to(dtype), v.to(dtype), (-kk).to(dtype), (kk * a).to(dtype), S0]
    return [x.to(device) for x in xs]


def check_against_chunked(kernel: Callable[..., tuple[Tensor, Tensor]], key: CheckKey) -> str | None:
    """`kernel` against the chunked op on `check_problem` for `key`: None when y, the final state and
    every gradient agree within the tolerance of key's dtype, else the first disagreement."""
    from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked

    return compare(
        kernel,
        wkv7_chunked,
        check_problem(key.dtype, key.device, key.size),
        ("r", "w", "k", "v", "a", "b", "S0"),
        ("y", "S_T"),
        TOLERANCE.get(key.dtype, TOLERANCE[torch.float32]),
    )
