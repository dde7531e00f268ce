"""RWKV-7 1.5B and RWKV-4 1.5B, B=1, exact segmented BPTT (`bptt_step`) over 4k and 64k tokens.

Per family: one correctness row (segmented against unsegmented autograd gradients of a small model
in fp32 on the same fast kernels, ≤ 1e-4 relative over all parameters), then one row per sample
length and `boundary_states` place ("device", "cpu"): bf16 weights and gradients, 4096-token
segments, grad_cp off, forward + backward with no optimizer step. One warm-up step (compiles, the
kernels' self-checks), then the median of the timed steps: tokens/s, MFU (the trainer's:
3 × the family's forward FLOPs per token over the card's bf16 peak, `training/throughput.py`) and
peak memory (torch.cuda.max_memory_allocated over the timed steps, weights included).
"""

from __future__ import annotations

import statistics
import time

import torch

from . import models
from .table import Row, fmt, free_memory, guarded, sync

FAMILIES = ("rwkv7", "rwkv4")
TITLE = {"rwkv7": "RWKV-7", "rwkv4": "RWKV-4"}
CTX_LEN, LENGTHS = 4096, (4096, 65536)
QUICK_CTX_LEN, QUICK_LENGTHS = 32, (32, 128)
TOL_FP32 = 1e-4


def correctness_row(family: str, device: torch.device, quick: bool, backend: str) -> list[Row]:
    """Segmented vs unsegmented gradients, fp32 (TF32 off), L4 C512 V2048 T=2048 in 4 segments."""
    if quick:
        cfg, T, ctx = models.config(family, True, backend), 96, 32
    else:
        cls = type(models.config(family, True, backend))
        cfg, T, ctx = cls(n_layer=4, n_embd=512, vocab_size=2048, wkv_backend=backend), 2048, 512
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = models.build_model(cfg, device, torch.float32, seed=1)
        batch = models.random_batch(cfg.vocab_size, T, device, seed=1)
        models.whole_step(model, batch)
        ref = models.grads(model)
        model.zero_grad(set_to_none=True)
        models.segmented_step(model, batch, ctx)
        glob, worst, worst_name, bad = models.grad_errors(models.grads(model), ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    ok = not bad and glob <= TOL_FP32
    status = (
        "ok" if ok else f"FAIL (tol {TOL_FP32:.0e}{'; not finite: ' + ', '.join(bad[:3]) if bad else ''})"
    )
    case = f"{TITLE[family]} segmented vs whole, L{cfg.n_layer} C{cfg.n_embd} T={T} in {T // ctx}, fp32"
    return [Row("bptt grads", case, status, f"{glob:.1e} (worst {worst:.1e} {worst_name})")]


def wkv_used(family: str, backend: str, device: torch.device) -> str:
    """Which WKV op the bf16 model's steps ran (after a step: `auto` may have fallen back)."""
    from rwkv_infctx.ops import self_check

    if backend != "auto" or device.type != "cuda":
        return backend
    fast = {"rwkv7": ("WKV-7", "fla"), "rwkv4": ("WKV-4", "triton")}[family]
    if family == "rwkv7":
        from rwkv_infctx.ops.wkv7.fla_kernel import fla_available

        if not fla_available():
            return "chunked (fla not installed)"
    failed = [
        p
        for k, p in self_check._verdicts.items()
        if (k.family, k.backend, k.dtype) == (*fast, torch.bfloat16) and p is not None
    ]
    return f"chunked ({fast[1]} failed its self-check)" if failed else fast[1]


def timed_steps(model, batch, ctx: int, place: str, device, warmup: int, reps: int) -> dict:
    """Warm-up, then `reps` timed segmented steps: median seconds, peak GiB, loss, boundary bytes."""
    for _ in range(warmup):
        model.zero_grad(set_to_none=True)
        models.segmented_step(model, batch, ctx, boundary=place)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        model.zero_grad(set_to_none=True)
        sync(device)
        t = time.perf_counter()
        loss, nbytes = models.segmented_step(model, batch, ctx, boundary=place)
        sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "peak": peak, "loss": loss, "bytes": nbytes}


def family_rows(family: str, device: torch.device, quick: bool, backend: str, budget) -> list[Row]:
    """The timed rows of one family (the model is built once, bf16)."""
    cfg = models.config(family, quick, backend)
    model = models.build_model(cfg, device, torch.bfloat16)
    n = model.num_params()
    peak_tflops = models.throughput.device_peak_tflops(device)
    ctx, lengths = (QUICK_CTX_LEN, QUICK_LENGTHS) if quick else (CTX_LEN, LENGTHS)
    out = []
    for T in lengths:
        batch = models.random_batch(cfg.vocab_size, T, device, seed=T)
        for place in ("device", "cpu"):
            case = f"{TITLE[family]} {n / 1e9:.3g}B B=1 T={T} ({T // ctx} x {ctx}), boundary_states {place}"
            if budget() <= 0:
                out.append(Row("bptt step bf16", case, status="skipped: time budget"))
                continue

            def one(T=T, place=place, batch=batch, case=case) -> list[Row]:
                r = timed_steps(model, batch, ctx, place, device, 0 if quick else 1, 1 if quick else 2)
                tok_s = T / r["step_s"]
                m = models.mfu(model, tok_s, peak_tflops)
                return [
                    Row(
                        "bptt step bf16",
                        case,
                        status="ok" if r["loss"] == r["loss"] else "FAIL: non-finite loss",
                        time=f"{tok_s / 1e3:.2f}k tok/s",
                        mfu="n/a" if m is None else f"{100 * m:.1f}%",
                        peak=fmt(r["peak"], ".2f"),
                        note=f"WKV {wkv_used(family, backend, device)}; step {r['step_s']:.2f} s; "
                        f"boundary states {r['bytes'] / 2**20:.1f} MiB",
                    )
                ]

            out += guarded("bptt step bf16", case, one)
            model.zero_grad(set_to_none=True)
        del batch
        free_memory()
    return out


def rows(device: torch.device, quick: bool, budget) -> list[Row]:
    """Both families: correctness, then the timed steps; `budget()` is the seconds left."""
    backend = "auto" if device.type == "cuda" else "chunked"
    out: list[Row] = []
    for family in FAMILIES:
        case = f"{TITLE[family]} segmented vs whole"
        out += guarded("bptt grads", case, lambda f=family: correctness_row(f, device, quick, backend))
        out += guarded(
            "bptt step bf16",
            f"{TITLE[family]} 1.5B",
            lambda f=family: family_rows(f, device, quick, backend, budget),
            echo=False,  # its rows were echoed one by one,
        )
    return out
