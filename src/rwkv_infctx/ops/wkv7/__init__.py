"""WKV-7 with state: the dispatch point between the PyTorch reference and fast ops.

`wkv7(r, w, k, v, a, b, state, backend=..., self_check=...)` returns `(y, new_state)`;
`reference.py` holds the definition. Inputs are (B, T, H, N); the state is (B, H, N, N) float32 with
rows indexed by value and columns by key, the layout of RWKV-LM and the `rwkv` package.

Backends: "reference" (the per-token definition, autograd through a loop: tests and debugging),
"chunked" (`chunked.py`: one autograd node with a hand-written backward, chunked over T; any device),
"cpu" (`cpu_kernel.py`: the recurrence as C compiled at first use, float32; the CPU op for training),
"fla" (`fla_kernel.py`: flash-linear-attention's Triton kernel, the GPU op; needs the `gpu` extra) and
"auto": fla for CUDA tensors when fla imports; on the CPU the C kernel when a C compiler builds it
and the inputs are not float64; else the chunked op.

The fast kernels (fla, cpu) check themselves at first use per (dtype, device, head size) against the
chunked op (`ops/self_check.py`); `self_check` ("warn", "error" or "off") says what a failure does.
Under "auto" a machine without a C compiler simply uses the chunked op; "cpu" chosen explicitly
there stops with one line.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rwkv_infctx.errors import UserError
from rwkv_infctx.ops.self_check import fast_kernel_allowed
from rwkv_infctx.ops.wkv7 import cpu_kernel
from rwkv_infctx.ops.wkv7.reference import wkv7_reference

BACKENDS = ("auto", "reference", "chunked", "cpu", "fla")

__all__ = ["BACKENDS", "wkv7", "wkv7_reference"]


def wkv7(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor,
    backend: str = "auto",
    self_check: str = "warn",
) -> tuple[Tensor, Tensor]:
    """Run WKV-7 from `state`; see `reference.py` for the definition and shapes."""
    if backend not in BACKENDS:
        raise ValueError(f"wkv backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return wkv7_reference(r, w, k, v, a, b, state)
    if backend == "fla" or (backend == "auto" and r.is_cuda and _fla_importable()):
        from rwkv_infctx.ops.wkv7 import fla_kernel as fla

        if fast_kernel_allowed("WKV-7", "fla", r, self_check, fla.self_check):
            return fla.wkv7_fla(r, w, k, v, a, b, state)
    elif backend == "cpu" or (backend == "auto" and cpu_kernel.supports(r, state) and _cpu_kernel_builds()):
        if backend == "cpu":
            _check_cpu_backend(r, state)
        if fast_kernel_allowed("WKV-7", "cpu", r, self_check, cpu_kernel.self_check):
            return cpu_kernel.wkv7_cpu(r, w, k, v, a, b, state)
    from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked

    return wkv7_chunked(r, w, k, v, a, b, state)


_fla_ok: bool | None = None


@torch.compiler.assume_constant_result  # a constant to torch.compile: no graph break at dispatch
def _fla_importable() -> bool:
    """Whether fla is installed (the import itself, and whether it works, is the self-check's)."""
    global _fla_ok
    if _fla_ok is None:
        from rwkv_infctx.ops.wkv7.fla_kernel import fla_available

        _fla_ok = fla_available()
    return _fla_ok


@torch.compiler.assume_constant_result  # a constant to torch.compile: no graph break at dispatch
def _cpu_kernel_builds() -> bool:
    """Whether the C kernel is built, or builds now (once per process; see `cpu_kernel`)."""
    return cpu_kernel.available()


def _check_cpu_backend(r: Tensor, state: Tensor) -> None:
    """UserError unless the explicitly chosen "cpu" backend can run these inputs here."""
    if not cpu_kernel.supports(r, state):
        raise UserError(
            f"model.wkv_backend: cpu takes CPU tensors, not float64, head size <= {cpu_kernel.MAX_N} "
            f"(got {r.dtype}, {r.device}, head size {r.shape[-1]}); use auto or chunked"
        )
    if not cpu_kernel.available():
        reason = cpu_kernel.unavailable_reason()
        raise UserError(f"model.wkv_backend: cpu: {reason} (auto and chunked run without a compiler)")
