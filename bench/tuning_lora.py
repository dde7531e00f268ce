"""model.train_mode lora against full on the same model and sample (CPU stand-ins): exactness, peak
memory, tokens/s, optimizer-state bytes, and peak memory at 64k ÷ 4k tokens.

    python bench/tuning_lora.py exactness   # adapter gradients, 4 segments vs one pass, both families
    python bench/tuning_lora.py compare     # full vs lora: one fresh process per (mode, length)
    python bench/tuning_lora.py speed       # tokens/s, full and lora alternating in one process

`compare` runs one training step (segmented exact BPTT, then an AdamW step) per child process, on an
RWKV-7 of bench/bptt.py's stand-in size (L2 C256 V1024, ctx_len 512, fp32, the chunked WKV op),
with glibc's allocator tamed as in bench/bptt.py's `memory` so that peak RSS reflects live memory.
The optimizer state is counted after the step: AdamW's moments of every parameter that trains.
Columns: start (RSS before the step: interpreter, imports, peft in every mode, model, batch), peak
RSS and peak − start ("step") per length, peak 64k ÷ peak 4k, and tokens/s of that one step.
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
from rwkv_infctx.training.tuning.lora import LoraOptions, apply_lora


def lora_model(args, dtype=torch.float32):
    """bench/bptt.py's model with rank-r adapters; B made random so every adapter gradient is live."""
    model = make_model(args, dtype)
    apply_lora(model, LoraOptions(r=args.lora_r, alpha=float(args.lora_r)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def trained_grads(model) -> torch.Tensor:
    out = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return out


def cmd_exactness(args) -> None:
    T = args.tokens
    print(
        f"adapter gradients (r={args.lora_r}), model L{args.n_layer} C{args.n_embd} "
        f"V{args.vocab_size}, {T} tokens"
    )
    print(f"{'arch':6} {'dtype':8} {'segments':>8}  {'bptt':10} {'max rel. error vs one pass':>27}")
    for arch in ("rwkv4", "rwkv7"):
        for dtype in (torch.float32, torch.float64):
            model = lora_model(argparse.Namespace(**{**vars(args), "arch": arch}), dtype)
            batch = make_batch([T], args.vocab_size)
            proxy, _ = bptt_step(model, batch, T)
            proxy.backward()
            ref = trained_grads(model)
            for bptt in ("full", "truncated"):
                proxy, _ = bptt_step(model, batch, T // 4, bptt=bptt)
                proxy.backward()
                err = float((trained_grads(model) - ref).abs().max() / ref.abs().max())
                name = str(dtype).removeprefix("torch.")
                print(f"{arch:6} {name:8} {4:>8}  {bptt:10} {err:>27.2e}")


def cmd_step(args) -> None:
    """One measured step in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (in every mode: its import, ~40 MB of RSS, is not the mode's memory)

    model = lora_model(args) if args.mode == "lora" else make_model(args)
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
        "params": sum(p.numel() for p in model.parameters()),
    }
    print(json.dumps(out))


def run_child(args, mode: str, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "step", "--mode", mode, "--tokens", str(tokens)]
    for key in ("n_layer", "n_embd", "vocab_size", "ctx_len", "lora_r", "threads", "wkv_backend"):
        cmd += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(cmd, env={**os.environ, **TAME_MALLOC}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cmd_compare(args) -> None:
    lengths = [int(n) for n in args.lengths.split(",")]
    print(
        f"rwkv7 L{args.n_layer} C{args.n_embd} V{args.vocab_size}, ctx_len {args.ctx_len}, "
        f"lora r={args.lora_r}, fp32, CPU threads {args.threads}; one step + AdamW step per fresh process"
    )
    cols = "".join(f"{'peak ' + str(n // 1024) + 'k':>10}{'step':>7}" for n in lengths)
    tps = "".join(f"{'tok/s ' + str(n // 1024) + 'k':>11}" for n in lengths)
    print(f"{'mode':6}{'trained':>11}{'opt. MB':>9}{'start':>7}{cols}{'ratio':>7}{tps}   (RSS, MB)")
    for mode in args.modes.split(","):
        runs = [run_child(args, mode, n) for n in lengths]
        peaks = [(r["peak_rss_mb"], r["peak_rss_mb"] - r["rss_before_mb"]) for r in runs]
        cells = "".join(f"{peak:>10.0f}{step:>7.0f}" for peak, step in peaks)
        ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
        rates = "".join(f"{n / r['seconds']:>11.0f}" for n, r in zip(lengths, runs, strict=True))
        state, start = runs[0]["optimizer_state_bytes"] / 2**20, runs[0]["rss_before_mb"]
        row = f"{mode:6}{runs[0]['trained']:>11,}{state:>9.2f}{start:>7.0f}{cells}{ratio:>7.2f}{rates}"
        print(row, flush=True)


def cmd_speed(args) -> None:
    """Both modes in one process, steps alternating (load from other processes hits both alike),
    best of `repeat`, after one unmeasured warm-up step each."""
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    models = {m: lora_model(args) if m == "lora" else make_model(args) for m in modes}
    optimizers = {m: make_optimizer(models[m], OptimConfig(lr_init=1e-4)) for m in modes}
    batch = make_batch([args.tokens], args.vocab_size, seed=1)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.repeat + 1):
        for m in modes:
            t0 = time.perf_counter()
            proxy, _ = bptt_step(models[m], batch, args.ctx_len)
            proxy.backward()
            optimizers[m].step()
            optimizers[m].zero_grad(set_to_none=True)
            if i:
                seconds[m].append(time.perf_counter() - t0)
    rates = {m: args.tokens / min(t) for m, t in seconds.items()}
    print(
        f"rwkv7 L{args.n_layer} C{args.n_embd} V{args.vocab_size}, ctx_len {args.ctx_len}, {args.tokens} "
        f"tokens, lora r={args.lora_r}, fp32, CPU threads {args.threads}; best of {args.repeat}, alternating"
    )
    print("  ".join(f"{m} {r:.0f} tok/s" for m, r in rates.items()), end="")
    print(f"; lora/full {rates['lora'] / rates['full']:.2f}" if {"full", "lora"} <= rates.keys() else "")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    specs = {
        "exactness": {"n_layer": 2, "n_embd": 64, "vocab_size": 1000, "tokens": 1024},
        "compare": {
            "n_layer": 2,
            "n_embd": 256,
            "vocab_size": 1024,
            "lengths": "4096,65536",
            "modes": "full,lora",
        },
        "step": {"n_layer": 2, "n_embd": 256, "vocab_size": 1024, "tokens": 4096, "mode": "full"},
        "speed": {
            "n_layer": 2,
            "n_embd": 256,
            "vocab_size": 1024,
            "tokens": 4096,
            "modes": "full,lora",
            "repeat": 3,
        },
    }
    for name, defaults in specs.items():
        p = sub.add_parser(name)
        for key, value in defaults.items():
            p.add_argument(f"--{key}", type=type(value), default=value)
        p.add_argument("--ctx_len", type=int, default=512)
        p.add_argument("--lora_r", type=int, default=32)
        p.add_argument("--threads", type=int, default=torch.get_num_threads())
        p.add_argument("--wkv_backend", default="chunked")
        p.add_argument("--arch", default="rwkv7")
    args = parser.parse_args()
    commands = {"exactness": cmd_exactness, "compare": cmd_compare, "step": cmd_step, "speed": cmd_speed}
    commands[args.cmd](args)


if __name__ == "__main__":
    main()
