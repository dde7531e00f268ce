"""`python -m bench.gpu`: every GPU measurement, one markdown table (see bench/gpu/README.md)."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

PARTS = ("selfcheck", "kernels", "bptt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test that also runs on the CPU")
    p.add_argument("--budget-s", type=float, default=420.0, help="no new BPTT row starts after this")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--fla-fp32", action="store_true", help="also self-check fla in fp32 (~4 more minutes)")
    p.add_argument("--out", default=None, help="also write the header and table to this file")
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    if not set(args.parts) <= set(PARTS):
        p.error(f"--parts {','.join(args.parts)}: expected a comma-separated subset of {','.join(PARTS)}")
    return args


def header(device) -> list[str]:
    """Versions and the card, one line each."""
    import torch

    lines = [f"python {platform.python_version()}, torch {torch.__version__}"]
    for name in ("triton", "fla", "einops"):
        try:
            mod = __import__(name)
            lines.append(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception as e:  # a missing optional package is a fact of the run, not a failure
            lines.append(f"{name}: not importable ({type(e).__name__})")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "no CUDA: CPU"
    return [f"# bench.gpu, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", f"device: {card}", *lines]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from . import bptt_rows, kernels, selfchecks
    from .table import render

    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    if "selfcheck" in args.parts:
        rows += selfchecks.rows(device, args.fla_fp32)
    if "kernels" in args.parts:
        rows += kernels.rows(device, args.quick)
    if "bptt" in args.parts:
        rows += bptt_rows.rows(device, args.quick, lambda: args.budget_s - (time.perf_counter() - start))
    failed = [r for r in rows if r.failed]
    text = "\n".join(
        [
            *header(device),
            f"mode: {'quick (tiny shapes)' if args.quick else 'full'}; {time.perf_counter() - start:.0f} s",
            "",
            render(rows),
            "",
            f"{len(failed)} row(s) failed" if failed else "no row failed",
        ]
    )
    print(text, flush=True)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
