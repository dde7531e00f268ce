"""Segmented BPTT benchmarks: exactness, peak memory against length, and throughput.

    python bench/bptt.py exactness                 # gradient error vs unsegmented, fp32 and fp64
    python bench/bptt.py memory                    # peak RSS of one step at 4k/16k/64k tokens
    python bench/bptt.py throughput                # tokens/s: full vs unsegmented, 64k vs 4k
    python bench/bptt.py memory --vocab_size 50277 --ctx_len 4096 --lengths 4096,16384 \
        --modes full,full_unchunked                # the head's logits in chunks, or whole
    python bench/bptt.py compare --against OLD/src/rwkv_infctx/training/segments.py
                                                   # tokens/s of this bptt_step and another's
    python bench/bptt.py memory --arch rwkv4,rwkv7 # one table per model family, same dims

`--arch` picks the model family (`model.registry`; default rwkv4; memory and throughput take a
comma-separated list). bench/families.py prints issue 16's stand-in figures for both families and
peak memory with the boundary states on the device or on the host, through this script's children.

`memory` and `throughput` run every measurement in a fresh child process. For `memory` the child's
environment tames glibc's allocator (MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=0 MALLOC_TOP_PAD_=0;
see shared/NOTES-segments.md item 4), so peak RSS reflects live memory. `throughput` keeps the
ordinary allocator: the tamed one returns every freed block to the OS, which taxes the segmented
modes' many per-segment allocations with page faults and is not how training runs. Modes:
    full         segmented, exact BPTT (bptt_step, bptt="full"); head and loss in chunks of
                 loss_chunk positions (default 1024)
    full_unchunked  the same with one chunk per segment (a whole segment's logits at once)
    truncated    segmented, state detached at each boundary (bptt_step, bptt="truncated")
    unsegmented  ordinary autograd over the whole sample (model(tokens) → loss → backward)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch import nn

from rwkv_infctx.model.registry import FAMILIES, family_named
from rwkv_infctx.training.loss import LOSS_CHUNK, objective, segment_terms, token_count
from rwkv_infctx.training.segments import bptt_step

WHOLE_SEGMENT = 1 << 62
TAME_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_TOP_PAD_": "0"}


def make_model(args, dtype=torch.float32, seed: int = 0) -> nn.Module:
    """A model of family `args.arch` (one name) with `args`' dims, initialised and perturbed."""
    family = family_named(args.arch, "--arch")
    cfg = family.config_cls(
        n_layer=args.n_layer, n_embd=args.n_embd, vocab_size=args.vocab_size, wkv_backend=args.wkv_backend
    )
    model = family.init_weights(family.model_cls(cfg), seed)
    with torch.no_grad():  # init zeroes several matrices; random weights exercise every gradient path
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.to(dtype)


def make_batch(lengths: list[int], vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T + 1), generator=gen)
    mask = torch.zeros(len(lengths), T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    return {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:], "loss_mask": mask}


def unsegmented_step(model: nn.Module, batch) -> float:
    logits, _ = model(batch["input_ids"])
    ce, l2 = segment_terms(logits, batch["target_ids"], batch["loss_mask"])
    loss = objective(ce, l2, token_count(batch["loss_mask"]))
    loss.backward()
    return float(ce.detach()) / float(token_count(batch["loss_mask"]))


def train_step(
    model: nn.Module,
    batch,
    mode: str,
    ctx_len: int,
    loss_chunk: int = LOSS_CHUNK,
    boundary_states: str = "device",
) -> tuple[float, int]:
    """One step's loss and boundary-state bytes (StepReport.boundary_bytes; 0 when unsegmented)."""
    if mode == "unsegmented":
        return unsegmented_step(model, batch), 0
    chunk, bptt = (WHOLE_SEGMENT, "full") if mode == "full_unchunked" else (loss_chunk, mode)
    proxy, report = bptt_step(
        model, batch, ctx_len, bptt=bptt, loss_chunk=chunk, boundary_states=boundary_states
    )
    proxy.backward()
    return report.loss, report.boundary_bytes


def grads(model: nn.Module) -> torch.Tensor:
    out = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return out


# ---- exactness -------------------------------------------------------------------------------
def cmd_exactness(args) -> None:
    for one in per_arch(args):
        _exactness(one)


