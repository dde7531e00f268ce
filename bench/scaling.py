"""Training throughput (tokens/s) for each distributed strategy, on 1 GPU and on more where present.

    python bench/scaling.py                       # every strategy on 1 GPU, then on all GPUs
    python bench/scaling.py --gpus 1,2,4,8 --strategies ddp,deepspeed_stage_2
    python bench/scaling.py --smoke               # CPU smoke test: tiny model, 1 and 2 CPU ranks

Each cell is a fresh `torchrun` of this file (`--worker`): RWKVModule with segmented BPTT on
synthetic samples of `--length` tokens (one per rank per micro-step), `--steps` optimizer steps of
which the first `--warmup` are not timed. Reported from the median step time: tokens/s over all
ranks, per device, and the scaling efficiency against the same strategy on one device. The CPU
smoke run uses the test-only DeepSpeed CPU strategy (tests/distributed/cpu_deepspeed.py); its
figures say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = [
    "ddp",
    "deepspeed_stage_1",
    "deepspeed_stage_2",
    "deepspeed_stage_2_offload",
    "deepspeed_stage_3",
    "deepspeed_stage_3_offload",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model, 1 and 2 ranks over gloo")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--gpus", default=None, help="device counts, e.g. 1,2,8 (default: 1 and all)")
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--vocab_size", type=int, default=50277)
    p.add_argument("--ctx_len", type=int, default=512)
    p.add_argument("--length", type=int, default=4096, help="tokens per sample")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precision", default="bf16-mixed")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "STRATEGY,DEVICES,OUT.json"
    args = p.parse_args(argv)
    if args.smoke:
        args.n_layer, args.n_embd, args.vocab_size, args.ctx_len, args.length = 2, 64, 1000, 64, 512
        args.steps, args.warmup, args.precision = 6, 2, "32-true"
    return args


def worker(args: argparse.Namespace) -> None:
    """One rank of one cell: fit for `steps` steps, rank 0 writes tokens/s to OUT.json."""
    import lightning.pytorch as pl
    import numpy as np
    from torch.utils.data import DataLoader

    from rwkv_infctx.data.collator import collate
    from rwkv_infctx.training.module import RWKVModule

    strategy_name, devices, out = args.worker.split(",")
    devices = int(devices)
    module = RWKVModule(
        arch="rwkv4",
        n_layer=args.n_layer,
        n_embd=args.n_embd,
        vocab_size=args.vocab_size,
        ctx_len=args.ctx_len,
        warmup_steps=0,
    )
    rng = np.random.default_rng(0)
    samples = [
        {"input_ids": rng.integers(0, args.vocab_size, args.length + 1)} for _ in range(devices * args.steps)
    ]
    loader = DataLoader(samples, batch_size=1, collate_fn=collate)
    timer = _Timer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu" if args.smoke else "gpu",
        devices=devices,
        strategy=_strategy(strategy_name, args.smoke),
        precision=args.precision,
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, loader)
    if trainer.is_global_zero:
        tokens_per_step = args.length * devices
        Path(out).write_text(json.dumps({"tokens_per_s": tokens_per_step / timer.step_time}))


def _strategy(name: str, cpu: bool):
    if not (cpu and name.startswith("deepspeed")):
        return name
    sys.path.insert(0, str(REPO))
    from tests.distributed.cpu_deepspeed import CPUDeepSpeedStrategy

    stage, offload = int(name.split("_")[2]), name.endswith("offload")
    return CPUDeepSpeedStrategy(
        stage=stage, offload_optimizer=offload, offload_parameters=offload and stage == 3
    )


class _Timer:
    """Wall time of each optimizer step after the first `warmup` (a Lightning callback)."""

    def __new__(cls, warmup: int):
        import lightning.pytorch as pl

        class Timer(pl.Callback):
            def __init__(self) -> None:
                self.start = 0.0
                self.times: list[float] = []

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                _sync(pl_module)
                self.start = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                _sync(pl_module)
                if batch_idx >= warmup:
                    self.times.append(time.perf_counter() - self.start)

            @property
            def step_time(self) -> float:
                """Median seconds per step (robust to a shared machine's hiccups)."""
                return statistics.median(self.times)

        return Timer()


def _sync(pl_module) -> None:
    import torch

    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


def run_cell(args: argparse.Namespace, strategy: str, devices: int) -> dict | str:
    """One torchrun of `devices` ranks; the worker's figures, or why it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}"]
        cmd += [__file__, "--worker", f"{strategy},{devices},{out}", *_model_flags(args)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        if args.smoke:  # one core per rank, so 1 and 2 ranks compare like for like
            env["OMP_NUM_THREADS"] = "1"
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return f"timed out after {args.timeout} s"
        if done.returncode != 0 or not out.exists():
            lines = [line for line in done.stderr.splitlines() if "Error" in line]
            return (lines[-1] if lines else f"exit {done.returncode}")[:120]
        return json.loads(out.read_text())


def _model_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--n_layer", args.n_layer, "--n_embd", args.n_embd, "--vocab_size", args.vocab_size]
    flags += ["--ctx_len", args.ctx_len, "--length", args.length, "--steps", args.steps]
    flags += ["--warmup", args.warmup, "--precision", args.precision]
    return [str(f) for f in flags] + (["--smoke"] if args.smoke else [])


def device_counts(args: argparse.Namespace) -> list[int]:
    if args.gpus:
        return [int(n) for n in args.gpus.split(",")]
    if args.smoke:
        return [1, 2]
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        sys.exit("no CUDA device: run with --smoke for the CPU smoke test")
    return sorted({1, n})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    counts = device_counts(args)
    kind = "CPU ranks (smoke test, not a GPU figure)" if args.smoke else "GPUs"
    print(
        f"model L{args.n_layer} C{args.n_embd} V{args.vocab_size}, ctx_len {args.ctx_len}, "
        f"samples of {args.length} tokens, 1 per rank per step, precision {args.precision}, "
        f"median of {args.steps - args.warmup} timed steps; devices = {kind}"
    )
    print(f"{'strategy':28} {'devices':>7} {'tokens/s':>10} {'per device':>11} {'efficiency':>10}")
    for strategy in args.strategies.split(","):
        base = None
        for n in counts:
            result = run_cell(args, strategy, n)
            if isinstance(result, str):
                print(f"{strategy:28} {n:>7}  failed: {result}")
                continue
            tps = result["tokens_per_s"]
            base = base if base is not None else (tps if n == 1 else None)
            eff = f"{tps / (n * base):10.2f}" if base else f"{'-':>10}"
            print(f"{strategy:28} {n:>7} {tps:10.0f} {tps / n:11.0f} {eff}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
