"""WKV-4 and WKV-7 kernels at the issue's shapes: forward + backward with state gradients, bf16.

Rows per (B, T, C): our Triton WKV-4 against the fp32 reference (`WKV4Reference`, the per-token
definition), fla's WKV-7 (`wkv_backend: fla`) and our chunked WKV-7 op, both against the chunked op
in fp32. Each side gets the same bf16-rounded inputs and the same random weight on every output;
the error is the worst max |fast - reference| / max |reference| over y, the final state and the
gradient of every input, the initial state's included. Time: median f+b ms (CUDA events), beside
the H200 anchor of ../shared/RWKV7.md §6 (fla's chunk_rwkv7; RWKV-LM's RWKV-4 CUDA kernel).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .table import Row, fmt, free_memory, guarded, median_ms

SHAPES = [(1, 4096, 2048), (8, 4096, 2048), (1, 4096, 4096)]
QUICK_SHAPES = [(1, 64, 128)]
ANCHOR_MS = {  # RWKV7.md §6, H200, bf16, f+b with the initial state's gradient
    "WKV-7": {(1, 4096, 2048): 3.09, (8, 4096, 2048): 12.9, (1, 4096, 4096): 4.47},
    "WKV-4": {(1, 4096, 2048): 2.48, (8, 4096, 2048): 2.80, (1, 4096, 4096): 2.55},
}
ANCHOR_NAME = {"WKV-7": "fla chunk_rwkv7", "WKV-4": "RWKV-LM CUDA kernel"}
TOLERANCE = 2e-2  # bf16 against fp32, as the self-checks (ops/self_check.py)
HEAD = 64


def wkv4_inputs(B: int, T: int, C: int, device: torch.device) -> list[Tensor]:
    """time_decay ~ U(-5, 3), time_first ~ U(-2, 1), k, v ~ N(0, 1) in bf16, a carried fp32 state."""
    g = torch.Generator(device=device).manual_seed(1)

    def rand(*s: int) -> Tensor:
        return torch.rand(*s, generator=g, device=device)

    def randn(*s: int) -> Tensor:
        return torch.randn(*s, generator=g, device=device)

    bb = rand(B, C) * 3 + 0.5
    xs = [rand(C) * 8 - 5, rand(C) * 3 - 2, randn(B, T, C), randn(B, T, C), randn(B, C) * bb, bb]
    xs.append(randn(B, C) + 1.0)
    xs[2], xs[3] = xs[2].bfloat16(), xs[3].bfloat16()
    return xs


def wkv7_inputs(B: int, T: int, C: int, device: torch.device) -> list[Tensor]:
    """As the block makes them (fla_kernel.check_problem at scale): r, k, v ~ N(0, 1), a = -κ̂,
    b = κ̂·σ(·) in bf16; w soft-clamped and a non-zero S0 in fp32."""
    g = torch.Generator(device=device).manual_seed(2)
    H, N = C // HEAD, HEAD

    def randn(*s: int) -> Tensor:
        return torch.randn(*s, generator=g, device=device)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    w = -torch.nn.functional.softplus(-(randn(B, T, H, N) - 1.0)) - 0.5
    kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
    a = torch.sigmoid(randn(B, T, H, N))
    bf = torch.bfloat16
    return [r.to(bf), w, k.to(bf), v.to(bf), (-kk).to(bf), (kk * a).to(bf), 0.5 * randn(B, H, N, N)]


def wkv4_ops() -> tuple[Callable, Callable]:
    """(Triton kernel, the per-token reference), each flat: inputs in, (y, aa, bb, pp) out."""
    from rwkv_infctx.ops.wkv4.reference import WKV4Reference, WKV4State
    from rwkv_infctx.ops.wkv4.triton_kernel import wkv4_triton

    def fast(td, tf, k, v, aa, bb, pp):
        y, s = wkv4_triton(td, tf, k, v, WKV4State(aa, bb, pp))
        return (y, *s)

    return fast, WKV4Reference.apply


def wkv7_ops(backend: str) -> tuple[Callable, Callable]:
    """(fla's kernel or the chunked op, the chunked op; the reference is given fp32 inputs)."""
    from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked

    if backend == "fla":
        from rwkv_infctx.ops.wkv7.fla_kernel import wkv7_fla as fast
    else:
        fast = wkv7_chunked

    return fast, wkv7_chunked


def outputs_and_grads(op: Callable, inputs: Sequence[Tensor], weights: Sequence[Tensor]):
    """op's outputs and the gradients of every input for the loss Σ weight·output."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    outs = list(op(*xs))
    loss = sum((o.float() * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs] + [g.detach() for g in grads]


def worst_error(got: Sequence[Tensor], want: Sequence[Tensor], names: Sequence[str]) -> tuple[float, str]:
    from rwkv_infctx.ops.self_check import relative_difference

    errs = [(relative_difference(a, b), n) for a, b, n in zip(got, want, names, strict=True)]
    return max(errs, key=lambda e: (e[0] != e[0], e[0]))  # NaN counts as the worst


def kernel_row(family: str, backend: str, shape: tuple[int, int, int], device, reps: int) -> list[Row]:
    """Error against the reference, then the f+b time, of one kernel at one shape."""
    B, T, C = shape
    if family == "WKV-4":
        inputs, (fast, ref) = wkv4_inputs(B, T, C, device), wkv4_ops()
        names = ["y", "aa_T", "bb_T", "pp_T", "d_decay", "d_first", "dk", "dv", "daa", "dbb", "dpp"]
    else:
        inputs, (fast, ref) = wkv7_inputs(B, T, C, device), wkv7_ops(backend)
        names = ["y", "S_T", "dr", "dw", "dk", "dv", "da", "db", "dS0"]
    n_out = len(names) - len(inputs)
    g = torch.Generator(device=device).manual_seed(3)
    with torch.no_grad():
        outs = fast(*inputs)
    weights = [torch.randn(o.shape, generator=g, device=device) for o in outs[:n_out]]
    want = outputs_and_grads(ref, [x.float() for x in inputs], weights)  # fp32 on the rounded inputs
    got = outputs_and_grads(fast, inputs, weights)
    err, worst = worst_error(got, want, names)
    del want, got, outs
    free_memory()
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    grads_out = [w.to(o.dtype) for w, o in zip(weights, fast(*inputs), strict=True)]

    def fb() -> None:
        torch.autograd.grad(list(fast(*leaves)), leaves, grads_out)

    ms = median_ms(fb, device, reps)
    anchor = ANCHOR_MS[family].get(shape)
    ok = err <= TOLERANCE
    return [
        Row(
            "kernel f+b bf16",
            f"{family} {backend} {shape}",
            status="ok" if ok else f"FAIL > {TOLERANCE:.0e}",
            error=f"{err:.1e} ({worst})",
            time=f"{ms:.2f} ms",
            anchor=f"{fmt(anchor, '.2f')} ms ({ANCHOR_NAME[family]})" if anchor else "",
            note=f"{anchor / ms:.2f}x the anchor's speed" if anchor else "",
        )
    ]


CASES = [("WKV-4", "triton"), ("WKV-7", "fla"), ("WKV-7", "chunked")]


def rows(device: torch.device, quick: bool) -> list[Row]:
    """Every case at every shape; without CUDA each row says so."""
    out: list[Row] = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        for family, backend in CASES:
            case = f"{family} {backend} {shape}"
            if device.type != "cuda":
                out.append(Row("kernel f+b bf16", case, status="skipped: no CUDA"))
                continue
            reps = 3 if quick else 10
            out += guarded(
                "kernel f+b bf16",
                case,
                lambda f=family, b=backend, s=shape, n=reps: kernel_row(f, b, s, device, n),
            )
    return out
