"""Part (c) of bench/gpu_check.py: the RWKV-4 model end to end on the GPU (torch only).

Shape legend: B batch, T time, V vocab_size.

Two things, each caught and reported row by row:

- `correctness_rows`: a small model's gradients from segmented exact BPTT (`bptt_step`) against
  plain autograd over the unsegmented sequence, same model, same precision, same objective
  (cross-entropy + L2Wrap, `training/loss.py`), in fp32, fp32 weights under bf16 autocast, and bf16
  weights. Relative error = max |seg - whole| / max |whole| over all parameters, and the worst
  single parameter.
- `training_rows`: one training step of a 1.5B-shaped RWKV-4 (L24, C2048, V50277) with bf16 weights
  and gradients: forward + backward, no optimizer. Tokens/s, peak memory and MFU = 6·N·tokens/s over
  the measured bf16 matmul rate and over the card's nominal dense bf16 peak.

The model is built on the meta device and materialised on the GPU with `cheap_init` (small random
weights, time_decay ~ U(-5, 3), time_first ~ U(-2, 1)): no 1.5B-parameter CPU initialisation.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.ops import wkv4 as wkv4_ops
from rwkv_infctx.training import throughput
from rwkv_infctx.training.loss import objective, segment_terms, token_count
from rwkv_infctx.training.segments import bptt_step

# issue 5, H200, RWKV-LM's v4 CUDA kernel, eager: B=1 T=4096 step, and the same with a free WKV stub
ANCHOR = {"a": "25.5k tok/s, 23.4% nominal MFU, 14.2 GiB", "b": "39.4k tok/s"}
GOAL_TOK_S, GOAL_PEAK_GIB = 32.7e3, 8.0  # segmented 64k in 4096-token segments, B=1 (issue 5)
# Segmented vs unsegmented gradients: fp32 to TOL_FP32; in bf16 within NOISE_MULT x the bf16 noise
# floor (unsegmented bf16 vs fp32 autograd), which itself must stay under FLOOR_MAX. Measured on the
# CPU at the GPU sizes (chunked WKV): floor 3.3-3.6e-3 (autocast), 2.1-2.2e-2 (bf16 weights);
# segmented vs unsegmented 0.9-1.3x the floor.
TOL_FP32 = 1e-4
NOISE_MULT = 2.0
FLOOR_MAX = {"autocast": 2e-2, "bf16": 1e-1}
# estimated seconds on an H100 per setting (budget guard: a setting starts only with this much left)
EST_S = {
    "correctness": 30,
    "build": 10,
    "a": 8,
    "b": 6,
    "c": 12,
    "d": 20,
    "d_cp": 25,
    "d_param": 25,
    "e": 100,
}


@dataclass
class Bench:
    """What gpu_check.py hands to part (c)."""

    dev: torch.device
    smoke: bool
    deadline: float
    """time.perf_counter() value after which no new setting starts."""
    log: Callable[[str], None]
    failures: list[str]
    matmul_tflops: float | None = None
    nominal_tflops: float | None = None
    results: dict[str, dict] = field(default_factory=dict)

    def time_left(self) -> float:
        return self.deadline - time.perf_counter()


def mfu(n_params: int, tok_s: float, tflops: float | None) -> float | None:
    """6·N·tokens/s over a rate in TFLOP/s (None when the rate is unknown). N counts every parameter,
    the embedding included, as issue 5's anchor figures do (the trainer's logged MFU leaves the
    embedding out: `training/throughput.py`)."""
    return None if not tflops else throughput.mfu(tok_s, 6.0 * n_params, tflops)


@torch.no_grad()
def cheap_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter on its own device: random matrices (std 0.5/sqrt(fan_in)), an N(0, 1)
    embedding, LayerNorms at (1, 0), time_decay ~ U(-5, 3), time_first ~ U(-2, 1), time_mix ~ U(0, 1)."""
    for i, (name, p) in enumerate(model.named_parameters()):
        g = torch.Generator(device=p.device).manual_seed(seed * 1000 + i)
        x = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        if name.endswith("time_decay"):
            x.uniform_(-5, 3, generator=g)
        elif name.endswith("time_first"):
            x.uniform_(-2, 1, generator=g)
        elif "time_mix" in name:
            x.uniform_(0, 1, generator=g)
        elif ".ln" in name or name.startswith("ln_"):
            x.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name == "emb.weight":
            x.normal_(0, 1, generator=g)
        else:
            x.normal_(0, 0.5 / p.shape[-1] ** 0.5, generator=g)
        p.copy_(x)
    return model


