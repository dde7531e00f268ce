"""`rwkv-infctx fit|validate|test|export` end to end on a tiny model and the bundled corpus."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from rwkv_infctx.cli import main
from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.training.cli import bundled_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """A 2-layer, width-32 model on tiny-shakespeare cut into 255-token samples, ctx_len 64."""
    root = tmp_path_factory.mktemp("fit")
    config = {
        "seed_everything": 1,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 3,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "limit_val_batches": 1,
            "default_root_dir": str(root),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(root)},
            },
        },
        "model": {
            "arch": "rwkv4",
            "n_layer": 2,
            "n_embd": 32,
            "vocab_size": "neox",
            "ctx_len": 64,
            "export": str(root / "final.pth"),
        },
        "data": {
            "source": "pkg://tinyshakespeare.txt",
            "data_path": str(root / "data"),
            "rechunk_size": 256,
            "test_split": 2,
            "batch_size": 2,
        },
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    assert main(["fit", "-c", str(config), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["ctx_len"] > 0


@pytest.mark.parametrize("name", ["rwkv7-demo.yaml", "rwkv4-demo.yaml"])
def test_bundled_demo_is_the_repository_demo(name):
    assert bundled_config(name).read_text() == (REPO / "configs" / name).read_text()
    assert main(["fit", "-c", f"pkg://{name}", "--print_config"]) == 0


@pytest.mark.slow
def test_fit_logs_metrics_exports_and_resumes(tiny_config, capsys):
    root = tiny_config.parent
    assert main(["fit", "-c", str(tiny_config), "--model.peak_tflops", "0.001"]) == 0
    exported = torch.load(root / "final.pth", weights_only=True)
    assert exported["emb.weight"].shape == (50277, 32) and exported["emb.weight"].dtype == torch.bfloat16

    metrics = next(root.rglob("metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 3 and all(math.isfinite(x) and 9 < x < 12 for x in losses)
    for key in ("lr", "tokens_per_s", "segments", "peak_mem_mb", "mfu"):
        assert any(r.get(key) for r in rows), key
    for r in (r for r in rows if r.get("mfu")):  # 3 × forward FLOPs/token × tokens/s over 1 GFLOP/s
        model = RWKV4(RWKV4Config(2, 32, 50277))
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        forward = 2 * linear + 23 * 2 * 32  # matmuls + WKV (23 ops per channel per layer)
        assert float(r["mfu"]) == pytest.approx(3 * forward * float(r["tokens_per_s"]) / 1e9, rel=1e-4)
    assert {float(r["segments"]) for r in rows if r.get("segments")} == {4.0}  # 255 tokens / 64

    ckpt = next(root.rglob("*.ckpt"))
    out = root / "from_ckpt.pth"
    assert main(["export", str(ckpt), str(out), "--dtype", "fp32"]) == 0
    from_ckpt = torch.load(out, weights_only=True)
    assert torch.equal(from_ckpt["head.weight"].bfloat16(), exported["head.weight"])

    # resume from the checkpoint for one more step; validate and test the exported model
    assert main(["fit", "-c", str(tiny_config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "4"]) == 0
    from_file = [
        "--model.load_model",
        str(root / "final.pth"),
        "--model.n_layer",
        "null",
        "--model.n_embd",
        "null",
    ]
    assert main(["validate", "-c", str(tiny_config), *from_file]) == 0
    assert main(["test", "-c", str(tiny_config), *from_file]) == 0
    assert "test_loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,culprit",
    [
        (["--model.ctx_len", "0"], "model.ctx_len"),
        (["--model.ctx_len_cutoff", "-5"], "model.ctx_len_cutoff"),
        (["--model.vocab_size", "1000"], "model.vocab_size"),
        (["--model.n_layer", "null"], "model.n_layer"),
        (["--model.load_model", "/nonexistent/model.pth"], "/nonexistent/model.pth"),
        (["--model.ctx_lenn", "3"], "model.ctx_lenn"),
        (["--model.bptt", "sometimes"], "model.bptt"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tiny_config, capsys, args, culprit):
    assert main(["fit", "-c", str(tiny_config), *args]) == 2
    line = last_error_line(capsys)
    assert line.startswith("rwkv-infctx fit: error:") and culprit in line


def test_dims_that_disagree_with_the_model_file(tmp_path, tiny_config, capsys):
    model_file = tmp_path / "m.pth"
    assert (
        main(
            [
                "init",
                str(model_file),
                "--arch",
                "rwkv4",
                "--n_layer",
                "2",
                "--n_embd",
                "16",
                "--vocab_size",
                "neox",
            ]
        )
        == 0
    )
    assert main(["fit", "-c", str(tiny_config), "--model.load_model", str(model_file)]) == 2
    line = last_error_line(capsys)
    assert "n_embd=32 but the file has 16" in line


def test_export_refuses_folders_and_overwrites(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "x.pth")]) == 2
    assert "folder" in last_error_line(capsys)
    (tmp_path / "x.pth").write_bytes(b"")
    (tmp_path / "c.ckpt").write_bytes(b"")
    assert main(["export", str(tmp_path / "c.ckpt"), str(tmp_path / "x.pth")]) == 2
    assert "already exists" in last_error_line(capsys)


def test_preload_takes_a_bundled_config(tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200, encoding="utf-8")
    args = ["preload", "-c", "pkg://rwkv7-demo.yaml", f"--data.source={text}", "--data.rechunk_size=200"]
    args.append(f"--data.data_path={tmp_path / 'd'}")
    assert main(args) == 0
    assert "train:" in capsys.readouterr().out and (tmp_path / "d").is_dir()
