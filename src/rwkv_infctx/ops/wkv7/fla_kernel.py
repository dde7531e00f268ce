"""WKV-7 through flash-linear-attention's `chunk_rwkv7` (PyPI `fla-core`, the `gpu` extra).

The mapping from our op (`reference.py`) to fla 0.6.0's `fla.ops.rwkv7.chunk_rwkv7`, each fact read
in fla's source (`fla/ops/rwkv7/chunk.py`, `generalized_delta_rule/dplr/chunk.py`) and measured on
the CPU under Triton's interpreter (tests/ops/test_wkv7_fla.py):

- tensors are [B, T, H, N] on both sides;
- fla keeps the state as [key, value] (its `initial_state`/final state [B, H, K, V]): ours is
  [value, key], so it goes in and comes out transposed;
- fla's w is the log-decay -exp(w) of our (soft-clamped) w; it is formed in float32, and fla only
  reads it through a float32 cumulative sum;
- a and b are ours as they are (the block passes a = -κ̂, b = κ̂·a);
- scale=1.0: r is not scaled (fla's default for the general delta rule is K^-½);
- `initial_state` with `output_final_state=True`; the final state comes back in float32 and its
  backward returns the initial state's gradient (dh0) in float32;
- `safe_gate` stays off (and no `lower_bound`, which would turn on the same scheme): it is about
  100× less exact (2e-3 on some gradients).

The carried S is float32 across segments whatever dtype the kernel computes in. fla is imported
lazily, on the first call, never at package import; it warns on every float32 call ("does not
support float32 on some platforms"), which the self-check is there to judge, so that warning is
silenced here.
"""

from __future__ import annotations

import importlib.util
import warnings

import torch
from torch import Tensor

from rwkv_infctx.ops.self_check import CheckKey
from rwkv_infctx.ops.wkv7.kernel_check import check_against_chunked, check_problem

# check_problem is read here by bench/gpu/selfchecks.py (each kernel module offers one)
__all__ = ["check_problem", "fla_available", "self_check", "wkv7_fla"]

_chunk_rwkv7 = None


def fla_available() -> bool:
    """Whether fla can be imported (without importing it)."""
    return importlib.util.find_spec("fla") is not None


def _kernel():
    global _chunk_rwkv7
    if _chunk_rwkv7 is None:
        with warnings.catch_warnings():  # fla warns at import on a machine without a Triton GPU
            warnings.simplefilter("ignore")
            from fla.ops.rwkv7 import chunk_rwkv7

        _chunk_rwkv7 = chunk_rwkv7
    return _chunk_rwkv7


def wkv7_fla(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor
) -> tuple[Tensor, Tensor]:
    """Same contract as `wkv7_reference`: y (B, T, H, N) in r's dtype and the final state
    (B, H, N, N) [value, key] in float32."""
    kernel = _kernel()
    dt = r.dtype
    log_decay = -w.to(torch.float32).exp()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not support float32", category=RuntimeWarning)
        y, S_T = kernel(
            r,
            log_decay,
            k.to(dt),
            v.to(dt),
            a.to(dt),
            b.to(dt),
            scale=1.0,
            initial_state=state.to(torch.float32).mT,
            output_final_state=True,
            safe_gate=False,
        )
    return y.to(dt), S_T.mT.contiguous()


def self_check(key: CheckKey) -> str | None:
    """fla against the chunked op on `check_problem` (see `ops/self_check.py`)."""
    return check_against_chunked(wkv7_fla, key)