def build_model(cfg: RWKV4Config, dev: torch.device, dtype: torch.dtype, seed: int = 0) -> RWKV4:
    """The model allocated directly on `dev` in `dtype` (meta construction, then `cheap_init`)."""
    with torch.device("meta"):
        model = RWKV4(cfg)
    return cheap_init(model.to(dtype).to_empty(device=dev), seed)


@contextlib.contextmanager
def patched_wkv(fn: Callable) -> Iterator[list[int]]:
    """Make the model call `fn` in place of the WKV dispatch `wkv4`; yields a one-item call counter."""
    calls = [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return fn(*args, **kwargs)

    mods = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("rwkv_infctx.model") and getattr(m, "wkv4", None) is wkv4_ops.wkv4
    ]
    if not mods:
        raise RuntimeError("no rwkv_infctx.model module binds the name wkv4: cannot replace the WKV op")
    for m in mods:
        m.wkv4 = counted
    try:
        yield calls
    finally:
        for m in mods:
            m.wkv4 = wkv4_ops.wkv4


def stub_wkv(time_decay, time_first, k: Tensor, v: Tensor, state, backend="auto", self_check="warn"):
    """A free elementwise stand-in for WKV: y = k * v, the state passed through unchanged."""
    return k * v, state


def per_channel_wkv(time_decay, time_first, k: Tensor, v: Tensor, state, backend="auto", self_check="warn"):
    """The Triton kernel with one chunk of L = T: one thread per channel walks the whole sequence
    (the structure of RWKV-LM's CUDA kernel; block 32 as in part (b)'s per-channel baseline)."""
    from rwkv_infctx.ops.wkv4.triton_kernel import wkv4_triton

    return wkv4_triton(time_decay, time_first, k, v, state, chunk=k.shape[1], block=32)


def random_batch(vocab: int, T: int, dev: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """input_ids, target_ids (random tokens) and an all-ones loss_mask, each (1, T)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = torch.randint(vocab, (1, T + 1), device=dev, generator=g)
    return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:], "loss_mask": torch.ones(1, T, device=dev)}


def whole_step(model: nn.Module, batch: dict[str, Tensor]) -> float:
    """Unsegmented forward, the objective of `bptt_step` (CE + L2Wrap over N tokens), backward."""
    logits, _ = model(batch["input_ids"])
    ce_sum, l2_sum = segment_terms(logits, batch["target_ids"], batch["loss_mask"])
    n = token_count(batch["loss_mask"])
    objective(ce_sum, l2_sum, n).backward()
    return float(ce_sum.detach()) / float(n)


def segmented_step(
    model: nn.Module, batch: dict[str, Tensor], ctx_len: int, grad_cp: bool, grad_accum_dtype: str = "float32"
) -> float:
    """Exact segmented BPTT through `bptt_step`; the mean cross-entropy."""
    proxy, report = bptt_step(
        model, batch, ctx_len=ctx_len, grad_cp=grad_cp, grad_accum_dtype=grad_accum_dtype
    )
    proxy.backward()
    return float(report.loss)


def grad_errors(got: dict[str, Tensor], ref: dict[str, Tensor]) -> tuple[float, float, str, list[str]]:
    """(max |got-ref| / max |ref| over all parameters, the worst per-parameter ratio, its name,
    names whose gradient is missing or not finite)."""
    bad = [
        n for n in ref if n not in got or not torch.isfinite(got[n]).all() or not torch.isfinite(ref[n]).all()
    ]
    num = den = worst = 0.0
    worst_name = ""
    for n, r in ref.items():
        if n in bad:
            continue
        d = (got[n].double() - r.double()).abs().max().item()
        m = r.double().abs().max().item()
        num, den = max(num, d), max(den, m)
        ratio = d / m if m > 0 else (0.0 if d == 0 else float("inf"))
        if ratio > worst:
            worst, worst_name = ratio, n
    return (num / den if den > 0 else 0.0), worst, worst_name, bad


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _short_exc(e: BaseException) -> str:
    """One line for a table cell; a short traceback goes to stderr."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__, limit=-4))
    print(tb[-1500:], file=sys.stderr, flush=True)
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ---- correctness ---------------------------------------------------------------------------------


def correctness_rows(b: Bench) -> None:
    """Segmented bptt_step vs unsegmented autograd, per precision; failures go to b.failures."""
    if b.smoke:
        cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="triton")
        T, ctx_len = 48, 16
    else:
        cfg = RWKV4Config(n_layer=4, n_embd=512, vocab_size=2048, wkv_backend="triton")
        T, ctx_len = 2048, 512
    b.log(
        f"### Segmented exact BPTT vs unsegmented autograd: L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, "
        f"T={T} in {T // ctx_len} segments of {ctx_len}, Triton WKV"
    )
    b.log()
    b.log(
        "Error = max |a - b| / max |b| over all parameter gradients (worst single parameter beside it); "
        "objective CE + L2Wrap over all tokens (training/loss.py) on both sides. fp32 must agree to "
        f"{TOL_FP32:.0e}. In bf16 the tolerance is {NOISE_MULT:g}x the bf16 noise floor, the error of the "
        "unsegmented bf16 gradients against fp32 autograd on the same (rounded) weights: segmenting may "
        "not cost more accuracy than bf16 itself (on the CPU the segmented bf16 gradients are as close "
        "to fp32 as the unsegmented ones, or closer: they are accumulated over segments in fp32). The "
        f"floor itself must stay under {FLOOR_MAX['autocast']:.0e} (autocast) / "
        f"{FLOOR_MAX['bf16']:.0e} (bf16 weights)."
    )
    b.log()
    b.log(
        "| precision | seg vs whole | worst param | floor (whole vs fp32) | seg vs fp32 | tol | result | s |"
    )
    b.log("|---|---|---|---|---|---|---|---|")
    cases = [
        ("fp32", torch.float32, False),
        ("autocast", torch.float32, True),
        ("bf16", torch.bfloat16, False),
    ]
    names = {"fp32": "fp32", "autocast": "fp32 weights, bf16 autocast", "bf16": "bf16 weights and grads"}
    prec = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        for i, (key, dtype, autocast) in enumerate(cases):
            if b.time_left() < EST_S["correctness"] / len(cases):
                b.log(f"| {names[key]} | skipped: time budget |||||||")
                continue
            t0 = time.perf_counter()
            try:
                r = _compare(cfg, T, ctx_len, b.dev, dtype, autocast, seed=i)
                b.log(_correctness_row(b, names[key], key, r, time.perf_counter() - t0))
            except Exception as e:
                msg = _short_exc(e)
                b.failures.append(f"segmented vs whole, {names[key]}: {msg}")
                b.log(f"| {names[key]} | ERROR {msg} |||||||")
            _free(b.dev)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prec
    b.log()


