"""A model trained by the demo config (scaled down to test size) beats its untrained init in every
position bucket, through `rwkv-infctx fit` and `rwkv-infctx eval-positions`."""

from __future__ import annotations

import csv

import pytest
import yaml

from rwkv_infctx.cli import main
from rwkv_infctx.training.cli import bundled_config


@pytest.mark.slow
def test_demo_trained_model_beats_its_init_in_every_bucket(tmp_path, capsys):
    config = yaml.safe_load(bundled_config("rwkv7-demo.yaml").read_text())
    config["trainer"].update(
        max_steps=12, enable_progress_bar=False, enable_model_summary=False, callbacks=[],
        default_root_dir=str(tmp_path), logger=False, enable_checkpointing=False,
    )  # fmt: skip
    config["model"].update(n_layer=2, export=str(tmp_path / "trained.pth"))
    config["data"].update(data_path=str(tmp_path / "data"), rechunk_size=2048)
    path = tmp_path / "demo-small.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "-c", str(path)]) == 0
    init = [
        "init",
        str(tmp_path / "init.pth"),
        "--arch",
        config["model"]["arch"],  # the demo's family (RWKV-7)
        "--n_layer",
        "2",
        "--n_embd",
        "128",
        "--vocab_size",
        "neox",
    ]
    assert main([*init, "--seed", str(config["model"].get("seed", 0))]) == 0

    out_csv = tmp_path / "positions.csv"
    models = [str(tmp_path / "init.pth"), str(tmp_path / "trained.pth")]
    assert main(["eval-positions", *models, "--data", str(path), "--out_csv", str(out_csv)]) == 0
    print(capsys.readouterr().out)
    losses: dict[str, dict[str, float]] = {}
    for r in csv.DictReader(out_csv.open()):
        losses.setdefault(r["model"], {})[f"{r['bucket_start']}-{r['bucket_end']}"] = float(r["mean_loss"])
    init_loss, trained_loss = losses["init"], losses["trained"]
    assert list(init_loss) == ["1-128", "128-256", "256-512", "512-1024", "1024-2048"] == list(trained_loss)
    for bucket, loss in trained_loss.items():
        assert loss < init_loss[bucket] - 1.0, (bucket, loss, init_loss[bucket])
