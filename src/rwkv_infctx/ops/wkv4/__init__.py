"""WKV-4 with state: the dispatch point between the PyTorch reference and fast kernels.

`wkv4(time_decay, time_first, k, v, state, backend=...)` returns `(y, new_state)`.
Backends: "reference" (plain PyTorch, the definition) and "auto" (the fastest available for the
tensors' device; today that is the reference everywhere).
"""

from __future__ import annotations

from torch import Tensor

from rwkv_infctx.ops.wkv4.reference import FRESH_MAX, WKV4State, fresh_wkv4_state, wkv4_reference

BACKENDS = ("auto", "reference")

__all__ = ["BACKENDS", "FRESH_MAX", "WKV4State", "fresh_wkv4_state", "wkv4", "wkv4_reference"]


def wkv4(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    state: WKV4State,
    backend: str = "auto",
) -> tuple[Tensor, WKV4State]:
    """Run WKV-4 over (B, T, C) keys and values from `state`; see `reference.py` for the definition."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return wkv4_reference(time_decay, time_first, k, v, state)