def _correctness_row(b: Bench, name: str, key: str, r: dict, secs: float) -> str:
    glob, worst, worst_name, bad = r["seg_whole"]
    floor = r.get("floor")
    if key == "fp32":
        tol, why = TOL_FP32, ""
    else:
        tol = NOISE_MULT * floor[0]
        why = f"; floor {floor[0]:.1e} > {FLOOR_MAX[key]:.0e}" if floor[0] > FLOOR_MAX[key] else ""
        bad = bad + floor[3] + r["seg_fp32"][3]
    ok = not bad and glob <= tol and not why
    if not ok:
        finite = f"; not finite: {', '.join(bad[:3])}" if bad else ""
        b.failures.append(f"segmented vs whole, {name}: {glob:.2e} (tol {tol:.1e}){why}{finite}")
    fmt = lambda x: "n/a" if x is None else f"{x[0]:.2e}"  # noqa: E731
    return (
        f"| {name} | {glob:.2e} | {worst:.2e} ({worst_name}) | {fmt(floor)} | {fmt(r.get('seg_fp32'))} "
        f"| {tol:.1e} | {'ok' if ok else 'FAIL'}{why} | {secs:.1f} |"
    )


def _compare(cfg, T: int, ctx_len: int, dev: torch.device, dtype, autocast: bool, seed: int) -> dict:
    """Gradient errors: segmented vs unsegmented (same precision); in bf16 also each against fp32."""
    model = build_model(cfg, dev, dtype, seed=seed)
    batch = random_batch(cfg.vocab_size, T, dev, seed=seed)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
        whole_step(model, batch)
        ref = _grads(model)
        model.zero_grad(set_to_none=True)
        segmented_step(model, batch, ctx_len, grad_cp=False)
    got = _grads(model)
    out = {"seg_whole": grad_errors(got, ref)}
    if dtype != torch.float32 or autocast:
        model.zero_grad(set_to_none=True)
        whole_step(model.float(), batch)  # the same (rounded) weights in fp32, autocast off
        ref32 = _grads(model)
        out["floor"], out["seg_fp32"] = grad_errors(ref, ref32), grad_errors(got, ref32)
    return out


# ---- the 1.5B training step ----------------------------------------------------------------------


