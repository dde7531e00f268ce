"""Wall time of the README's demo (RWKV-7) against the same demo with RWKV-4, side by side.

    python bench/demo_time.py [--max_steps 30] [--rounds 1]

Each run is `rwkv-infctx fit -c pkg://<config>` in a fresh child process and a fresh folder (the
data is prepared once beforehand and shared, so both runs time training, validation, export and the
sample). With --rounds > 1 the two alternate, so a change in the machine's load hits both. Prints
each run's wall time and CPU time (user + system of the child), its losses (the last, the mean of
the last five steps, each validation), each round's wall-time ratio RWKV-7 / RWKV-4, and the ratios
of the best times.
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CONFIGS = {"rwkv7": "pkg://rwkv7-demo.yaml", "rwkv4": "pkg://rwkv4-demo.yaml"}


@dataclass
class DemoRun:
    wall: float
    """Seconds from start to exit."""
    cpu: float
    """CPU seconds of the child (user + system, all its threads): a second view of the cost, beside
    a wall time that moves with the machine's other work."""
    curves: dict[str, list[float]]
    """"loss": the training loss of every step; "val_loss": every validation's."""

    def losses(self) -> str:
        train, val = self.curves["loss"], self.curves["val_loss"]
        tail = train[-5:]
        return (
            f"last loss {train[-1]:.3f}, mean of the last {len(tail)} {sum(tail) / len(tail):.3f}, "
            f"val_loss {', '.join(f'{v:.3f}' for v in val) or '-'}"
        )


def run_demo(config: str, folder: Path, data: Path, max_steps: int) -> DemoRun:
    """One demo run in `folder`, in a fresh child process."""
    args = [
        sys.executable, "-m", "rwkv_infctx", "fit", "-c", config,
        f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.init_args.save_dir={folder}", f"--model.export={folder / 'final.pth'}",
        f"--data.data_path={data}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    cpu_before = _children_cpu()
    start = time.perf_counter()
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{config}: exit {done.returncode}\n{done.stderr[-2000:]}")
    rows = [r for m in folder.rglob("metrics.csv") for r in csv.DictReader(m.open())]
    curves = {key: [float(r[key]) for r in rows if r.get(key)] for key in ("loss", "val_loss")}
    return DemoRun(wall, _children_cpu() - cpu_before, curves)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=30, help="the demo's own: 30")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    runs: dict[str, list[DemoRun]] = {name: [] for name in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        subprocess.run([sys.executable, "-m", "rwkv_infctx", "preload", "-c", CONFIGS["rwkv7"],
                        f"--data.data_path={data}"], check=True, capture_output=True)  # fmt: skip
        for r in range(args.rounds):
            for name, config in CONFIGS.items():
                run = run_demo(config, root / f"{name}-{r}", data, args.max_steps)
                runs[name].append(run)
                print(
                    f"{name}: {run.wall:7.1f} s wall, {run.cpu:7.1f} s CPU, {run.losses()}  "
                    f"({config}, {args.max_steps} steps)",
                    flush=True,
                )
            print(f"round {r + 1}: wall RWKV-7 / RWKV-4 {runs['rwkv7'][r].wall / runs['rwkv4'][r].wall:.2f}")
    for what in ("wall", "cpu"):
        best = {name: min(getattr(run, what) for run in rs) for name, rs in runs.items()}
        print(
            f"{what} time RWKV-7 / RWKV-4 (best of {args.rounds}): {best['rwkv7'] / best['rwkv4']:.2f}  "
            f"({best['rwkv7']:.1f} s / {best['rwkv4']:.1f} s)"
        )


if __name__ == "__main__":
    main()
