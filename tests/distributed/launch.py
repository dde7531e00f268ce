"""Launch `tests.distributed.worker` on 2 CPU processes with torchrun (gloo), as users launch runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_ranks(args: list[str], nproc: int = 2, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the worker with `args` on `nproc` ranks; fails the test (with the output) on error or hang."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "tests.distributed.worker", *args]
    # the repository first (for `tests.`), then the caller's path (a worktree's src/ when set there)
    path = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    try:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"ranks hung for {timeout} s:\n{e.stdout}\n{e.stderr}") from None
    assert done.returncode == 0, (
        f"ranks failed ({done.returncode}):\n{done.stdout[-5000:]}\n{done.stderr[-8000:]}"
    )
    return done
