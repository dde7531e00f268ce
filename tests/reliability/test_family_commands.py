"""`rwkv-infctx fit`, then `validate` and `test` on the exported file, for both families: the
reported losses are the cross-entropy of one unsegmented pass over the held-out samples."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkv_infctx.cli import main
from rwkv_infctx.data.collator import collate
from rwkv_infctx.data.store import load_splits
from rwkv_infctx.io.model_file import load_model
from tests.reliability.conftest import fit_config, write_config


def logged(folder: Path, key: str) -> list[float]:
    rows = [r for f in folder.rglob("metrics.csv") for r in csv.DictReader(f.open())]
    return [float(r[key]) for r in rows if r.get(key)]


def one_pass_ce(model_path: Path, data_path: Path) -> float:
    """Cross-entropy per learnt token of the `test` split, in one batch, one pass, no segments."""
    rows = load_splits(data_path)["test"].with_format("numpy", columns=["input_ids", "loss_mask"])
    batch = collate([rows[i] for i in range(len(rows))])
    model = load_model(model_path).eval()
    with torch.no_grad():
        logits, _ = model(batch["input_ids"])
    ce = F.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    return float((ce * mask).sum() / mask.sum())


def test_fit_export_validate_test(family, corpus, run_root):
    data_path = run_root / "data"  # with a held-out split (the session's prepared data has none)
    overrides = {
        "trainer.max_steps": 2,
        "model.export": str(run_root / "final.pth"),
        "model.export_dtype": "fp32",
        "data.data_path": str(data_path),
        "data.test_split": 2,
    }
    config = write_config(run_root / "fit.yaml", fit_config(run_root, *corpus, family, **overrides))
    assert main(["fit", "-c", str(config)]) == 0
    expected = one_pass_ce(run_root / "final.pth", data_path)

    from_file = ["--model.load_model", str(run_root / "final.pth"), "--model.arch", "auto"]
    from_file += ["--model.n_layer", "null", "--model.n_embd", "null"]
    for command, key in (("validate", "val_loss"), ("test", "test_loss")):
        logs = run_root / command
        args = [command, "-c", str(config), *from_file, "--trainer.logger.init_args.save_dir", str(logs)]
        assert main(args) == 0
        assert logged(logs, key) == [pytest.approx(expected, rel=1e-5)], (command, expected)