def _exactness(args) -> None:
    T = args.tokens
    print(
        f"{args.arch}: model L{args.n_layer} C{args.n_embd} V{args.vocab_size}; "
        f"rows of {T} and {T - T // 3} tokens"
    )
    print(f"{'dtype':8} {'ctx_len':>8} {'segments':>8}  {'bptt':10} {'max rel. grad error':>20}  goal")
    for dtype, goal in ((torch.float32, 1e-6), (torch.float64, 1e-10)):
        model = make_model(args, dtype)
        batch = make_batch([T, T - T // 3], args.vocab_size)
        unsegmented_step(model, batch)
        ref = grads(model)
        for ctx_len, mode in ((T, "full"), (T // 4, "full"), (round(T / 7), "full"), (T // 4, "truncated")):
            train_step(model, batch, mode, ctx_len)
            err = float((grads(model) - ref).abs().max() / ref.abs().max())
            verdict = (
                ("ok" if err <= goal else "FAIL") if mode == "full" else ("differs" if err > 1e-3 else "?")
            )
            name = str(dtype).removeprefix("torch.")
            n_seg = -(-T // ctx_len)
            print(f"{name:8} {ctx_len:>8} {n_seg:>8}  {mode:10} {err:>20.3e}  ≤{goal:.0e} {verdict}")


# ---- one measured step in this process (the child of memory/throughput) ----------------------
def pick_device(name: str) -> torch.device:
    """The named device; "auto" is CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cmd_step(args) -> None:
    """Run one step per mode in `args.mode` (comma-separated), alternating, `repeat` rounds.

    Prints one JSON line: peak RSS (MB) and the peak before the first step (the process, the
    model and the batch), best seconds per mode, boundary-state bytes per mode, and
    on CUDA the peak of torch.cuda.max_memory_allocated over the steps (MB)."""
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    model = make_model(args).to(device)
    batch = {k: v.to(device) for k, v in make_batch([args.tokens], args.vocab_size, seed=1).items()}
    modes = args.mode.split(",")
    times: dict[str, list[float]] = {m: [] for m in modes}
    nbytes: dict[str, int] = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process, model, batch
    for _ in range(args.repeat):  # alternating: load from other processes hits every mode alike
        for mode in modes:
            _sync(device)
            t0 = time.perf_counter()
            _, nbytes[mode] = train_step(
                model, batch, mode, args.ctx_len, args.loss_chunk, args.boundary_states
            )
            _sync(device)
            times[mode].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    out = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before,
        "seconds": {m: min(t) for m, t in times.items()},
        "boundary_bytes": nbytes,
        "device": str(device),
    }
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    print(json.dumps(out))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_child(args, mode: str, tokens: int, repeat: int, tame_malloc: bool) -> dict:
    """One `step` child for the single family `args.arch`; its JSON line as a dict."""
    cmd = [sys.executable, __file__, "step", "--mode", mode, "--tokens", str(tokens), "--repeat", str(repeat)]
    for key in CHILD_KEYS:
        cmd += [f"--{key}", str(getattr(args, key))]
    env = {**os.environ, **(TAME_MALLOC if tame_malloc else {})}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(cmd)}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CHILD_KEYS = (
    "arch", "ctx_len", "n_layer", "n_embd", "vocab_size", "wkv_backend", "threads", "loss_chunk",
    "boundary_states", "device",
)  # fmt: skip
"""The options a `step` child inherits from its parent."""


def per_arch(args) -> list[argparse.Namespace]:
    """One copy of `args` per family named in `args.arch` (comma-separated)."""
    archs = args.arch.split(",")
    for arch in archs:
        family_named(arch, "--arch")
    return [argparse.Namespace(**{**vars(args), "arch": arch}) for arch in archs]


def _header(args) -> None:
    print(
        f"{args.arch}: model L{args.n_layer} C{args.n_embd} V{args.vocab_size}, "
        f"wkv_backend={args.wkv_backend}, ctx_len {args.ctx_len}, loss_chunk {args.loss_chunk}, "
        f"batch 1, fp32, device {args.device}, CPU threads {args.threads}; one fresh process per cell"
    )


def cmd_memory(args) -> None:
    for one in per_arch(args):
        _memory(one)


def _memory(args) -> None:
    _header(args)
    lengths = [int(x) for x in args.lengths.split(",")]
    print(f"{'mode':12}" + "".join(f"{n:>12,}" for n in lengths) + f"{'ratio':>10}   (peak RSS, MB)")
    for mode in args.modes.split(","):
        rss = [run_child(args, mode, n, 1, tame_malloc=True)["peak_rss_mb"] for n in lengths]
        print(f"{mode:12}" + "".join(f"{r:>12.0f}" for r in rss) + f"{rss[-1] / rss[0]:>10.2f}", flush=True)


def cmd_throughput(args) -> None:
    """All modes in one child per length, alternating, best of `repeat` (the machine may be shared)."""
    for one in per_arch(args):
        _throughput(one)


def _throughput(args) -> None:
    _header(args)
    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    seconds = [run_child(args, args.modes, n, args.repeat, tame_malloc=False)["seconds"] for n in lengths]
    head = f"{'mode':12}" + "".join(f"{n:>12,}" for n in lengths)
    print(head + f"{'ratio':>10}   (tokens/s, best of {args.repeat}, modes alternating in one process)")
    rates = {m: [n / s[m] for n, s in zip(lengths, seconds, strict=True)] for m in modes}
    for mode, r in rates.items():
        print(f"{mode:12}" + "".join(f"{x:>12.0f}" for x in r) + f"{r[-1] / r[0]:>10.2f}")
    if "full" in rates and "unsegmented" in rates:
        ratio = [f / u for f, u in zip(rates["full"], rates["unsegmented"], strict=True)]
        print(f"{'full/unseg':12}" + "".join(f"{x:>12.2f}" for x in ratio))


# ---- compare: this bptt_step against another version's, in one process -------------------------
def cmd_compare(args) -> None:
    """Alternate this `bptt_step` and the one of the `segments.py` at `--against` (e.g. a git worktree
    of an earlier commit; it runs against this checkout's model and loss modules); best of repeat."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("other_segments", args.against)
    other = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = other  # dataclasses look their module up
    spec.loader.exec_module(other)
    torch.set_num_threads(args.threads)
    model = make_model(args)
    batch = make_batch([args.tokens], args.vocab_size, seed=1)
    steps = {"other": other.bptt_step, "this": bptt_step}
    seconds: dict[str, list[float]] = {k: [] for k in steps}
    got = {}
    for _ in range(args.repeat):
        for name, step in steps.items():
            t0 = time.perf_counter()
            proxy, _ = step(model, batch, args.ctx_len)
            proxy.backward()
            seconds[name].append(time.perf_counter() - t0)
            got[name] = grads(model)
    err = float((got["this"] - got["other"]).abs().max() / got["other"].abs().max())
    rate = {k: args.tokens / min(v) for k, v in seconds.items()}
    print(
        f"model L{args.n_layer} C{args.n_embd} V{args.vocab_size}, ctx_len {args.ctx_len}, "
        f"{args.tokens} tokens, best of {args.repeat}: other {rate['other']:.0f} tok/s, "
        f"this {rate['this']:.0f} tok/s, this/other {rate['this'] / rate['other']:.2f}; "
        f"max rel. grad difference {err:.1e}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    specs = {
        "exactness": dict(n_layer=2, n_embd=64, vocab_size=1000, tokens=1024),
        "memory": dict(
            n_layer=2,
            n_embd=256,
            vocab_size=1024,
            lengths="4096,16384,65536",
            modes="full,truncated,unsegmented",
        ),
        "throughput": dict(
            n_layer=2,
            n_embd=256,
            vocab_size=1024,
            lengths="4096,65536",
            modes="full,truncated,unsegmented",
            repeat=2,
        ),
        "step": dict(n_layer=2, n_embd=256, vocab_size=1024, tokens=4096, mode="full", repeat=1),
        "compare": dict(n_layer=4, n_embd=128, vocab_size=50277, tokens=8192, repeat=3, against=""),
    }
    for name, defaults in specs.items():
        p = sub.add_parser(name)
        for key, value in defaults.items():
            p.add_argument(f"--{key}", type=type(value), default=value)
        p.add_argument("--ctx_len", type=int, default=512)
        p.add_argument("--wkv_backend", default="auto")
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
        p.add_argument("--loss_chunk", type=int, default=LOSS_CHUNK, help="positions per loss chunk")
        p.add_argument(
            "--arch", default="rwkv4", help=f"model family, or a comma list of {', '.join(FAMILIES)}"
        )
        p.add_argument("--boundary_states", default="device", help="bptt_step's boundary_states")
        p.add_argument("--device", default="cpu", help="cpu, cuda or auto (CUDA when available)")
    args = parser.parse_args(argv)
    commands = {
        "exactness": cmd_exactness,
        "memory": cmd_memory,
        "throughput": cmd_throughput,
        "step": cmd_step,
        "compare": cmd_compare,
    }
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
