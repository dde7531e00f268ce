"""Wall time of the README's demo (RWKV-7) against the same demo with RWKV-4, side by side.

    python bench/demo_time.py [--max_steps 30] [--rounds 1]

Each run is `rwkv-infctx fit -c pkg://<config>` in a fresh child process and a fresh folder (the
data is prepared once beforehand and shared, so both runs time training, validation, export and the
sample). With --rounds > 1 the two alternate, so a change in the machine's load hits both. Prints
each run's wall time, its losses (the last, the mean of the last five steps, each validation) and
the ratio RWKV-7 / RWKV-4.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {"rwkv7": "pkg://demo.yaml", "rwkv4": "pkg://rwkv4-demo.yaml"}


def run_demo(config: str, folder: Path, data: Path, max_steps: int) -> tuple[float, dict[str, list[float]]]:
    """(wall seconds, {"loss": training loss of every step, "val_loss": every validation}) of one
    demo run in `folder`."""
    args = [
        sys.executable, "-m", "rwkv_infctx", "fit", "-c", config,
        f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={folder}",
        f"--trainer.logger.init_args.save_dir={folder}", f"--model.export={folder / 'final.pth'}",
        f"--data.data_path={data}", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
        args, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{config}: exit {done.returncode}\n{done.stderr[-2000:]}")
    rows = [r for m in folder.rglob("metrics.csv") for r in csv.DictReader(m.open())]
    return seconds, {key: [float(r[key]) for r in rows if r.get(key)] for key in ("loss", "val_loss")}


def _losses(curves: dict[str, list[float]]) -> str:
    train, val = curves["loss"], curves["val_loss"]
    tail = train[-5:]
    return (
        f"last loss {train[-1]:.3f}, mean of the last {len(tail)} {sum(tail) / len(tail):.3f}, "
        f"val_loss {', '.join(f'{v:.3f}' for v in val) or '-'}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max_steps", type=int, default=30, help="the demo's own: 30")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        subprocess.run([sys.executable, "-m", "rwkv_infctx", "preload", "-c", CONFIGS["rwkv7"],
                        f"--data.data_path={data}"], check=True, capture_output=True)  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        for r in range(args.rounds):
            for name, config in CONFIGS.items():
                seconds, curves = run_demo(config, root / f"{name}-{r}", data, args.max_steps)
                times[name].append(seconds)
                print(f"{name}: {seconds:7.1f} s, {_losses(curves)}  ({config}, {args.max_steps} steps)")
    best = {name: min(ts) for name, ts in times.items()}
    print(f"wall time RWKV-7 / RWKV-4 (best of {args.rounds}): {best['rwkv7'] / best['rwkv4']:.2f}")


if __name__ == "__main__":
    main()