@dataclass
class Setting:
    """One row of the training-step table."""

    key: str
    label: str
    segmented: bool
    grad_cp: bool = False
    wkv: Callable | None = None
    grad_accum_dtype: str = "float32"
    """bptt_step's gradient sums over segments: float32, or param (bf16 here: half the memory)."""
    """A replacement for the WKV dispatch (None: the model's own, the Triton kernel)."""


def training_rows(b: Bench) -> None:
    """The table of training-step settings (a)-(e) of issue 5 on a 1.5B-shaped model."""
    if b.smoke:
        cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=64, wkv_backend="triton")
        T, long_T, reps, compile_backend = 16, 48, 1, "aot_eager"
    else:
        cfg = RWKV4Config(n_layer=24, n_embd=2048, vocab_size=50277, wkv_backend="triton")
        T, long_T, reps, compile_backend = 4096, 65536, 3, "inductor"
    b.log(f"### Training step: L{cfg.n_layer} C{cfg.n_embd} V{cfg.vocab_size}, bf16 weights, B=1")
    b.log()
    if b.time_left() < EST_S["build"]:
        b.log("skipped: time budget")
        return
    try:
        model = build_model(cfg, b.dev, torch.bfloat16)
    except Exception as e:
        b.log(f"model build failed: {_short_exc(e)}")
        return
    warmup = 0 if b.smoke else 1  # the smoke checks code paths, not times
    _describe(b, model.num_params(), reps, warmup)
    batches = {False: random_batch(cfg.vocab_size, T, b.dev, seed=1)}
    batches[True] = random_batch(cfg.vocab_size, long_T, b.dev, seed=2)
    seg = f"segmented {long_T // 1024}k in {long_T // T} x {T}" if not b.smoke else f"segmented {long_T}/{T}"
    settings = [
        Setting("a", f"(a) unsegmented T={T}, Triton WKV", False),
        Setting("b", "(b) (a) with WKV stub y = k*v", False, wkv=stub_wkv),
        Setting("c", "(c) (a) with per-channel WKV (L = T)", False, wkv=per_channel_wkv),
        Setting("d", f"(d) {seg}, grad_cp off", True),
        Setting("d_cp", f"(d) {seg}, grad_cp on", True, grad_cp=True),
        Setting(
            "d_param", f"(d) {seg}, grad_cp on, bf16 gradient sums", True, True, grad_accum_dtype="param"
        ),
        Setting("e", f"(e) {seg}, att/ffn compiled", True),
    ]
    b.log("| setting | tokens/step | step s | tok/s | peak GiB | MFU measured | MFU nominal | loss | note |")
    b.log("|---|---|---|---|---|---|---|---|---|")
    for s in settings:
        if b.time_left() < EST_S[s.key]:
            left = f"{b.time_left():.0f} s left, needs ~{EST_S[s.key]} s"
            b.log(f"| {s.label} | skipped: time budget ({left}) |||||||| ")
            continue
        note = ""
        try:
            if s.key == "e":
                note = _compile_blocks(model, compile_backend)
            res = _run_setting(b, model, batches[s.segmented], T, s, reps, warmup)
            b.results[s.key] = res
            b.log(_row(b, s, res, model.num_params(), note))
            if not math.isfinite(res["loss"]):
                b.failures.append(f"training step {s.label}: non-finite loss {res['loss']}")
        except Exception as e:
            msg = _short_exc(e)
            b.results[s.key] = {"error": msg}
            b.log(f"| {s.label} | ERROR {msg} |||||||| ")
        model.zero_grad(set_to_none=True)
        _free(b.dev)
    del model, batches
    _free(b.dev)
    b.log()
    _summary(b)


def _describe(b: Bench, n: int, reps: int, warmup: int) -> None:
    b.log(
        f"N = {n / 1e9:.3f}B parameters ({n * 2 / 2**30:.2f} GiB of bf16 weights). One step = forward + "
        "backward of CE + L2Wrap with bf16 weights and bf16 .grad (bptt_step sums its per-segment "
        "gradients in fp32, in bf16 where the row says bf16 gradient sums); no optimizer step, no "
        "optimizer states. "
        f"{warmup} warm-up step(s), then the median of {reps} CUDA-synchronised wall-clock steps. "
        "Peak memory = torch.cuda.max_memory_allocated over the timed steps (weights included). "
        "MFU = 6·N·tok/s (the segmented step also runs a state-only forward, not counted) over the "
        f"measured matmul rate ({_fmt(b.matmul_tflops, '.3g')} TFLOP/s) and over the nominal peak "
        f"({_fmt(b.nominal_tflops, '.0f')} TFLOP/s)."
    )
    b.log()


