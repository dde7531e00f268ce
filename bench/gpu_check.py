"""GPU check of the Triton WKV-4 kernels: correctness against the reference, timings, bytes floor.

On a CUDA machine, from the repository root (needs only torch and triton; imports src/ directly):

    python bench/gpu_check.py                 # everything, well under 5 minutes on an H100/H200
    python bench/gpu_check.py --no-sweep      # timings with the default chunk/block only (faster)
    python bench/gpu_check.py --parts c --out report.md   # part (c) only, report also to a file

Here, without a GPU (tiny sizes, CPU, Triton interpreter; checks the script itself):

    python bench/gpu_check.py --smoke

Part (a), correctness: fp32 kernel vs the fp64 reference (<= 1e-5 relative, max-abs-error over
max-abs-value, on y, the final state and all seven gradients, with a random loss on every output,
pp_T included); bf16/fp16 kernel vs the fp32 reference on the same rounded inputs (<= 2e-2, never NaN).
Part (b), timings: CUDA events, median of --reps runs, bf16 k and v, for forward, backward and
forward+backward (through autograd), at the four shapes of issue 5; the bytes floor (9 bf16 tensor
passes: k, v, y forward; k, v, y, gy, gk, gv backward) at the measured copy bandwidth; a sweep of
chunk length L and channel block; the same kernels with L = T (one thread per channel walking the
whole sequence, no parallelism over T) as an in-script per-channel baseline. Every case is caught and
reported on its own; the exit status is 1 if any correctness case failed or errored.
Measured ceilings (parts b and c): the copy bandwidth, the bf16 matmul rate at 8192^3 (median of 20)
and the card's nominal dense bf16 peak (a table by device name; n/a when unknown).
Part (c), the model end to end (bench/gpu_train_step.py): segmented exact BPTT (bptt_step) vs
unsegmented autograd gradients of an L4 C512 V2048 model at T=2048 in 4 segments (fp32: <= 1e-4;
fp32 weights under bf16 autocast, and bf16 weights: within 2x the bf16 noise floor, the unsegmented
bf16 gradients' error against fp32; both count as correctness failures); then a training step
(forward + backward, bf16 weights and grads, no optimizer) of a 1.5B-shaped RWKV-4 (L24, C2048,
V50277) at B=1 in settings (a) unsegmented T=4096 on the Triton WKV, (b) the same with a free WKV
stub, (c) with the per-channel kernel (L = T), (d) exact segmented BPTT of a 64k-token sample in
4096-token segments, grad_cp off and on, (e) as (d) with each block's att and ffn under
torch.compile: tokens/s, peak memory, MFU over the measured matmul rate and the nominal peak.

Expected times on an H100 (estimates: never run on a GPU yet): (a) 30-60 s (Triton compiles of
each dtype and chunk length dominate), (b) 60-100 s with the sweep, (c) 40-60 s without (e),
(e) 60-120 s (inductor compiles). --budget-s (default 285) bounds the whole run: part (b) stops
starting timings once fewer than 120 s of it are left when (c) is selected, and each setting of (c)
starts only with its estimated time left, so (e) runs only when (a) and (b) were quick (or with a
larger --budget-s, e.g. 480). --parts a,b,c selects parts; --out FILE also writes the report
(tracebacks excluded) to FILE, line by line.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

ISSUE_SHAPES = [(1, 4096, 2048), (8, 4096, 2048), (1, 4096, 4096), (8, 1024, 4096)]
# issue 5, measured on an H200 (torch 2.11): RWKV-LM v4 bf16 CUDA kernel f+b ms, and our goal in ms
ANCHOR_REF_MS = {(1, 4096, 2048): 2.48, (8, 4096, 2048): 2.80, (1, 4096, 4096): 2.55, (8, 1024, 4096): 0.84}
GOAL_MS = {(1, 4096, 2048): 0.25, (8, 4096, 2048): 0.70, (1, 4096, 4096): 0.35, (8, 1024, 4096): 0.30}
FLOOR_PASSES_FB = 9  # bf16 tensor passes of the f+b bytes floor (issue 5's table)
FLOOR_PASSES_F = 3
C_RESERVE_S = 120.0  # budget seconds kept for part (c) when it is selected


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the Triton interpreter")
    p.add_argument("--reps", type=int, default=20, help="timed runs per case (median reported)")
    p.add_argument("--no-sweep", action="store_true", help="time only the default chunk length and block")
    p.add_argument(
        "--budget-s",
        type=float,
        default=285.0,
        help="wall-clock budget of the run: later timings are skipped",
    )
    p.add_argument("--parts", default="a,b,c", help="comma-separated parts to run: a, b, c")
    p.add_argument("--out", default=None, help="also write the report (no tracebacks) to this file")
    args = p.parse_args()
    args.parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not args.parts <= {"a", "b", "c"}:
        p.error(f"--parts {','.join(sorted(args.parts))}: expected a comma-separated subset of a,b,c")
    return args


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402

from rwkv_infctx.ops.wkv4 import FRESH_MAX, WKV4State  # noqa: E402
from rwkv_infctx.ops.wkv4.reference import WKV4Reference  # noqa: E402
from rwkv_infctx.ops.wkv4.triton_kernel import (  # noqa: E402
    default_chunk,
    wkv4_bwd,
    wkv4_fwd,
    wkv4_triton,
)
from rwkv_infctx.training.throughput import peak_tflops_for_name  # noqa: E402

T_START = time.perf_counter()
DEV = torch.device("cpu" if ARGS.smoke else "cuda")
FAILURES: list[str] = []
if ARGS.out:
    Path(ARGS.out).write_text("")


def log(msg: str = "") -> None:
    print(msg, flush=True)
    if ARGS.out:  # line by line, so a run killed by a time limit still leaves its report
        with open(ARGS.out, "a") as f:
            f.write(msg + "\n")


def print_exc() -> None:
    """A short traceback (last frames, last 1500 characters) on stderr: long ones would push the
    tables out of a captured output tail."""
    print(traceback.format_exc(limit=-4)[-1500:], file=sys.stderr, flush=True)


def inputs(B, T, C, *, seed=0, fresh=False, device=DEV):
    """Issue 5's inputs: k, v ~ N(0,1), time_decay ~ U(-5,3), time_first ~ U(-2,1), a carried state."""
    g = torch.Generator().manual_seed(seed)
    td = torch.rand(C, generator=g) * 8 - 5
    tf = torch.rand(C, generator=g) * 3 - 2
    k = torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    pp = torch.randn(B, C, generator=g) + 1.0
    bb = torch.rand(B, C, generator=g) * 3 + 0.5
    aa = torch.randn(B, C, generator=g) * bb
    if fresh:
        aa, bb, pp = torch.zeros_like(aa), torch.zeros_like(bb), torch.full_like(pp, FRESH_MAX)
    return [t.to(device) for t in (td, tf, k, v, aa, bb, pp)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run_and_grad(fn, xs, weights):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    outs = fn(*xs)
    loss = sum((o.to(w.dtype) * w).sum() for o, w in zip(outs, weights, strict=True))
    grads = torch.autograd.grad(loss, xs)
    return [o.detach() for o in outs], list(grads)


def check_case(name, B, T, C, *, kdtype, ref_dtype, tol, fresh=False, seed=0, chunk=None):
    t0 = time.perf_counter()
    x = inputs(B, T, C, seed=seed, fresh=fresh)
    x[2], x[3] = x[2].to(kdtype), x[3].to(kdtype)
    xr = [t.to(ref_dtype) for t in x]  # the reference sees the same (rounded) k, v
    g = torch.Generator().manual_seed(seed + 1)
    shapes = [(B, T, C), (B, C), (B, C), (B, C)]
    weights = [torch.randn(s, generator=g, dtype=torch.float64).to(DEV) for s in shapes]
    ref_out, ref_grads = run_and_grad(WKV4Reference.apply, xr, [w.to(ref_dtype) for w in weights])

    def kern(td, tf, k, v, aa, bb, pp):
        y, s = wkv4_triton(td, tf, k, v, WKV4State(aa, bb, pp), chunk=chunk)
        return (y, *s)

    out, grads = run_and_grad(kern, x, [w.float() for w in weights])
    worst, worst_name, bad = 0.0, "", []
    names = [
        "y",
        "aa_T",
        "bb_T",
        "pp_T",
        "g_time_decay",
        "g_time_first",
        "g_k",
        "g_v",
        "g_aa",
        "g_bb",
        "g_pp",
    ]
    for n, a, b in zip(names, out + grads, ref_out + ref_grads, strict=True):
        if not torch.isfinite(a).all():
            bad.append(f"{n} not finite")
            continue
        # state gradients of a fresh state are exact zeros in the reference: compare absolutely
        r = a.abs().max().item() if b.abs().max() == 0 else rel(a, b)
        if r > worst:
            worst, worst_name = r, n
        if r > tol:
            bad.append(f"{n} {r:.2e}")
    ok = not bad
    if not ok:
        FAILURES.append(f"{name}: {', '.join(bad)}")
    log(
        f"| {name} | ({B}, {T}, {C}) | {str(kdtype).split('.')[-1]} vs {str(ref_dtype).split('.')[-1]} ref "
        f"| {worst:.2e} ({worst_name}) | {tol:.0e} | {'ok' if ok else 'FAIL: ' + '; '.join(bad)} "
        f"| {time.perf_counter() - t0:.1f} s |"
    )


def split_consistency(B, T, C, kdtype):
    """At full size: one call over T equals two calls carrying the state (forward), all finite (f+b)."""
    t0 = time.perf_counter()
    x = inputs(B, T, C, seed=5)
    x[2], x[3] = x[2].to(kdtype), x[3].to(kdtype)
    td, tf, k, v, aa, bb, pp = x
    with torch.no_grad():
        y, s = wkv4_triton(td, tf, k, v, WKV4State(aa, bb, pp))
        h = T // 3
        y1, s1 = wkv4_triton(td, tf, k[:, :h], v[:, :h], WKV4State(aa, bb, pp))
        y2, s2 = wkv4_triton(td, tf, k[:, h:], v[:, h:], s1)
    r_y = rel(torch.cat([y1, y2], 1).float(), y.float())
    r_s = max(rel(a, b) for a, b in zip(s2, s, strict=True))
    xs = [t.detach().clone().requires_grad_() for t in x]
    y, s = wkv4_triton(*xs[:4], WKV4State(*xs[4:]))
    (y.float().square().mean() + s.aa.sum() + s.bb.sum() + s.pp.sum() * 1e-3).backward()
    finite = all(torch.isfinite(t.grad).all().item() for t in xs) and torch.isfinite(y).all().item()
    tol = 1e-5 if kdtype == torch.float32 else 2e-2
    ok = r_y <= tol and r_s <= 1e-5 and finite
    if not ok:
        FAILURES.append(
            f"split-consistency ({B},{T},{C}) {kdtype}: y {r_y:.1e} state {r_s:.1e} finite {finite}"
        )
    dt = str(kdtype).split(".")[-1]
    log(
        f"| split at T/3 vs whole | ({B}, {T}, {C}) | {dt} | y {r_y:.1e}, state {r_s:.1e}"
        f" | grads finite: {finite} | {'ok' if ok else 'FAIL'} | {time.perf_counter() - t0:.1f} s |"
    )


def timer(fn, reps):
    """Median ms of fn() over reps runs (CUDA events on GPU, perf_counter on CPU), after warm-up."""
    for _ in range(2):
        fn()
    ts = []
    for _ in range(reps):
        if DEV.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def copy_bandwidth():
    """GB/s of a device-to-device copy, counting bytes read and written."""
    n = (1 << 28) if DEV.type == "cuda" else (1 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), 10)
    return 2 * n / (ms * 1e-3) / 1e9


