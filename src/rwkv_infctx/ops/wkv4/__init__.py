"""WKV-4 with state: the dispatch point between the PyTorch reference and fast kernels.

`wkv4(time_decay, time_first, k, v, state, backend=...)` returns `(y, new_state)`.
Backends: "reference" (plain PyTorch, the definition), "triton" (the chunked Triton kernels of
`triton_kernel.py`; on a machine without CUDA they run under Triton's CPU interpreter, for tests),
"chunked" (`chunked.py`: the same op in PyTorch tensor ops, chunked over T; fast on the CPU) and
"auto": CUDA tensors in fp32/bf16/fp16 go to the Triton kernels when triton imports, other CUDA
tensors to the reference, and everything else (the CPU) to "chunked". Triton is imported lazily,
never at package import.

The Triton kernels check themselves at first use per (dtype, device, channels) against the chunked
op (`ops/self_check.py`); `self_check` ("warn", "error" or "off") says what a failure does ("warn":
one warning, then the chunked op).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_infctx.ops.self_check import fast_kernel_allowed
from rwkv_infctx.ops.wkv4.reference import FRESH_MAX, WKV4State, fresh_wkv4_state, wkv4_reference

BACKENDS = ("auto", "reference", "triton", "chunked")

__all__ = ["BACKENDS", "FRESH_MAX", "WKV4State", "fresh_wkv4_state", "wkv4", "wkv4_reference"]


def wkv4(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    state: WKV4State,
    backend: str = "auto",
    self_check: str = "warn",
) -> tuple[Tensor, WKV4State]:
    """Run WKV-4 over (B, T, C) keys and values from `state`; see `reference.py` for the definition."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "triton" or (
        backend == "auto" and k.is_cuda and k.dtype in _TRITON_DTYPES and _triton_importable()
    ):
        from rwkv_infctx.ops.wkv4 import triton_kernel

        if fast_kernel_allowed("WKV-4", "triton", k, self_check, triton_kernel.self_check):
            return triton_kernel.wkv4_triton(time_decay, time_first, k, v, state)
        backend = "chunked"  # it failed its check: the chunked op instead
    if backend == "chunked" or (backend == "auto" and not k.is_cuda):
        from rwkv_infctx.ops.wkv4.chunked import wkv4_chunked  # the fast CPU op, same results

        return wkv4_chunked(time_decay, time_first, k, v, state)
    return wkv4_reference(time_decay, time_first, k, v, state)


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_triton_ok: bool | None = None


@torch.compiler.assume_constant_result  # a constant to torch.compile: no graph break at dispatch
def _triton_importable() -> bool:
    global _triton_ok
    if _triton_ok is None:
        try:
            import triton  # noqa: F401

            _triton_ok = True
        except Exception:  # not installed, or broken (no driver): the reference still works
            _triton_ok = False
    return _triton_ok
