"""LoRA files round trip: `fit` in lora mode from a base file, `export` merged and `--adapter_only`,
the adapter read by peft itself, by `generate`/`eval-positions --adapter` and by `fit` (load_adapter),
then trained on; bad adapter folders refused in one line.

Oracles: the merged file at the end of fit against the checkpoint's export (same weights, two
paths); peft's own `PeftModel.from_pretrained` on our adapter folder against the merged file; the
merged model against the base with the adapter attached at run time (eval-positions, generate);
the `rwkv` package's RWKV-7 on the merged file.
"""

from __future__ import annotations

import csv

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import load_model, save_model
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.tuning.lora import merged_state_dict
from rwkv_infctx.training.tuning.lora_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tests.conftest import family_config, random_family_model
from tests.model.rwkv7_package import run_package
from tests.reliability.conftest import VOCAB, fit_config, write_config

LORA = {"model.train_mode": "lora", "model.lora_r": 4, "model.lora_alpha": 8.0, "model.dropout": 0.0}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def lora_fit(root, corpus, family, base, **overrides) -> None:
    cfg = fit_config(root, *corpus, family, **{**LORA, "model.load_model": str(base), **overrides})
    cfg["model"] = {k: v for k, v in cfg["model"].items() if k not in ("n_layer", "n_embd")}
    assert main(["fit", "-c", str(write_config(root / "fit.yaml", cfg))]) == 0


def last_checkpoint(root):
    (ckpt,) = sorted(root.rglob("*.ckpt"))
    return ckpt


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """Per family: base.pth, a 3-step lora fit (final.pth merged at its end), and its checkpoint."""
    out = {}
    for family in ("rwkv4", "rwkv7"):
        root = tmp_path_factory.mktemp(f"lora-{family}")
        base = save_model(
            random_family_model(family_config(family, VOCAB), seed=5), root / "base.pth", "fp32"
        )
        final = {"model.export": str(root / "final.pth"), "model.export_dtype": "fp32"}
        lora_fit(root, corpus, family, base, **{"trainer.max_steps": 3, **final})
        out[family] = (root, base, last_checkpoint(root))
    return out


def test_export_merged_and_adapter_only(trained, family, capsys):
    root, base, ckpt = trained[family]
    merged, adapter = root / "merged.pth", root / "adapter"
    assert main(["export", str(ckpt), str(merged), "--dtype", "fp32"]) == 0
    assert main(["export", str(ckpt), str(adapter), "--adapter_only"]) == 0
    assert "LoRA adapters merged" in capsys.readouterr().out
    a, b = torch.load(root / "final.pth", weights_only=True), torch.load(merged, weights_only=True)
    assert a.keys() == b.keys() == torch.load(base, weights_only=True).keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in adapter.iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]

    from peft import PeftModel

    tokens = torch.randint(0, VOCAB, (1, 30), generator=torch.Generator().manual_seed(0))
    by_peft = PeftModel.from_pretrained(load_model(base), str(adapter))
    assert rel(logits(by_peft, tokens), logits(load_model(merged), tokens)) <= 1e-5
    assert rel(logits(load_model(base), tokens), logits(load_model(merged), tokens)) > 1e-4  # it trained


