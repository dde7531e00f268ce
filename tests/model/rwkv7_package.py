"""Run the `rwkv` package's RWKV-7 (x070) in a child process: the independent oracle.

`RWKV_V7_ON=1` must be set before `import rwkv` (then `rwkv.model.RWKV` is the x070 class, and no
RWKV-4 runs in that process), so it runs in its own interpreter. The package prints banners on
stdout, so results come back through a file. It appends `.pth` to the path itself.

Jobs: {"one_pass": tokens} → (T, V) logits and the final state; {"step": tokens} → (T, V) logits fed
one token at a time; {"greedy": (prompt, n)} → n greedy token ids after the prompt;
{"from_state": (state file, tokens)} → (T, V) logits fed one token at a time from the package's state
list with each layer's `blocks.{i}.att.time_state` put in as `state[3*i + 1]` (no transpose), the
shifts zero: how RWKV-7 runtimes load a state-tuning file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_package(model_path: Path, jobs: dict[str, object], tmp: Path) -> dict[str, object]:
    """Run `jobs` on the package's `cpu fp32` model of `model_path` (a .pth); returns the results."""
    spec, out = tmp / "package_jobs.pt", tmp / "package_results.pt"
    torch.save({"model": str(model_path.with_suffix("")), "jobs": jobs}, spec)
    env = {**os.environ, "RWKV_V7_ON": "1", "RWKV_JIT_ON": "1", "RWKV_CUDA_ON": "0"}
    done = subprocess.run(
        [sys.executable, __file__, str(spec), str(out)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def _main(spec_path: str, out_path: str) -> None:
    from rwkv.model import RWKV  # RWKV_V7_ON is set by the parent

    spec = torch.load(spec_path, weights_only=False)
    model = RWKV(model=spec["model"], strategy="cpu fp32")
    results: dict[str, object] = {}
    for name, job in spec["jobs"].items():
        kind = name.split(":")[0]
        if kind == "one_pass":
            logits, state = model.forward(list(job), None, full_output=True)
            results[name] = {"logits": logits.clone(), "state": [s.clone() for s in state]}
        elif kind == "step":
            state, rows = None, []
            for token in job:
                out, state = model.forward([token], state)
                rows.append(out.clone())
            results[name] = torch.stack(rows)
        elif kind == "greedy":
            prompt, n = job
            out, state = model.forward(list(prompt), None)
            ids = []
            for _ in range(n):
                ids.append(int(torch.argmax(out)))
                out, state = model.forward([ids[-1]], state)
            results[name] = ids
        elif kind == "from_state":
            state_path, tokens = job
            state, rows = _state_list(model, torch.load(state_path, weights_only=True)), []
            for token in tokens:
                out, state = model.forward([token], state)
                rows.append(out.clone())
            results[name] = torch.stack(rows)
        else:
            raise ValueError(f"unknown job {name}")
    torch.save(results, out_path)


def _state_list(model, sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The package's x070 state list (att shift, WKV, ffn shift per layer) with a state file's WKV."""
    C = model.args.n_embd
    state = []
    for i in range(model.args.n_layer):
        state += [torch.zeros(C), sd[f"blocks.{i}.att.time_state"].float().contiguous(), torch.zeros(C)]
    return state


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
