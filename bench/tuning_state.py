"""model.train_mode state against full on the same RWKV-7 and sample (CPU stand-ins): S0's exactness,
peak memory, tokens/s, optimizer-state bytes, and peak memory at 64k ÷ 4k tokens.

    python bench/tuning_state.py exactness   # S0's gradient: 4 segments vs one pass, full and truncated
    python bench/tuning_state.py compare     # full vs state: one fresh process per (mode, length)

`compare` runs one training step (segmented exact BPTT, then an AdamW step) per child process, on an
RWKV-7 of bench/bptt.py's stand-in size (L2 C256 V1024, ctx_len 512, fp32, the chunked WKV op), with
glibc's allocator tamed as in bench/bptt.py's `memory` so that peak RSS reflects live memory. The
optimizer state is counted after the step: AdamW's moments of every parameter that trains. Columns:
start (RSS before the step: interpreter, imports, model, batch), peak RSS and peak − start ("step")
per length, peak at the longest ÷ peak at the shortest length, and tokens/s of that one step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bptt import TAME_MALLOC, make_batch, make_model
from rwkv_infctx.training.optim import OptimConfig, make_optimizer
from rwkv_infctx.training.segments import bptt_step
from rwkv_infctx.training.tuning.state import apply_state_tuning, initial_states


def state_model(args, dtype=torch.float32):
    """bench/bptt.py's RWKV-7 in state mode, S0 random (as after some training)."""
    model = make_model(args, dtype)
    apply_state_tuning(model, None)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for s in initial_states(model):
            s.copy_(0.3 * torch.randn(s.shape, generator=gen, dtype=s.dtype))
    return model.to(dtype)


def s0_grad(model) -> torch.Tensor:
    out = torch.cat([s.grad.flatten() for s in initial_states(model)])
    model.zero_grad(set_to_none=True)
    return out


def cmd_exactness(args) -> None:
    T = args.tokens
    print(f"S0 gradient, rwkv7 L{args.n_layer} C{args.n_embd} V{args.vocab_size}, {T} tokens, batch 2")
    print(f"{'dtype':8} {'segments':>8}  {'bptt':10} {'max rel. error vs one pass':>27}")
    for dtype in (torch.float32, torch.float64):
        model = state_model(args, dtype)
        batch = make_batch([T, T], args.vocab_size)
        proxy, _ = bptt_step(model, batch, T)
        proxy.backward()
        ref = s0_grad(model)
        for bptt in ("full", "truncated"):
            proxy, _ = bptt_step(model, batch, T // 4, bptt=bptt)
            proxy.backward()
            err = float((s0_grad(model) - ref).abs().max() / ref.abs().max())
            print(f"{str(dtype).removeprefix('torch.'):8} {4:>8}  {bptt:10} {err:>27.2e}")


def cmd_step(args) -> None:
    """One measured step in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    model = state_model(args) if args.mode == "state" else make_model(args)
    batch = make_batch([args.tokens], args.vocab_size, seed=1)
    optimizer = make_optimizer(model, OptimConfig(lr_init=1e-4))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    proxy, _ = bptt_step(model, batch, args.ctx_len)
    proxy.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
    out = {
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_mb": rss_before,
        "seconds": seconds,
        "optimizer_state_bytes": state,
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    print(json.dumps(out))


def run_child(args, mode: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "step", "--mode", mode, "--tokens", str(tokens)]
    for key in ("n_layer", "n_embd", "vocab_size", "ctx_len", "threads", "wkv_backend"):
        cmd += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(cmd, env={**os.environ, **TAME_MALLOC}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cmd_compare(args) -> None:
    lengths = [int(n) for n in args.lengths.split(",")]
    print(
        f"rwkv7 L{args.n_layer} C{args.n_embd} V{args.vocab_size}, ctx_len {args.ctx_len}, fp32, "
        f"CPU threads {args.threads}; one step + AdamW step per fresh process"
    )
    cols = "".join(f"{'peak ' + str(n // 1024) + 'k':>10}{'step':>7}" for n in lengths)
    tps = "".join(f"{'tok/s ' + str(n // 1024) + 'k':>11}" for n in lengths)
    print(f"{'mode':6}{'trained':>11}{'opt. MB':>9}{'start':>7}{cols}{'ratio':>7}{tps}   (RSS, MB)")
    for mode in args.modes.split(","):
        runs = [run_child(args, mode, n) for n in lengths]
        cells = "".join(
            f"{r['peak_rss_mb']:>10.0f}{r['peak_rss_mb'] - r['rss_before_mb']:>7.0f}" for r in runs
        )
        ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
        rates = "".join(f"{n / r['seconds']:>11.0f}" for n, r in zip(lengths, runs, strict=True))
        state, start = runs[0]["optimizer_state_bytes"] / 2**20, runs[0]["rss_before_mb"]
        print(
            f"{mode:6}{runs[0]['trained']:>11,}{state:>9.2f}{start:>7.0f}{cells}{ratio:>7.2f}{rates}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    specs = {
        "exactness": {"n_layer": 2, "n_embd": 128, "vocab_size": 1000, "tokens": 1024},
        "compare": {
            "n_layer": 2,
            "n_embd": 256,
            "vocab_size": 1024,
            "lengths": "4096,65536",
            "modes": "full,state",
        },
        "step": {"n_layer": 2, "n_embd": 256, "vocab_size": 1024, "tokens": 4096, "mode": "full"},
    }
    for name, defaults in specs.items():
        p = sub.add_parser(name)
        for key, value in defaults.items():
            p.add_argument(f"--{key}", type=type(value), default=value)
        p.add_argument("--ctx_len", type=int, default=512)
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
        p.add_argument("--wkv_backend", default="chunked")
        p.add_argument("--arch", default="rwkv7")
    args = parser.parse_args()
    {"exactness": cmd_exactness, "compare": cmd_compare, "step": cmd_step}[args.cmd](args)


if __name__ == "__main__":
    main()
