"""`preload` takes `fit`'s `--data.*` overrides: it prepares what they say, a `fit` with the same config
and overrides reuses the folder without rewriting a byte, and a `fit` with another data setting
rebuilds it, naming that setting. Every command runs as a separate process, as a user runs it."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from rwkv_infctx.data.store import load_splits
from tests.reliability.conftest import TEXTS, fit_config, write_char_tokenizer, write_config, write_jsonl

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO / "src")}
OVERRIDES = ["--data.rechunk_size", "300", "--data.test_split", "2"]


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "rwkv_infctx", *args], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: its mtime and content hash."""
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_preload_overrides_then_fit_reuses(tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", TEXTS * 10)
    tokenizer = write_char_tokenizer(tmp_path / "tokenizer.json")
    data_path = tmp_path / "prepared"
    config = fit_config(tmp_path / "run", corpus, tokenizer, **{"trainer.max_steps": 1})
    config["data"]["data_path"] = str(data_path)  # the YAML says no rechunk and no test split
    cfg = str(write_config(tmp_path / "fit.yaml", config))

    out = cli("preload", "-c", cfg, *OVERRIDES)
    assert f"data_path {data_path}: built" in out
    splits = load_splits(data_path)  # what the overrides say: 300-token samples, 2 held out
    lengths = [len(ids) for split in ("train", "test") for ids in splits[split]["input_ids"]]
    total = sum(len(t) + 1 for t in TEXTS * 10)  # each document and its end-of-text token
    assert len(splits["test"]) == 2 and max(lengths) == 300 and len(lengths) == -(-total // 300)
    before = files(data_path)

    out = cli("fit", "-c", cfg, *OVERRIDES)
    assert f"data_path {data_path}: reused" in out
    assert files(data_path) == before  # no file rewritten, none added or removed

    out = cli("fit", "-c", cfg, "--data.rechunk_size", "200", "--data.test_split", "2")
    assert f"data_path {data_path}: built" in out and "(changed: rechunk_size)" in out
    assert max(len(ids) for ids in load_splits(data_path)["train"]["input_ids"]) == 200


def test_preload_refuses_bad_overrides_in_one_line(tmp_path, capsys):
    from rwkv_infctx.cli import main

    corpus = write_jsonl(tmp_path / "corpus.jsonl", TEXTS)
    config = fit_config(tmp_path / "run", corpus, tmp_path / "tokenizer.json")
    config["data"]["data_path"] = str(tmp_path / "prepared")
    cfg = str(write_config(tmp_path / "fit.yaml", config))
    cases = {
        ("--data.rechunk_size", "-2"): "data.rechunk_size: -2 is out of range (expected an integer ≥ 0 or -1",
        ("--data.test_split=-1",): "data.test_split: -1 is out of range",
        ("--data.sorce", "x"): "--data.sorce: unknown data option",
        ("--model.ctx_len", "3"): "--model.ctx_len: unexpected argument (expected --data.KEY VALUE",
        ("--data.rechunk_size",): "--data.rechunk_size: unexpected argument",
    }
    for args, start in cases.items():
        assert main(["preload", "-c", cfg, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"rwkv-infctx preload: error: {start}") and "\n" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "fit.yaml"]
