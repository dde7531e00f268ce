"""WKV-7 with state: the dispatch point between the PyTorch reference and fast ops.

`wkv7(r, w, k, v, a, b, state, backend=...)` returns `(y, new_state)`; `reference.py` holds the
definition. Inputs are (B, T, H, N); the state is (B, H, N, N) float32 with rows indexed by value
and columns by key, the layout of RWKV-LM and the `rwkv` package.

Backends: "reference" (the per-token definition, autograd through a loop: tests and debugging),
"chunked" (`chunked.py`: one autograd node with a hand-written backward, chunked over T; the CPU
op for training) and "auto" (the chunked op).
"""

from __future__ import annotations

from torch import Tensor

from rwkv_infctx.ops.wkv7.reference import wkv7_reference

BACKENDS = ("auto", "reference", "chunked")

__all__ = ["BACKENDS", "wkv7", "wkv7_reference"]


def wkv7(
    r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Run WKV-7 from `state`; see `reference.py` for the definition and shapes."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return wkv7_reference(r, w, k, v, a, b, state)
    from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked

    return wkv7_chunked(r, w, k, v, a, b, state)
