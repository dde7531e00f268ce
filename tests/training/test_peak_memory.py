"""Peak memory belongs to the run: a process started from a large parent reports its own peak (VmHWM),
where ru_maxrss reports the parent's; the summary line says which measure it is. And the Lightning
model summary of a real `fit` prints the analytic forward FLOPs of one segment."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.model.rwkv4_flops import forward_flops_per_token
from rwkv_infctx.training import peak_memory
from tests.reliability.conftest import VOCAB, fit_config, write_config

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO / "src")}
PARENT_MIB = 1536
CHILD = (
    "import resource; from rwkv_infctx.training.peak_memory import peak_memory_mb; "
    "print(*peak_memory_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
)

needs_proc = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="no /proc (not Linux)")


def test_vm_hwm_parsing_and_fallback(tmp_path, monkeypatch):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\nVmRSS:\t 100 kB\n")
    assert peak_memory.vm_hwm_kib(status) == 12345
    assert peak_memory.vm_hwm_kib(tmp_path / "absent") is None
    monkeypatch.setattr(peak_memory, "STATUS", tmp_path / "absent")  # no /proc: ru_maxrss, said so
    mib, source = peak_memory.peak_memory_mb()
    assert source == "ru_maxrss" and "parent" in peak_memory.SOURCES[source]
    assert mib == pytest.approx(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rel=0.5)


@needs_proc
def test_child_of_a_large_parent_reports_its_own_peak():
    ballast = b"\x01" * (PARENT_MIB * 2**20)  # touched pages: the parent's peak RSS is above this
    out = subprocess.run([sys.executable, "-c", CHILD], env=ENV, capture_output=True, text=True, check=True)
    del ballast
    mib, source, inherited = out.stdout.split()
    assert source == "vmhwm"
    assert float(inherited) >= PARENT_MIB  # ru_maxrss would have reported the parent's memory
    assert float(mib) < 200  # the child's own: an interpreter and one small module


@needs_proc
def test_fit_summary_lines(tmp_path):
    """One tiny `fit`, started from this (large) process: the model summary's Total FLOPs is
    ctx_len × forward_flops_per_token, and the training summary's peak memory is the run's own."""
    from tests.reliability.conftest import TEXTS, write_char_tokenizer, write_jsonl

    corpus = write_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    tokenizer = write_char_tokenizer(tmp_path / "tokenizer.json")
    config = fit_config(tmp_path / "run", corpus, tokenizer, **{"trainer.max_steps": 2})
    config["trainer"]["enable_model_summary"] = True
    config["data"]["data_path"] = str(tmp_path / "prepared")
    cfg = write_config(tmp_path / "fit.yaml", config)
    ballast = b"\x01" * (PARENT_MIB * 2**20)
    done = subprocess.run(
        [sys.executable, "-m", "rwkv_infctx", "fit", "-c", str(cfg)],
        env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    del ballast
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr

    flops = 16 * forward_flops_per_token(RWKV4Config(n_layer=2, n_embd=32, vocab_size=VOCAB))
    total = get_human_readable_count(int(flops))  # ctx_len 16; plain or rich table
    assert f"{total}     Total Flops" in out or f"Total FLOPs: {total}" in out, out[-3000:]
    line = next(x for x in out.splitlines() if x.startswith("training summary:"))
    peak = float(line.split("peak memory ")[1].split(" MiB")[0].replace(",", ""))
    assert "MiB (peak RSS of this process, VmHWM)" in line
    assert 0 < peak < PARENT_MIB  # a tiny CPU run's own peak, not the parent's
