"""The first-use self-checks of both fast kernels (`ops/self_check.py`), run as the trainer runs them.

For each kernel (Triton WKV-4, fla WKV-7) and dtype (bf16, fp32) the row gives the verdict of the
kernel's own `self_check` (pass, or the disagreement it names), and, from the same problem
(`check_problem`) and the same comparison, the worst relative difference over y, the final state
and every gradient with the tolerance that applies (`self_check.TOLERANCE`).

fla's fp32 check is opt-in (`--fla-fp32`): its first use per dtype compiles and autotunes for about
4 minutes on an H200 (2026-12-04), and training runs bf16. On that H200 fla in fp32 failed the fp32
tolerance (y 9.2e-4 relative against 1e-4), so a float32 RWKV-7 run falls back to the chunked op.
"""

from __future__ import annotations

import importlib
import time

import torch

from .table import Row, guarded

KERNELS = [  # (family, backend, module, size: channels for WKV-4, head size for WKV-7)
    ("WKV-4", "triton", "rwkv_infctx.ops.wkv4.triton_kernel", 2048),
    ("WKV-7", "fla", "rwkv_infctx.ops.wkv7.fla_kernel", 64),
]


def _worst_difference(family: str, kernel, key) -> float:
    """The worst relative difference of the kernel against the chunked op on the check's problem."""
    from rwkv_infctx.ops import self_check as sc

    problem = kernel.check_problem(key.dtype, key.device, key.size)
    if family == "WKV-4":
        from rwkv_infctx.ops.wkv4.chunked import wkv4_chunked
        from rwkv_infctx.ops.wkv4.reference import WKV4State

        def flat(op):
            def run(td, tf, k, v, aa, bb, pp):
                y, state = op(td, tf, k, v, WKV4State(aa, bb, pp))
                return (y, *state)

            return run

        fast, chunked = flat(kernel.wkv4_triton), flat(wkv4_chunked)
    else:
        from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked

        fast, chunked = kernel.wkv7_fla, wkv7_chunked
    (f_out, f_grads), (c_out, c_grads) = sc._run(fast, problem), sc._run(chunked, problem)
    diffs = [sc.relative_difference(a, b) for a, b in zip(f_out + f_grads, c_out + c_grads, strict=True)]
    return max(diffs, key=lambda d: (d != d, d))


def check_row(family: str, backend: str, module: str, size: int, dtype: torch.dtype, device) -> list[Row]:
    from rwkv_infctx.ops import self_check as sc

    kernel = importlib.import_module(module)
    key = sc.CheckKey(family, backend, dtype, str(device), size)
    t0 = time.perf_counter()
    verdict = kernel.self_check(key)
    secs = time.perf_counter() - t0
    worst = _worst_difference(family, kernel, key)
    tol = sc.TOLERANCE[dtype]
    return [
        Row(
            "self-check",
            f"{key.describe()}",
            status="pass" if verdict is None else f"FAIL: {verdict}",
            error=f"{worst:.1e} (tol {tol:.0e})",
            time=f"{secs:.1f} s",
            note="first call includes compiling",
        )
    ]


def rows(device: torch.device, fla_fp32: bool = False) -> list[Row]:
    """bf16 and fp32 for the Triton WKV-4; bf16 for fla, fp32 too when `fla_fp32` (its first use per
    dtype compiles and autotunes for about 4 minutes on an H200)."""
    out: list[Row] = []
    for family, backend, module, size in KERNELS:
        dtypes = [torch.bfloat16] if backend == "fla" and not fla_fp32 else [torch.bfloat16, torch.float32]
        for dtype in dtypes:
            case = f"{family} {backend} {str(dtype).removeprefix('torch.')}"
            if device.type != "cuda":
                out.append(Row("self-check", case, status="skipped: no CUDA"))
                continue
            out += guarded(
                "self-check",
                case,
                lambda f=family, b=backend, m=module, s=size, d=dtype: check_row(f, b, m, s, d, device),
            )
    return out
