"""WKV-7 on the CPU: the reference loop vs the chunked op, time and memory, side by side.

Run: python bench/wkv7_cpu.py [--lengths 512,4096,32768] [--chunk-lens 16,32,64] [--threads 1]
                              [--ref-max-t 4096] [--repeats 5] [--ref-repeats 2]

Each (op, T, chunk length) cell is measured in two fresh child processes: one times it with the
ordinary allocator, the other measures memory with glibc's allocator tamed (MALLOC_ARENA_MAX=1
MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=0; shared/NOTES-segments.md item 4), so that its peak RSS
reflects live memory (the tamed allocator's page faults would distort the times). Per cell: fwd =
forward under no_grad, fwd+bwd = forward and one backward with gradients for r, w, k, v, a, b and
S0 and a loss on y and S_T (best of --repeats runs, ms); saved = bytes of the distinct storages
autograd keeps for the backward (counted with saved_tensors_hooks); peak = the child's peak RSS
during one fwd+bwd minus its RSS before it (MB). Inputs: fp32, in the RWKV-7 block's ranges, S0 ≠ 0.

The reference's graph holds several (B, H, N, N) tensors per token; above --ref-max-t tokens it is
not run and its cells say so.

    python bench/wkv7_cpu.py --against OLD/src/rwkv_infctx/ops/wkv7/chunked.py [--shapes 512x2,1024x4]
        this chunked op against another version's (e.g. a git worktree of an earlier commit), in one
        process, calls alternating: fwd and fwd+bwd per (T x H) shape (B=1, N=64; the demo's segment
        is 512x2, bench/families.py profile's 1024x4), at this CHUNK_LEN and the other's, best of
        --repeats; times are the thread's CPU time, which a shared machine's other work disturbs less
    python bench/wkv7_cpu.py --short
        short calls without gradients (generation): the chunked op's node against the per-token
        recurrence that `wkv7_chunked` runs for T <= SHORT_T
    python bench/wkv7_cpu.py --kernel [--shapes 512x2,1024x4] [--threads 2] [--rebuild]
        the chunked op against the compiled C kernel (`cpu_kernel.py`, what `wkv_backend: auto` runs
        on the CPU), calls alternating, fwd and fwd+bwd per shape, best of --repeats, wall-clock ms;
        first the seconds the kernel took to be ready (--rebuild: compiled afresh)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.ops.test_wkv7_chunked import model_inputs

from rwkv_infctx.ops.wkv7.chunked import CHUNK_LEN, SHORT_T

TAME_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def make_inputs(B: int, T: int, H: int, N: int, seed: int = 0) -> list[torch.Tensor]:
    """fp32 inputs as the RWKV-7 block makes them (the tests' `model_inputs`), S0 random; all leaves."""
    return [x.requires_grad_() for x in model_inputs(B, T, H, N, seed)]


def _op(name: str, chunk_len: int):
    if name == "reference":
        from rwkv_infctx.ops.wkv7.reference import wkv7_reference

        return wkv7_reference
    from rwkv_infctx.ops.wkv7.chunked import wkv7_chunked

    return lambda *xs: wkv7_chunked(*xs, chunk_len=chunk_len)


def _fwd_bwd(fn, inputs) -> None:
    y, S = fn(*inputs)
    torch.autograd.grad(y.square().sum() + S.sum(), inputs)


def _best_ms(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(what: str, op: str, B: int, T: int, H: int, N: int, chunk_len: int, repeats: int) -> dict:
    """One cell's memory (saved bytes, peak RSS growth) or times, measured in this process."""
    fn, inputs = _op(op, chunk_len), make_inputs(B, T, H, N)
    _fwd_bwd(fn, make_inputs(B, min(T, 64), H, N))  # load and initialise the kernels first
    if what == "memory":
        base = _rss_mb()
        _fwd_bwd(fn, inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*inputs)
        return {"saved": sum(storages.values()) / 2**20, "peak": peak}

    def fwd():
        with torch.no_grad():
            fn(*inputs)

    return {"fwd": _best_ms(fwd, repeats), "fwd_bwd": _best_ms(lambda: _fwd_bwd(fn, inputs), repeats)}


def run_cell(args, op: str, T: int, chunk_len: int, repeats: int) -> dict:
    """Times (ordinary allocator) and memory (tamed allocator), each in a fresh child process."""
    result = {}
    for what, env in (("time", {}), ("memory", TAME_MALLOC)):
        cmd = [sys.executable, __file__, "--child", what, op, str(T), str(chunk_len), str(repeats)]
        cmd += ["--B", str(args.B), "--H", str(args.H), "--N", str(args.N), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
        result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def _cells(ref: dict | None, ch: dict) -> list[str]:
    """For fwd, fwd+bwd, saved and peak: the reference, the chunked op and reference / chunked."""
    cells = []
    for key in ("fwd", "fwd_bwd", "saved", "peak"):
        if ref is None:
            cells += ["not run", f"{ch[key]:.1f}", "-"]
        else:
            cells += [f"{ref[key]:.1f}", f"{ch[key]:.1f}", f"{ref[key] / max(ch[key], 1e-9):.1f}x"]
    return cells


def _cpu_ms(run, repeats: int, clock=time.thread_time) -> float:
    """Best time of `repeats` runs (ms) on `clock` (default: the thread's CPU time)."""
    best = float("inf")
    for _ in range(repeats):
        t = clock()
        run()
        best = min(best, clock() - t)
    return best * 1e3


def _alternate(ops: dict, inputs: list[torch.Tensor], repeats: int, clock=time.thread_time) -> dict:
    """Best fwd (no grad) and fwd+bwd ms of each (fn, chunk_len) in ops, calls alternating."""
    best = {(name, part): float("inf") for name in ops for part in ("fwd", "fwd_bwd")}
    for _ in range(repeats):
        for name, (fn, L) in ops.items():
            op = functools.partial(fn, chunk_len=L)
            with torch.no_grad():
                best[name, "fwd"] = min(best[name, "fwd"], _cpu_ms(functools.partial(op, *inputs), 1, clock))
            run = functools.partial(_fwd_bwd, op, inputs)
            best[name, "fwd_bwd"] = min(best[name, "fwd_bwd"], _cpu_ms(run, 1, clock))
    return best


def _pair_table(args, ops: dict, clock=time.thread_time) -> None:
    """fwd and fwd+bwd of the two ops in `ops` per --shapes cell, and first / second."""
    first, second = ops
    print(f"| T x H | {first} fwd | {second} fwd | ratio | {first} fwd+bwd | {second} fwd+bwd | ratio |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        T, H = map(int, shape.split("x"))
        best = _alternate(ops, make_inputs(1, T, H, args.N), args.repeats, clock)
        cells = []
        for part in ("fwd", "fwd_bwd"):
            a, b = best[first, part], best[second, part]
            cells += [f"{a:.2f}", f"{b:.2f}", f"{a / b:.2f}x"]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


def compare(args) -> None:
    """This chunked op against the one in the file `args.against`, calls alternating in one process."""
    from rwkv_infctx.ops.wkv7 import chunked

    spec = importlib.util.spec_from_file_location("other_chunked", args.against)
    other = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    ops = {"other": (other.wkv7_chunked, other.CHUNK_LEN), "this": (chunked.wkv7_chunked, chunked.CHUNK_LEN)}
    print(f"this: CHUNK_LEN {chunked.CHUNK_LEN}; other ({args.against}): CHUNK_LEN {other.CHUNK_LEN}")
    print(f"{args.threads} thread(s), fp32, B=1, N={args.N}, best of {args.repeats} (thread CPU ms)\n")
    _pair_table(args, ops)


def kernel(args) -> None:
    """The chunked op against the compiled C kernel (`cpu_kernel.py`), calls alternating; wall-clock
    times, since the kernel runs its heads on --threads OpenMP threads."""
    from rwkv_infctx.ops.wkv7 import chunked, cpu_kernel

    path = cpu_kernel.library_path()
    if args.rebuild and path is not None:
        path.unlink(missing_ok=True)
    cached = path is not None and path.exists()
    start = time.perf_counter()
    if not cpu_kernel.available():
        raise SystemExit(f"the C kernel is unavailable here: {cpu_kernel.unavailable_reason()}")
    how = "loaded from the cache" if cached else "compiled and loaded"
    print(f"C kernel {how} in {time.perf_counter() - start:.2f} s ({path})")
    ops = {
        "chunked": (chunked.wkv7_chunked, chunked.CHUNK_LEN),
        "cpu": (lambda *xs, chunk_len=None: cpu_kernel.wkv7_cpu(*xs), None),
    }
    print(f"{args.threads} thread(s), fp32, B=1, N={args.N}, best of {args.repeats} (wall ms)\n")
    _pair_table(args, ops, time.perf_counter)


def short(args) -> None:
    """No-grad calls of a few tokens: the chunked op's node against the per-token recurrence."""
    from rwkv_infctx.ops.wkv7.chunked import WKV7Chunked
    from rwkv_infctx.ops.wkv7.reference import wkv7_reference

    print(
        f"{args.threads} thread(s), fp32, B=1, H={args.H}, N={args.N}, no grad, best of {args.repeats} "
        f"(thread CPU µs); wkv7_chunked runs the recurrence for T <= {SHORT_T}\n"
    )
    print("| T | chunked node µs | recurrence µs |")
    print("|---|---|---|")
    for T in (1, 2, 4, 8, 16, 32):
        inputs = [x.detach() for x in make_inputs(1, T, args.H, args.N)]
        with torch.no_grad():
            node = _cpu_ms(functools.partial(WKV7Chunked.apply, *inputs, None), args.repeats) * 1e3
            loop = _cpu_ms(functools.partial(wkv7_reference, *inputs), args.repeats) * 1e3
        print(f"| {T} | {node:.0f} | {loop:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", default="512,4096,32768")
    parser.add_argument(
        "--chunk-lens", default=str(CHUNK_LEN), help="comma-separated chunk lengths for the chunked op"
    )
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--H", type=int, default=2)
    parser.add_argument("--N", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="runs per timing of the chunked op")
    parser.add_argument("--ref-repeats", type=int, default=2, help="runs per timing of the reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--ref-max-t", type=int, default=4096, help="longest T the reference is run at")
    parser.add_argument("--against", help="another chunked.py: time this op against it (see above)")
    parser.add_argument("--shapes", default="512x2,1024x4", help="T x H cells for --against and --kernel")
    parser.add_argument("--short", action="store_true", help="short no-grad calls (see above)")
    parser.add_argument("--kernel", action="store_true", help="the chunked op against the C kernel")
    parser.add_argument("--rebuild", action="store_true", help="--kernel: delete the cached library first")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.against or args.short or args.kernel:
        compare(args) if args.against else kernel(args) if args.kernel else short(args)
        return
    if args.child:
        what, op, T, chunk_len, repeats = *args.child[:2], *map(int, args.child[2:])
        print(json.dumps(child(what, op, args.B, T, args.H, args.N, chunk_len, repeats)))
        return

    print(
        f"{datetime.date.today()} · {platform.processor() or platform.machine()} · "
        f"torch {torch.__version__} · {args.threads} thread(s) · fp32 · "
        f"B={args.B} H={args.H} N={args.N} (C={args.H * args.N}) · "
        f"best of {args.repeats} (reference: of {args.ref_repeats})\n"
    )
    cols = [
        "T",
        "L",
        "ref fwd ms",
        "chunked fwd ms",
        "ratio",
        "ref fwd+bwd ms",
        "chunked fwd+bwd ms",
        "ratio",
    ]
    cols += ["ref saved MB", "chunked saved MB", "ratio", "ref peak MB", "chunked peak MB", "ratio"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols), flush=True)
    notes = []
    for n_tok in (int(x) for x in args.lengths.split(",")):
        ref = None
        if n_tok > args.ref_max_t:
            notes.append(
                f"T={n_tok}: reference not run (T > --ref-max-t {args.ref_max_t}: its graph grows as T·H·N²)"
            )
        else:
            ref = run_cell(args, "reference", n_tok, 0, args.ref_repeats)
        for L in (int(x) for x in args.chunk_lens.split(",")):
            ch = run_cell(args, "chunked", n_tok, L, args.repeats)
            print(f"| {n_tok} | {L} | " + " | ".join(_cells(ref, ch)) + " |", flush=True)
    for note in notes:
        print(f"\n{note}")


if __name__ == "__main__":
    main()
