"""What each `model.train_mode` costs, side by side on the same model and sample (CPU stand-ins):
exactness of the trained parameters' gradients, peak memory, tokens/s, optimizer-state bytes, and
peak memory at 64k ÷ 4k tokens.

    python bench/tuning.py exactness   # lora (both families) and state (RWKV-7): 4 segments vs one pass
    python bench/tuning.py compare     # full, lora, state: one fresh process per (mode, length)
    python bench/tuning.py speed       # tokens/s, the modes alternating in one process

`compare` runs one training step (segmented exact BPTT, then an AdamW step) per child process, on an
RWKV-7 of bench/bptt.py's stand-in size (L2 C256 V1024, ctx_len 512, fp32, the chunked WKV op),
with glibc's allocator tamed as in bench/bptt.py's `memory` so that peak RSS reflects live memory.
peft is imported in every mode (its ~40 MB are not a mode's cost). The optimizer state is counted
after the step: AdamW's moments of every parameter that trains. Columns: start (RSS before the
step: interpreter, imports, model, batch), peak RSS and peak − start ("step") per length, peak at
the longest ÷ peak at the shortest length, and tokens/s of that one step.
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bptt import TAME_MALLOC, make_batch, make_model
from rwkv_infctx.training.optim import OptimConfig, make_optimizer
from rwkv_infctx.training.segments import bptt_step
from rwkv_infctx.training.tuning.lora import LoraOptions, apply_lora
from rwkv_infctx.training.tuning.state import apply_state_tuning, initial_states

MODES = ("full", "lora", "state")


def tuned_model(args, mode: str, dtype=torch.float32) -> nn.Module:
    """bench/bptt.py's model in `mode`. What trains is made random (LoRA B, S0), as after some
    training, so that every gradient of it is live."""
    model = make_model(args, dtype)
    gen = torch.Generator().manual_seed(3)
    if mode == "lora":
        apply_lora(model, LoraOptions(r=args.lora_r, alpha=float(args.lora_r)))
        live = [p for name, p in model.named_parameters() if "lora_B" in name]
        scale = 0.05
    elif mode == "state":
        apply_state_tuning(model, None)
        live, scale = initial_states(model), 0.3
    else:
        return model
    with torch.no_grad():
        for p in live:
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype)


def trained_grads(model: nn.Module) -> torch.Tensor:
    out = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return out


def cmd_exactness(args) -> None:
    T = args.tokens
    print(
        f"gradients of what trains (lora r={args.lora_r}; state: S0), L{args.n_layer} C{args.n_embd} "
        f"V{args.vocab_size}, batch 2 × {T} tokens, 4 segments against one"
    )
    print(f"{'mode':6} {'arch':6} {'dtype':8} {'bptt':10} {'max rel. error vs one pass':>27}")
    cases = [("lora", "rwkv4"), ("lora", "rwkv7"), ("state", "rwkv7")]
    for mode, arch in cases:
        for dtype in (torch.float32, torch.float64):
            model = tuned_model(argparse.Namespace(**{**vars(args), "arch": arch}), mode, dtype)
            batch = make_batch([T, T], args.vocab_size)
            proxy, _ = bptt_step(model, batch, T)
            proxy.backward()
            ref = trained_grads(model)
            for bptt in ("full", "truncated"):
                proxy, _ = bptt_step(model, batch, T // 4, bptt=bptt)
                proxy.backward()
                err = float((trained_grads(model) - ref).abs().max() / ref.abs().max())
                name = str(dtype).removeprefix("torch.")
                print(f"{mode:6} {arch:6} {name:8} {bptt:10} {err:>27.2e}", flush=True)


def one_step(model: nn.Module, optimizer, batch, ctx_len: int) -> float:
    """Seconds of one training step: segmented exact BPTT, backward, optimizer step."""
    t0 = time.perf_counter()
    proxy, _ = bptt_step(model, batch, ctx_len)
    proxy.backward()
    optimizer.step()
    seconds = time.perf_counter() - t0
    optimizer.zero_grad(set_to_none=True)
    return seconds


def cmd_step(args) -> None:
    """One measured step in this process; prints a JSON line."""
    torch.set_num_threads(args.threads)
    import peft  # noqa: F401  (in every mode: its import is not the mode's memory)

    model = tuned_model(args, args.mode)
    batch = make_batch([args.tokens], args.vocab_size, seed=1)
    optimizer = make_optimizer(model, OptimConfig(lr_init=1e-4))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = one_step(model, optimizer, batch, args.ctx_len)
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
    for key in ("n_layer", "n_embd", "vocab_size", "ctx_len", "lora_r", "threads", "wkv_backend"):
        cmd += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(cmd, env={**os.environ, **TAME_MALLOC}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def describe(args) -> str:
    return (
        f"rwkv7 L{args.n_layer} C{args.n_embd} V{args.vocab_size}, ctx_len {args.ctx_len}, lora "
        f"r={args.lora_r}, fp32, CPU threads {args.threads}"
    )


def cmd_compare(args) -> None:
    lengths = [int(n) for n in args.lengths.split(",")]
    print(f"{describe(args)}; one step + AdamW step per fresh process")
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
        row = f"{mode:6}{runs[0]['trained']:>11,}{state:>9.2f}{start:>7.0f}{cells}{ratio:>7.2f}{rates}"
        print(row, flush=True)


def cmd_speed(args) -> None:
    """The modes in one process, steps alternating (load from other processes hits all alike),
    best of `repeat`, after one unmeasured warm-up step each."""
    torch.set_num_threads(args.threads)
    modes = args.modes.split(",")
    models = {m: tuned_model(args, m) for m in modes}
    optimizers = {m: make_optimizer(models[m], OptimConfig(lr_init=1e-4)) for m in modes}
    batch = make_batch([args.tokens], args.vocab_size, seed=1)
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.repeat + 1):
        for m in modes:
            took = one_step(models[m], optimizers[m], batch, args.ctx_len)
            if i:
                seconds[m].append(took)
    rates = {m: args.tokens / min(t) for m, t in seconds.items()}
    print(f"{describe(args)}, {args.tokens} tokens; best of {args.repeat}, modes alternating")
    first = modes[0]
    for m, r in rates.items():
        print(f"{m:6} {r:8.0f} tok/s   ÷ {first}: {r / rates[first]:.2f}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    stand_in = {"n_layer": 2, "n_embd": 256, "vocab_size": 1024}
    specs = {
        "exactness": {"n_layer": 2, "n_embd": 128, "vocab_size": 1000, "tokens": 1024},
        "compare": {**stand_in, "lengths": "4096,65536", "modes": ",".join(MODES)},
        "step": {**stand_in, "tokens": 4096, "mode": "full"},
        "speed": {**stand_in, "tokens": 4096, "modes": ",".join(MODES), "repeat": 3},
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
