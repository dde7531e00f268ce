"""RWKV-4 and RWKV-7 side by side: issue 16's performance stand-ins, and where the boundary states live.

    python bench/families.py targets      # the three stand-in figures for each family, with targets
    python bench/families.py boundary     # peak memory against length, boundary_states device / cpu
    python bench/families.py profile      # share of one bptt-full step spent in the WKV op (torch.profiler),
                                          # then unprofiled steps, families alternating, and their ratio
    python bench/families.py boundary --device cuda --n_layer 12 --n_embd 768 --vocab_size 65536 \
        --ctx_len 4096 --lengths 65536,262144,1048576        # on a GPU: torch.cuda.max_memory_allocated

Every cell is measured by a fresh `bench/bptt.py step` child (`bptt.run_child`), so the allocator
and the process are the same as bptt.py's memory and throughput tables: memory children run with
glibc's allocator tamed (MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=0), timing
children with the ordinary one (bptt.py's docstring says why). Both families get the same dims.

targets (issue 16 §6), bptt full with loss chunks against plain autograd of `model(tokens)`:
    (a) peak RSS of one 65,536-token sample ÷ one 4,096-token sample, bptt full      goal ≤ 1.10
        (the whole process's peak, as the goal means; the table also gives each step's own rise
        above the process, model and batch, which a constant baseline does not dilute)
    (b) tokens/s of bptt full ÷ unsegmented, 4,096 tokens (one child, modes alternating) goal ≥ 0.80
    (c) tokens/s of bptt full at 65,536 ÷ at 4,096 tokens                             goal ≥ 0.90

boundary (issue 16 §3): peak memory of one bptt-full step against sample length with
`boundary_states` "device" and "cpu", and StepReport.boundary_bytes. On CUDA the peak is
torch.cuda.max_memory_allocated (the accelerator's memory; host RSS beside it). On a CPU-only
machine both places are host memory, so the two rows can only agree: the table then shows the
boundary bytes against length and the peak RSS, which they are part of.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

# bench/bptt.py, the sibling script: its child processes do the measuring
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bptt
from rwkv_infctx.model.registry import FAMILIES
from rwkv_infctx.training.loss import LOSS_CHUNK

GOALS = {"a": (1.10, "<="), "b": (0.80, ">="), "c": (0.90, ">=")}


def _describe(args) -> str:
    return (
        f"model L{args.n_layer} C{args.n_embd} V{args.vocab_size} (the same for every family), "
        f"ctx_len {args.ctx_len}, loss_chunk {args.loss_chunk}, batch 1, fp32, wkv_backend "
        f"{args.wkv_backend}, device {args.device}, {args.threads} CPU thread(s) per child; "
        "one fresh process per cell"
    )


def stand_ins(args) -> dict[str, float]:
    """The raw figures and the three ratios of one family (`args.arch` is one name)."""
    short, long = args.short, args.long
    mem = {n: bptt.run_child(args, "full", n, 1, tame_malloc=True) for n in (short, long)}
    rss = {n: m["peak_rss_mb"] for n, m in mem.items()}
    step = {n: m["peak_rss_mb"] - m["rss_before_mb"] for n, m in mem.items()}
    at_short = bptt.run_child(args, "full,unsegmented", short, args.repeat, tame_malloc=False)["seconds"]
    at_long = bptt.run_child(args, "full", long, args.repeat_long, tame_malloc=False)["seconds"]
    rate = {"full_short": short / at_short["full"], "unseg": short / at_short["unsegmented"]}
    rate["full_long"] = long / at_long["full"]
    return {
        "rss_short": rss[short],
        "rss_long": rss[long],
        "step_short": step[short],
        "step_long": step[long],
        **rate,
        "a": rss[long] / rss[short],
        "b": rate["full_short"] / rate["unseg"],
        "c": rate["full_long"] / rate["full_short"],
    }


def _verdict(key: str, value: float) -> str:
    goal, op = GOALS[key]
    return "ok" if (value <= goal if op == "<=" else value >= goal) else "MISSED"


def cmd_targets(args) -> None:
    """Measure every family, then print one table with a column per family."""
    print(_describe(args), flush=True)
    figures = {}
    for one in bptt.per_arch(args):
        figures[one.arch] = stand_ins(one)
        print(f"  {one.arch} measured", file=sys.stderr, flush=True)
    s, n = f"{args.short:,}", f"{args.long:,}"
    rows = [
        (f"peak RSS, {s} tokens, bptt full (MB)", "rss_short", ""),
        (f"peak RSS, {n} tokens, bptt full (MB)", "rss_long", ""),
        (f"  of which the step's own, {s} (MB)", "step_short", ""),
        (f"  of which the step's own, {n} (MB)", "step_long", ""),
        (f"tokens/s, {s}, bptt full", "full_short", ""),
        (f"tokens/s, {s}, unsegmented", "unseg", ""),
        (f"tokens/s, {n}, bptt full", "full_long", ""),
        (f"(a) peak RSS {n} / {s}", "a", "<= 1.10"),
        (f"(b) tokens/s full / unsegmented, {s}", "b", ">= 0.80"),
        (f"(c) tokens/s full {n} / {s}", "c", ">= 0.90"),
    ]
    archs = list(figures)
    print(f"{'figure':44}{'goal':>9}" + "".join(f"{a:>16}" for a in archs))
    for label, key, goal in rows:
        cells = []
        for a in archs:
            v = figures[a][key]
            cells.append(f"{v:>9.2f} {_verdict(key, v):>6}" if goal else f"{v:>16.0f}")
        print(f"{label:44}{goal:>9}" + "".join(cells))
    print(
        f"timings: best of {args.repeat} ({s}; full and unsegmented alternating in one child) and of "
        f"{args.repeat_long} ({n}); load average at the end: {_loadavg()}"
    )


def cmd_boundary(args) -> None:
    """Peak memory and boundary bytes against length, boundary_states device and cpu, per family."""
    device = bptt.pick_device(args.device)
    args.device = str(device)
    print(_describe(args))
    on_cuda = device.type == "cuda"
    if not on_cuda:
        print(
            "CPU only: 'device' and 'cpu' are both host memory here, so their peaks can only agree; "
            "the boundary bytes show what a GPU run would keep off the accelerator with 'cpu'."
        )
    lengths = [int(x) for x in args.lengths.split(",")]
    unit = "CUDA max_memory_allocated" if on_cuda else "peak RSS"
    for one in bptt.per_arch(args):
        print(f"\n{one.arch:40}" + "".join(f"{n:>12,}" for n in lengths) + f"{'ratio':>8}")
        for place in args.places.split(","):
            cells = [
                bptt.run_child(
                    argparse.Namespace(**{**vars(one), "boundary_states": place}),
                    "full",
                    n,
                    1,
                    tame_malloc=True,
                )
                for n in lengths
            ]
            _boundary_rows(place, cells, on_cuda, unit)
        print(f"load average: {_loadavg()}", flush=True)


def _boundary_rows(place: str, cells: list[dict], on_cuda: bool, unit: str) -> None:
    peak = [c["cuda_peak_mb"] if on_cuda else c["peak_rss_mb"] for c in cells]
    mib = [c["boundary_bytes"]["full"] / 2**20 for c in cells]
    print(f"{place + ': ' + unit + ' (MB)':40}" + _row(peak, ".0f") + f"{peak[-1] / peak[0]:>8.2f}")
    if on_cuda:
        rss = [c["peak_rss_mb"] for c in cells]
        print(f"{place + ': host peak RSS (MB)':40}" + _row(rss, ".0f") + f"{rss[-1] / rss[0]:>8.2f}")
    print(f"{place + ': boundary states (MiB)':40}" + _row(mib, ".3f"))


def _row(values: list[float], fmt: str) -> str:
    return "".join(f"{v:>12{fmt}}" for v in values)


def cmd_profile(args) -> None:
    """One bptt-full step at --tokens per family under torch.profiler (after a warm-up step): the
    step's time and the part spent in the WKV op's autograd node, forward and backward (every event
    named like the op's Function, e.g. WKV7Chunked and WKV7ChunkedBackward, top-level events only).
    Then, unprofiled, --repeat steps per family with the families alternating in this one process:
    the best time of each and its ratio to the first family's (a shared machine's other work disturbs
    alternating steps less than separate runs). The time is the thread's CPU time with --threads 1
    (which the machine's other work disturbs least), the wall time with more threads (the CPU time
    of one thread would leave out the others' work)."""
    from torch.profiler import ProfilerActivity, profile

    print(f"{_describe(args)}; {args.tokens:,} tokens; load {_loadavg()}")
    models, batch = {}, None
    for sub in bptt.per_arch(args):
        model = models[sub.arch] = bptt.make_model(sub)
        batch = bptt.make_batch([args.tokens], sub.vocab_size)
        bptt.train_step(model, batch, "full", sub.ctx_len, sub.loss_chunk)  # warm-up
        model.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            bptt.train_step(model, batch, "full", sub.ctx_len, sub.loss_chunk)
        model.zero_grad(set_to_none=True)
        events = prof.events()
        total = sum(e.cpu_time_total for e in events if e.cpu_parent is None)
        wkv = sum(e.cpu_time_total for e in events if "WKV" in e.name and not _inside_wkv(e))
        print(f"{sub.arch}: step {total / 1e6:.2f} s, WKV op {wkv / 1e6:.2f} s ({100 * wkv / total:.0f}%)")
    if args.repeat > 0:
        best = _alternate_steps(models, batch, args)
        first = next(iter(best.values()))
        cells = ", ".join(f"{a} {t:.2f} s ({t / first:.2f})" for a, t in best.items())
        clock = "thread CPU s" if args.threads == 1 else "wall s"
        print(f"unprofiled step, best of {args.repeat} alternating ({clock}, ratio to the first): {cells}")


def _alternate_steps(models: dict, batch, args) -> dict[str, float]:
    """Best seconds of one bptt-full step per family, the families' steps alternating (see
    `cmd_profile` for the clock)."""
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    best = dict.fromkeys(models, float("inf"))
    for _ in range(args.repeat):
        for arch, model in models.items():
            start = clock()
            bptt.train_step(model, batch, "full", args.ctx_len, args.loss_chunk)
            best[arch] = min(best[arch], clock() - start)
            model.zero_grad(set_to_none=True)
    return best


def _inside_wkv(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if "WKV" in parent.name:
            return True
        parent = parent.cpu_parent
    return False


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("targets", "boundary", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--arch", default=",".join(FAMILIES), help="comma-separated model families")
        p.add_argument("--n_layer", type=int, default=2)
        p.add_argument("--n_embd", type=int, default=256)
        p.add_argument("--vocab_size", type=int, default=1024)
        p.add_argument("--ctx_len", type=int, default=1024)
        p.add_argument("--loss_chunk", type=int, default=LOSS_CHUNK, help="positions per loss chunk")
        p.add_argument("--wkv_backend", default="auto")
        p.add_argument("--threads", type=int, default=1, help="torch threads per child")
        p.add_argument("--boundary_states", default="device", help="where bptt full keeps them")
        if name == "targets":
            p.add_argument("--device", default="cpu", help="cpu (the stand-ins are CPU figures) or cuda")
            p.add_argument("--short", type=int, default=4096, help="tokens of the short sample")
            p.add_argument("--long", type=int, default=65536, help="tokens of the long sample")
            p.add_argument("--repeat", type=int, default=3, help="timed steps at --short (best kept)")
            p.add_argument("--repeat_long", type=int, default=2, help="timed steps at --long")
        elif name == "profile":
            p.add_argument("--device", default="cpu", help="cpu")
            p.add_argument("--tokens", type=int, default=4096)
            p.add_argument("--repeat", type=int, default=3, help="unprofiled steps per family (0: none)")
        else:
            p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
            p.add_argument("--lengths", default="4096,16384,65536")
            p.add_argument("--places", default="device,cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"targets": cmd_targets, "boundary": cmd_boundary, "profile": cmd_profile}[args.cmd](args)


if __name__ == "__main__":
    main()