def time_shape(B, T, C, chunk, block, reps):
    """(fwd ms, bwd ms, f+b ms, peak extra MiB) for bf16 k, v at one chunk length and block."""
    block = int(block or 0)
    x = inputs(B, T, C, seed=1)
    td, tf, k, v, aa, bb, pp = x
    k, v = k.bfloat16(), v.bfloat16()
    L = min(chunk, T)
    gy = torch.randn(B, T, C, device=DEV, dtype=torch.bfloat16)
    gs = [torch.randn(B, C, device=DEV) for _ in range(3)]
    y, aaT, bbT, ppT, logden, idxT = wkv4_fwd(td, tf, k, v, aa, bb, pp, L, block)
    bwd = functools.partial(
        wkv4_bwd, td, tf, k, v, y, logden, aa, bb, pp, aaT, bbT, ppT, idxT, gy, *gs, L, block
    )
    f_ms = timer(functools.partial(wkv4_fwd, td, tf, k, v, aa, bb, pp, L, block), reps)
    b_ms = timer(bwd, reps)
    del bwd, y, aaT, bbT, ppT, logden, idxT  # free before the f+b timing
    leaves = [t.requires_grad_() for t in (td, tf, k, v, aa, bb, pp)]

    def fb():
        y, s = wkv4_triton(*leaves[:4], WKV4State(*leaves[4:]), chunk=L, block=block)
        torch.autograd.grad([y, s.aa, s.bb, s.pp], leaves, [gy, *gs])  # no .grad accumulation

    if DEV.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    fb_ms = timer(fb, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if DEV.type == "cuda" else float("nan")
    return f_ms, b_ms, fb_ms, peak


def short(e: BaseException) -> str:
    """One line for a table cell (Triton compile errors run to pages)."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:200]}"


def part_a() -> None:
    """Correctness of the kernels against the reference; failures go to FAILURES."""
    log("## (a) Correctness (relative error = max |kernel - reference| / max |reference|, worst output)")
    log()
    log("| case | (B, T, C) | dtypes | worst rel. error | tol | result | time |")
    log("|---|---|---|---|---|---|---|")
    f32, f64, bf16, f16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
    if ARGS.smoke:
        cases = [
            ("fp32 carried state", (2, 37, 32), dict(kdtype=f32, ref_dtype=f64, tol=1e-5)),
            ("fp32 fresh state", (1, 20, 32), dict(kdtype=f32, ref_dtype=f64, tol=1e-5, fresh=True)),
            ("bf16", (1, 20, 32), dict(kdtype=bf16, ref_dtype=f32, tol=2e-2)),
        ]
    else:
        cases = [
            ("fp32 carried state", (2, 512, 256), dict(kdtype=f32, ref_dtype=f64, tol=1e-5)),
            ("fp32 carried state", (1, 4096, 64), dict(kdtype=f32, ref_dtype=f64, tol=1e-5)),
            ("fp32 odd sizes", (3, 1037, 97), dict(kdtype=f32, ref_dtype=f64, tol=1e-5, chunk=48)),
            ("fp32 fresh state", (2, 1024, 128), dict(kdtype=f32, ref_dtype=f64, tol=1e-5, fresh=True)),
            ("bf16", (2, 512, 256), dict(kdtype=bf16, ref_dtype=f32, tol=2e-2)),
            ("bf16", (1, 4096, 64), dict(kdtype=bf16, ref_dtype=f32, tol=2e-2)),
            ("fp16", (2, 512, 256), dict(kdtype=f16, ref_dtype=f32, tol=2e-2)),
        ]
    for i, (name, (B, T, C), kw) in enumerate(cases):
        try:
            check_case(name, B, T, C, seed=10 + i, **kw)
        except Exception as e:
            FAILURES.append(f"{name} ({B},{T},{C}): {short(e)}")
            log(f"| {name} | ({B}, {T}, {C}) | | | | ERROR {short(e)} | |")
            print_exc()
    for B, T, C in [(1, 100, 32)] if ARGS.smoke else [(8, 4096, 2048), (1, 4096, 4096)]:
        for kd in (f32, bf16):
            try:
                split_consistency(B, T, C, kd)
            except Exception as e:
                FAILURES.append(f"split-consistency ({B},{T},{C}): {short(e)}")
                log(f"| split | ({B}, {T}, {C}) | {kd} | ERROR {short(e)} | | | |")
                print_exc()
    log()


MATMUL_N, MATMUL_REPS = (256, 3) if ARGS.smoke else (8192, 20)


def matmul_tflops() -> float:
    """bf16 matmul rate in TFLOP/s at n^3 (n = 8192 on a GPU), median of 20 runs."""
    n = MATMUL_N
    a, b = (torch.randn(n, n, device=DEV, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    ms = timer(lambda: torch.matmul(a, b, out=c), MATMUL_REPS)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def ceilings() -> tuple[float | None, float | None, float | None]:
    """(copy GB/s, measured bf16 matmul TFLOP/s, nominal dense bf16 TFLOP/s), None where unknown."""
    res: list[float | None] = []
    for fn in (copy_bandwidth, matmul_tflops):
        try:
            res.append(fn())
        except Exception as e:
            log(f"{fn.__name__} failed: {short(e)}")
            print_exc()
            res.append(None)
    nominal = peak_tflops_for_name(torch.cuda.get_device_name()) if DEV.type == "cuda" else None
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)  # noqa: E731
    log("## Measured ceilings")
    log()
    mm = f"bf16 matmul TFLOP/s ({MATMUL_N}^3, median of {MATMUL_REPS})"
    log(f"| copy GB/s (read + write) | {mm} | nominal dense bf16 TFLOP/s |")
    log("|---|---|---|")
    log(f"| {fmt(res[0], '.4g')} | {fmt(res[1], '.4g')} | {fmt(nominal, '.0f')} |")
    log()
    log("issue 5's anchor (H200): 4277 GB/s, 694 TFLOP/s, nominal 989.")
    log()
    return res[0], res[1], nominal


def part_b(bw: float) -> None:
    """Kernel timings against the bytes floor; skipped settings are listed, not timed."""
    reps = 2 if ARGS.smoke else ARGS.reps
    stop_at = ARGS.budget_s - (C_RESERVE_S if "c" in ARGS.parts else 0.0)
    log(f"## (b) Timings (bf16 k, v; median of {reps}; copy bandwidth measured here: {bw:.0f} GB/s)")
    log()
    log(
        "floor = 9 bf16 passes over (B, T, C) for f+b (3 for fwd) at the copy bandwidth. This design moves "
        "about 38 B/element for f+b (k, v read twice; fp32 log-denominator written and read twice): "
        "see bench/wkv4_kernel.md."
    )
    log()
    shapes = [(1, 64, 32), (2, 64, 64)] if ARGS.smoke else ISSUE_SHAPES
    log("| (B, T, C) | L | block | fwd ms | bwd ms | f+b ms | f+b floor ms | % of floor | extra peak MiB |")
    log("|---|---|---|---|---|---|---|---|---|")
    best: dict = {}
    for B, T, C in shapes:
        n = B * T * C
        floor_fb = FLOOR_PASSES_FB * 2 * n / (bw * 1e9) * 1e3
        variants = [(default_chunk(T), None)]
        if not ARGS.smoke and not ARGS.no_sweep:
            variants += [(L, bl) for L in (32, 64, 128) for bl in (None, 64, 256) if (L, bl) != variants[0]]
        variants.append((T, 32))  # per-channel baseline: one chunk, one thread per channel over all T
        for L, bl in variants:
            if time.perf_counter() - T_START > stop_at:
                log(f"| ({B}, {T}, {C}) | {L} | {bl or 'default'} | skipped: time budget | | | | | |")
                continue
            try:
                f_ms, b_ms, fb_ms, peak = time_shape(B, T, C, L, bl, reps)
                tag = " (per-channel baseline)" if L == T else ""
                log(
                    f"| ({B}, {T}, {C}) | {L}{tag} | {bl or 'default'} | {f_ms:.3f} | {b_ms:.3f} "
                    f"| {fb_ms:.3f} | {floor_fb:.3f} | {100 * floor_fb / fb_ms:.1f}% | {peak:.0f} |"
                )
                if L != T and ((B, T, C) not in best or fb_ms < best[(B, T, C)][0]):
                    best[(B, T, C)] = (fb_ms, L, bl, f_ms)
            except Exception as e:
                log(f"| ({B}, {T}, {C}) | {L} | {bl or 'default'} | ERROR {short(e)} | | | | | |")
                print_exc()
    log()
    log("## (b) Summary against issue 5 (anchor: RWKV-LM v4 bf16 CUDA kernel, H200; compare only on an H200)")
    log()
    log("| (B, T, C) | best f+b ms | L | block | fwd ms | goal ms | met | anchor ref ms | vs anchor |")
    log("|---|---|---|---|---|---|---|---|---|")
    for shape, (fb_ms, L, bl, f_ms) in best.items():
        goal, anchor = GOAL_MS.get(shape), ANCHOR_REF_MS.get(shape)
        met = "n/a" if goal is None else ("yes" if fb_ms <= goal else "no")
        sp = f"{anchor / fb_ms:.1f}x" if anchor else "n/a"
        log(
            f"| {shape} | {fb_ms:.3f} | {L} | {bl or 'default'} | {f_ms:.3f} | {goal or 'n/a'} | {met} "
            f"| {anchor or 'n/a'} | {sp} |"
        )
    log()


def part_c(matmul: float | None, nominal: float | None) -> None:
    """The model end to end (bench/gpu_train_step.py), within what is left of the budget."""
    from gpu_train_step import Bench, run_part_c

    bench = Bench(DEV, ARGS.smoke, T_START + ARGS.budget_s, log, FAILURES, matmul, nominal)
    try:
        run_part_c(bench)
    except Exception as e:  # each row catches its own; this is a last resort
        FAILURES.append(f"part (c): {short(e)}")
        log(f"part (c) stopped: {short(e)}")
        print_exc()


def main() -> int:
    log(f"# WKV-4 Triton GPU check ({'SMOKE: CPU, Triton interpreter' if ARGS.smoke else 'CUDA'})")
    import triton

    log(f"torch {torch.__version__}, triton {triton.__version__}, python {sys.version.split()[0]}")
    if DEV.type == "cuda":
        if not torch.cuda.is_available():
            log("no CUDA device: run with --smoke on a CPU machine")
            return 2
        log(f"device: {torch.cuda.get_device_name()}")
    log(f"parts: {','.join(sorted(ARGS.parts))}; budget {ARGS.budget_s:.0f} s")
    log()
    if "a" in ARGS.parts:
        part_a()
    if ARGS.parts & {"b", "c"}:
        bw, matmul, nominal = ceilings()
        if "b" in ARGS.parts:
            if bw is None:
                log("## (b) skipped: no copy bandwidth")
            else:
                part_b(bw)
        if "c" in ARGS.parts:
            part_c(matmul, nominal)
    log(f"total time {time.perf_counter() - T_START:.0f} s")
    status = 0
    if FAILURES:
        log("CORRECTNESS FAILURES:")
        for f in FAILURES:
            log(f"  - {f}")
        status = 1
    else:
        log("all correctness checks passed")
    return status


if __name__ == "__main__":
    sys.exit(main())