def _run_setting(
    b: Bench, model: nn.Module, batch: dict, ctx_len: int, s: Setting, reps: int, warmup: int = 1
) -> dict:
    """`warmup` steps (compiles), then `reps` timed steps; step time, tokens/s, peak memory, loss."""

    def step() -> float:
        model.zero_grad(set_to_none=True)
        if s.segmented:
            return segmented_step(model, batch, ctx_len, s.grad_cp, s.grad_accum_dtype)
        return whole_step(model, batch)

    cm = patched_wkv(s.wkv) if s.wkv else contextlib.nullcontext([1])
    with cm as calls:
        t0 = time.perf_counter()
        for _ in range(warmup):
            step()
        _sync(b.dev)
        warm_s = time.perf_counter() - t0
        if b.dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for _ in range(reps):
            _sync(b.dev)
            t = time.perf_counter()
            losses.append(step())
            _sync(b.dev)
            times.append(time.perf_counter() - t)
        if calls[0] == 0:
            raise RuntimeError("the replacement WKV op was never called")
    peak = torch.cuda.max_memory_allocated() / 2**30 if b.dev.type == "cuda" else None
    step_s = statistics.median(times)
    tokens = batch["input_ids"].numel()
    return {
        "tokens": tokens,
        "step_s": step_s,
        "tok_s": tokens / step_s,
        "peak_gib": peak,
        "loss": losses[-1],
        "warm_s": warm_s,
    }


def _compile_blocks(model: nn.Module, backend: str) -> str:
    """torch.compile each block's time-mix and channel-mix in place, dynamic shapes, as the trainer's
    `model.compile` does (training/module.py: compile_mixers, not imported here: it pulls in
    Lightning). Token shift, mixing, gates and relu² fuse around the matmuls; the Triton WKV is one
    opaque custom op. Whole blocks would be recompiled per layer (dynamo specialises on `layer_id`)."""
    for blk in model.blocks:
        blk.att.compile(backend=backend, dynamic=True)
        blk.ffn.compile(backend=backend, dynamic=True)
    return f"torch.compile({backend}, dynamic) of each att, ffn (compiles on the first step)"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _row(b: Bench, s: Setting, r: dict, n: int, note: str) -> str:
    m1 = mfu(n, r["tok_s"], b.matmul_tflops)
    m2 = mfu(n, r["tok_s"], b.nominal_tflops)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    finite = "" if math.isfinite(r["loss"]) else " NON-FINITE LOSS"
    note = "; ".join(x for x in (note, f"warm-up {r['warm_s']:.1f} s") if x)
    return (
        f"| {s.label} | {r['tokens']} | {r['step_s']:.3f} | {r['tok_s'] / 1e3:.2f}k "
        f"| {_fmt(r['peak_gib'], '.2f')} "
        f"| {pct(m1)} | {pct(m2)} | {r['loss']:.4f}{finite} | {note} |"
    )


def _summary(b: Bench) -> None:
    r = b.results
    ok = lambda k: k in r and "error" not in r[k]  # noqa: E731
    if ok("a") and ok("b"):
        share = (r["a"]["step_s"] - r["b"]["step_s"]) / r["a"]["step_s"]
        b.log(
            f"- WKV share of the unsegmented step: {100 * share:.1f}% "
            "(anchor, reference kernel on an H200: ~35%)"
        )
    if ok("a") and ok("c"):
        b.log(f"- per-channel WKV (L = T) step / chunked step: {r['c']['step_s'] / r['a']['step_s']:.2f}x")
    for k in ("d", "d_cp", "d_param", "e"):
        if ok(k):
            tok, peak = r[k]["tok_s"], r[k]["peak_gib"]
            met = (
                "n/a (no GPU)"
                if peak is None
                else ("met" if tok >= GOAL_TOK_S and peak <= GOAL_PEAK_GIB else "not met")
            )
            b.log(
                f"- goal ({k}): >= {GOAL_TOK_S / 1e3:.1f}k tok/s and <= {GOAL_PEAK_GIB:.0f} GiB: "
                f"{tok / 1e3:.2f}k tok/s, {_fmt(peak, '.2f')} GiB: {met}"
            )
    b.log(f"- anchors (issue 5, H200, RWKV-LM kernel, eager): (a) {ANCHOR['a']}; (b) {ANCHOR['b']}")
    b.log()


def run_part_c(b: Bench) -> None:
    """Part (c): correctness rows, then the training-step table."""
    b.log("## (c) The model end to end: segmented exact BPTT on the kernel, and a 1.5B training step")
    b.log()
    correctness_rows(b)
    training_rows(b)