def test_generate_and_eval_positions_with_adapter(trained, corpus, tmp_path, capsys):
    _, base, ckpt = trained["rwkv7"]
    merged, adapter = tmp_path / "merged.pth", tmp_path / "adapter"
    assert main(["export", str(ckpt), str(merged), "--dtype", "fp32"]) == 0
    assert main(["export", str(ckpt), str(adapter), "--adapter_only"]) == 0
    tok, text = str(corpus[1]), tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog, " * 4, encoding="utf-8")
    out_csv = tmp_path / "r.csv"
    args = [str(base), str(merged), str(base), "--adapter", "-", "-", str(adapter), "--text", str(text)]
    assert main(["eval-positions", *args, "--tokenizer", tok, "--out_csv", str(out_csv)]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    models = ("base", "merged", "base+adapter")
    loss = {m: [float(r["mean_loss"]) for r in rows if r["model"] == m] for m in models}
    assert loss["merged"] == pytest.approx(loss["base+adapter"], rel=1e-5)
    assert loss["merged"] != pytest.approx(loss["base"], rel=1e-3)
    capsys.readouterr()
    greedy = ["--prompt", "the quick", "--tokenizer", tok, "--temperature", "0", "--max_tokens", "20"]
    assert main(["generate", str(merged), *greedy, "--device", "cpu"]) == 0
    from_merged = capsys.readouterr().out
    assert main(["generate", str(base), *greedy, "--adapter", str(adapter), "--device", "cpu"]) == 0
    assert capsys.readouterr().out == from_merged


def test_rwkv_package_loads_the_merged_file(trained, tmp_path):
    ckpt = trained["rwkv7"][2]
    merged = tmp_path / "merged.pth"
    assert main(["export", str(ckpt), str(merged), "--dtype", "fp32"]) == 0
    tokens = [3, 7, 11, 2, 9, 30, 5, 5, 1, 17]
    package = run_package(merged, {"one_pass": tokens}, tmp_path)
    ours = logits(load_model(merged), torch.tensor([tokens]))[0]
    assert rel(ours, package["one_pass"]["logits"]) <= 1e-5


def test_fit_loads_the_adapter_and_trains_on(trained, corpus, tmp_path):
    _, base, ckpt = trained["rwkv7"]
    adapter, merged = tmp_path / "adapter", tmp_path / "merged.pth"
    assert main(["export", str(ckpt), str(adapter), "--adapter_only"]) == 0
    assert main(["export", str(ckpt), str(merged), "--dtype", "fp32"]) == 0
    loaded = RWKVModule(
        load_model=str(base), train_mode="lora", lora_r=4, lora_alpha=8.0, load_adapter=str(adapter)
    )
    expected, got = torch.load(merged, weights_only=True), merged_state_dict(loaded.model)
    assert got.keys() == expected.keys()
    assert all(torch.allclose(v, expected[k], rtol=0, atol=1e-6) for k, v in got.items())

    run = tmp_path / "again"
    run.mkdir()
    lora_fit(run, corpus, "rwkv7", base, **{"trainer.max_steps": 2, "model.load_adapter": str(adapter)})
    again = tmp_path / "adapter2"
    assert main(["export", str(last_checkpoint(run)), str(again), "--adapter_only"]) == 0
    from safetensors.torch import load_file

    before, after = load_file(adapter / ADAPTER_WEIGHTS), load_file(again / ADAPTER_WEIGHTS)
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before)  # every factor trained on


def test_bad_adapter_folders_are_one_line(trained, tmp_path, capsys):
    _, base, ckpt = trained["rwkv7"]
    missing = tmp_path / "nope"
    assert main(["generate", str(base), "--adapter", str(missing), "--max_tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--adapter {missing}: not found" in err, err

    rwkv4_adapter = tmp_path / "rwkv4-adapter"  # adapts ffn.receptance, which RWKV-7 lacks
    assert main(["export", str(trained["rwkv4"][2]), str(rwkv4_adapter), "--adapter_only"]) == 0
    capsys.readouterr()
    assert main(["generate", str(base), "--adapter", str(rwkv4_adapter), "--max_tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--adapter {rwkv4_adapter}: wrong targets" in err, err

    adapter = tmp_path / "adapter"
    assert main(["export", str(ckpt), str(adapter), "--adapter_only"]) == 0
    (adapter / ADAPTER_WEIGHTS).unlink()
    capsys.readouterr()
    assert main(["eval-positions", str(base), "--adapter", str(adapter), "--text", str(base)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--adapter {adapter}: no {ADAPTER_WEIGHTS}" in err, err

    fresh = tmp_path / "fresh"
    assert main(["export", str(ckpt), str(fresh), "--adapter_only"]) == 0
    with pytest.raises(Exception) as e:
        RWKVModule(load_model=str(base), train_mode="lora", lora_r=4, lora_alpha=8.0,
                   lora_targets=["att.key"], load_adapter=str(fresh))  # fmt: skip
    assert str(e.value).startswith(f"model.load_adapter {fresh}: wrong targets") and "\n" not in str(e.value)
    with pytest.raises(Exception) as e:
        RWKVModule(load_model=str(base), train_mode="lora", lora_r=8, lora_alpha=8.0, load_adapter=str(fresh))
    assert str(e.value).startswith(f"model.load_adapter {fresh}: adapter r 4")
