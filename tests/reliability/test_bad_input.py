"""The bad-input table: every case exits non-zero, the last stderr line names the culprit and what
was expected, there is no traceback (without --debug), and no file is created or changed.

Most cases run `rwkv_infctx.cli.main` in-process (fast); those marked `subprocess` run the real
command, to check the exit code and stderr of a separate process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import save_state_dict
from rwkv_infctx.model import RWKV4, RWKV4Config
from tests.reliability.conftest import VOCAB, fit_config, write_config, write_jsonl


@dataclass
class Env:
    """Files a case can point at; all made before the snapshot."""

    root: Path
    config: Path
    model: Path
    corpus: Path
    tokenizer: Path

    def fit(self, *args: str) -> list[str]:
        return ["fit", "-c", str(self.config), *args]

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.root / "inputs" / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def model_file(self, name: str, edit: Callable[[dict], None]) -> Path:
        sd = torch.load(self.model, weights_only=True)
        edit(sd)
        path = self.root / "inputs" / name
        torch.save(sd, path)
        return path

    def data(self, name: str, texts: list[str] | None = None, rows: list[dict] | None = None) -> list[str]:
        """fit arguments that build a new data_path from a JSONL corpus."""
        path = self.root / "inputs" / f"{name}.jsonl"
        if rows is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            write_jsonl(path, texts or [])
        return self.fit("--data.source", str(path), "--data.data_path", str(self.root / "out" / name))


@dataclass
class Case:
    name: str
    argv: Callable[[Env], list[str]]
    culprit: Callable[[Env], str] | str
    expected: str
    subprocess: bool = False


def trunc(env: Env) -> Path:
    data = env.model.read_bytes()
    return env.file("truncated.pth", data[: len(data) // 2])


def bad_shape(sd: dict) -> None:
    sd["blocks.1.ffn.value.weight"] = torch.zeros(3, 3)


def bad_yaml(env: Env) -> Path:
    return env.file("syntax.yaml", env.config.read_text() + "model:\n  ctx_len: [1, 2\n")


CASES = [
    # model files
    Case("missing .pth", lambda e: e.fit("--model.load_model", str(e.root / "nope.pth")), "nope.pth",
         "not found", subprocess=True),
    Case("corrupt .pth", lambda e: e.fit("--model.load_model", str(e.file("c.pth", b"not a model " * 99))),
         "c.pth", "not a readable state dict"),
    Case("truncated .pth", lambda e: e.fit("--model.load_model", str(trunc(e))), "truncated.pth",
         "truncated or corrupt"),
    Case("wrong-shape key", lambda e: e.fit("--model.load_model", str(e.model_file("s.pth", bad_shape))),
         "blocks.1.ffn.value.weight", "expected (32, 128)"),
    Case("dims disagree with config",
         lambda e: e.fit("--model.load_model", str(e.model), "--model.n_embd", "64"),
         "n_embd=64", "but the file has 32"),
    Case("empty .pth", lambda e: e.fit("--model.load_model", str(e.file("l.pth", b""))), "l.pth",
         "truncated or corrupt"),
    Case("generate: truncated model", lambda e: ["generate", str(trunc(e)), "--prompt", "a"], "truncated.pth",
         "truncated or corrupt"),
    Case("tokenizer vocab > model vocab (export-hf)",
         lambda e: ["export-hf", str(e.model), str(e.root / "out" / "hf"), "--tokenizer", "neox"],
         "--tokenizer neox", "50277 tokens"),
    # data
    Case("data token ids > model vocab", lambda e: e.fit("--model.vocab_size", "10"), "model.vocab_size",
         "expected at least"),
    Case("empty dataset", lambda e: e.data("empty", []), "empty.jsonl", "expected at least one document"),
    Case("missing column", lambda e: e.data("col", rows=[{"body": "hello there"}]), "data.text_column",
         "column 'text' not in"),
    Case("only a 1-token sample", lambda e: e.data("short", ["a"]), "data", "1 under 2 tokens"),
    Case("data_path not a dataset",
         lambda e: e.fit("--data.source", "null", "--data.data_path", str(e.file("x", "x").parent)),
         "data.data_path", "not a dataset prepared by rwkv-infctx"),
    Case("batch_size 0", lambda e: e.fit("--data.batch_size", "0"), "data.batch_size",
         "expected an integer ≥ 1"),
    # config values
    Case("ctx_len 0", lambda e: e.fit("--model.ctx_len", "0"), "model.ctx_len", "expected an integer ≥ 1"),
    Case("loss_chunk 0", lambda e: e.fit("--model.loss_chunk", "0"), "model.loss_chunk",
         "expected an integer ≥ 1"),
    Case("negative learning rate", lambda e: e.fit("--model.lr_init", "-0.1"), "model.lr_init",
         "expected a number ≥ 0"),
    Case("unknown strategy", lambda e: e.fit("--trainer.strategy", "warp_drive"), "warp_drive",
         "expected one of auto, ddp", subprocess=True),
    Case("unknown nan_policy", lambda e: e.fit("--model.nan_policy", "pray"), "model.nan_policy", "stop"),
    Case("unknown key", lambda e: e.fit("--model.ctx_lenn", "3"), "model.ctx_lenn", ""),
    Case("wrong type", lambda e: e.fit("--model.ctx_len", "many"), "model.ctx_len", "int"),
    # config files
    Case("YAML syntax error", lambda e: ["fit", "-c", str(bad_yaml(e))], "syntax.yaml", "not valid YAML",
         subprocess=True),
    Case("YAML syntax error (preload)", lambda e: ["preload", "-c", str(bad_yaml(e))], "syntax.yaml",
         "not valid YAML"),
    Case("missing config file", lambda e: ["fit", "-c", str(e.root / "nope.yaml")], "nope.yaml", "not found"),
    # outputs and checkpoints
    Case("unwritable output folder (export)",
         lambda e: e.fit("--model.export", str(e.file("plain", "x") / "m.pth")), "plain", "not a folder"),
    Case("unwritable output folder (root)",
         lambda e: e.fit("--trainer.default_root_dir", str(e.file("plain2", "x") / "runs")), "plain2",
         "not a folder"),
    Case("existing output without --force",
         lambda e: ["init", str(e.model), "--arch", "rwkv4", "--n_layer", "1", "--n_embd", "8",
                    "--vocab_size", "9"],
         "model.pth", "--force"),
    Case("existing output without --force (export)",
         lambda e: ["export", str(e.model), str(e.model)], "model.pth", "--force"),
    Case("ckpt_path does not exist", lambda e: e.fit("--ckpt_path", str(e.root / "gone.ckpt")), "gone.ckpt",
         "not found"),
    Case("ckpt_path truncated",
         lambda e: e.fit("--ckpt_path", str(trunc(e).rename(e.root / "inputs" / "t.ckpt"))),
         "t.ckpt", "not a complete Lightning checkpoint"),
]  # fmt: skip


@pytest.fixture
def env(corpus, run_root) -> Env:
    (run_root / "inputs").mkdir()
    (run_root / "out").mkdir()
    cfg = fit_config(run_root / "out", *corpus, **{"trainer.max_steps": 1})
    cfg["data"]["data_path"] = str(corpus[0].parent / "prepared")
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(run_root / "out")
    model = RWKV4(RWKV4Config(n_layer=2, n_embd=32, vocab_size=VOCAB))
    path = save_state_dict(model.state_dict(), run_root / "inputs" / "model.pth", "fp32")
    return Env(run_root, write_config(run_root / "inputs" / "fit.yaml", cfg), path, *corpus)


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every path under `roots`; size and mtime for files (a folder's mtime changes when a temporary
    is created and removed in it, which is not an output)."""
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
        for root in roots
        for p in [root, *root.rglob("*")]
    }


def run(argv: list[str], separate: bool, capsys) -> tuple[int, str]:
    if separate:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "rwkv_infctx", *argv], capture_output=True, env=env)
        return done.returncode, done.stderr.decode()
    for logger in logging.root.manager.loggerDict.values():  # handlers bound to an earlier capture
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors in subcommands
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case: Case, env: Env, capsys):
    argv = case.argv(env)
    capsys.readouterr()
    watched = (env.root, env.corpus.parent / "prepared")
    before = snapshot(*watched)
    code, err = run(argv, case.subprocess, capsys)
    lines = err.strip().splitlines()
    last = lines[-1] if lines else ""
    assert code not in (0, None), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    culprit = case.culprit(env) if callable(case.culprit) else case.culprit
    assert culprit in last and case.expected in last, last
    after = snapshot(*watched)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], "files were created or changed"


def test_debug_shows_the_traceback(env, capsys):
    with pytest.raises(Exception, match=r"model\.ctx_len"):
        main([*env.fit("--model.ctx_len", "0"), "--debug"])


def test_the_table_is_large_enough():
    assert len(CASES) >= 20
