"""bf16 on the CPU: segmented BPTT under autocast and with bf16 weights, the WKV ops under autocast,
and `fit` with trainer.precision bf16-mixed / bf16-true end to end (loss, checkpoint, exported file).

Tolerances. bf16 keeps 8 significant bits: one rounding is up to 2^-8 = 3.9e-3 relative. Under one
autocast, segmented and unsegmented runs round the same operations on the same values except for
GEMM blocking and the per-segment sums, so they agree to a few roundings: 2e-2 (about 5) in the
largest-entry relative error of `batches.rel`. Against fp32 the whole network's bf16 rounding shows
(measured 5e-3 to 1e-2); the bound is 5e-2, and it must exceed 1e-4 so that the comparison can fail
(autocast really ran in bf16).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import yaml

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import load_model
from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.ops.wkv4 import fresh_wkv4_state
from rwkv_infctx.ops.wkv4.chunked import wkv4_chunked
from rwkv_infctx.ops.wkv4.reference import wkv4_reference
from rwkv_infctx.training.segments import bptt_step
from tests.conftest import random_model
from tests.reliability.conftest import TEXTS, fit_config, write_char_tokenizer, write_jsonl

from .batches import flat_grad, make_batch, plain_objective, rel

CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80)
T = 80
SAME_AUTOCAST_TOL = 2e-2
VS_FP32_TOL = 5e-2


def bf16_autocast(enabled: bool = True):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def plain_grad(model, batch, autocast: bool):
    with bf16_autocast(autocast):
        obj = plain_objective(model, batch)
    obj.backward()
    return flat_grad(model).float()


def segmented_grad(model, batch, ctx_len: int, autocast: bool, grad_cp: bool = False):
    with bf16_autocast(autocast):
        proxy, report = bptt_step(model, batch, ctx_len, grad_cp=grad_cp)
    proxy.backward()
    return flat_grad(model), report


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
def test_bptt_under_bf16_autocast_matches_unsegmented_autocast(weights):
    """bf16-mixed (fp32 weights) and autocast over bf16 weights: the same objective by ordinary autograd
    over the whole sample, under the same autocast, is the oracle; fp32 autograd a looser one."""
    model = random_model(CFG, seed=1).to(weights)
    batch = make_batch([T, T - 37], CFG.vocab_size, seed=2)
    fp32 = plain_grad(random_model(CFG, seed=1).to(weights).float(), batch, autocast=False)
    ref = plain_grad(model, batch, autocast=True)
    for ctx_len, grad_cp in ((16, False), (23, False), (16, True)):
        grad, report = segmented_grad(model, batch, ctx_len, autocast=True, grad_cp=grad_cp)
        assert grad.dtype == weights and torch.isfinite(grad).all()
        assert rel(grad.float(), ref) < SAME_AUTOCAST_TOL, (ctx_len, grad_cp, rel(grad.float(), ref))
        assert 1e-4 < rel(grad.float(), fp32) < VS_FP32_TOL, (ctx_len, rel(grad.float(), fp32))
        assert math.isfinite(report.loss) and report.loss > 0


def test_bptt_with_bf16_weights_is_as_accurate_as_bf16_autograd():
    """bf16-true: bf16 weights, no autocast. Segmented gradients (summed over segments in fp32) are
    no further from fp32 autograd over the same rounded weights than plain bf16 autograd is."""
    model = random_model(CFG, seed=3).bfloat16()
    batch = make_batch([T, T - 21], CFG.vocab_size, seed=4)
    fp32 = plain_grad(random_model(CFG, seed=3).bfloat16().float(), batch, autocast=False)
    ref = plain_grad(model, batch, autocast=False)
    baseline = rel(ref, fp32)
    assert 1e-4 < baseline < VS_FP32_TOL  # bf16 autograd itself: a few roundings from fp32
    grad, _ = segmented_grad(model, batch, 16, autocast=False)
    assert grad.dtype == torch.bfloat16 and torch.isfinite(grad).all()
    assert rel(grad.float(), fp32) < max(2 * baseline, SAME_AUTOCAST_TOL), (rel(grad.float(), fp32), baseline)
    assert rel(grad.float(), ref) < VS_FP32_TOL


@pytest.mark.parametrize("op", [wkv4_chunked, wkv4_reference], ids=["chunked", "reference"])
def test_wkv_ops_ignore_autocast(op):
    """bf16 k, v from autocast's matmuls: the op computes in fp32 whether or not autocast is on
    (the chunked op's GEMMs ran in bf16 under autocast before; its state was off by 4e-3)."""
    gen = torch.Generator().manual_seed(5)
    B, L, C = 2, 50, 24
    decay, first = torch.rand(C, generator=gen) * 8 - 5, torch.rand(C, generator=gen) * 3 - 2
    k = (2 * torch.randn(B, L, C, generator=gen)).bfloat16()
    v = torch.randn(B, L, C, generator=gen).bfloat16()
    results = []
    for enabled in (False, True):
        leaves = [t.clone().requires_grad_() for t in (decay, first, k, v)]
        with bf16_autocast(enabled):
            y, state = op(*leaves, fresh_wkv4_state(B, C))
            (y.float().square().sum() + state.aa.sum() + state.bb.sum()).backward()
        results.append([y, *state, *(t.grad for t in leaves)])
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert results[0][1].dtype == torch.float32  # the state stays fp32 with bf16 keys and values


# ---- fit end to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(corpus.jsonl, tokenizer.json, data_path): the first fit prepares data_path, the others reuse it."""
    folder = tmp_path_factory.mktemp("precision")
    data = write_jsonl(folder / "corpus.jsonl", TEXTS * 2)
    tokenizer = write_char_tokenizer(folder / "tokenizer.json")
    return data, tokenizer, folder / "prepared"


def precision_config(root: Path, corpus, precision: str, **overrides) -> Path:
    data, tokenizer, prepared = corpus
    config = fit_config(
        root,
        data,
        tokenizer,
        **{
            "trainer.precision": precision,
            "trainer.max_steps": 8,
            "trainer.limit_val_batches": 1,
            "trainer.val_check_interval": 4,
            "model.dropout": 0.0,
            "model.lr_init": 3e-2,
            "model.warmup_steps": 0,
            "model.wkv_backend": "auto",
            "model.export": str(root / "final.pth"),
            "data.test_split": 2,
            **overrides,
        },
    )
    config["data"]["data_path"] = str(prepared)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("precision,weights", [("bf16-mixed", torch.float32), ("bf16-true", torch.bfloat16)])
def test_fit_in_bf16_learns_checkpoints_and_exports(precision, weights, corpus, tmp_path):
    config = precision_config(tmp_path, corpus, precision)
    assert main(["fit", "-c", str(config)]) == 0
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    losses = [float(r["loss"]) for r in rows if r.get("loss")]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < losses[0] - 0.3, losses  # it learns (3.7 -> 2.8 measured)
    assert any(r.get("val_loss") for r in rows)

    ckpt = next(tmp_path.rglob("*.ckpt"))
    weights_in_ckpt = torch.load(ckpt, weights_only=True)["state_dict"]
    assert {t.dtype for t in weights_in_ckpt.values()} == {weights}  # bf16-mixed keeps fp32 masters

    exported = torch.load(tmp_path / "final.pth", weights_only=True)
    assert {t.dtype for t in exported.values()} == {torch.bfloat16}  # model.export_dtype, whatever the run
    for key, t in exported.items():
        assert torch.equal(t, weights_in_ckpt[f"model.{key}"].bfloat16()), key
    model = load_model(tmp_path / "final.pth")
    with torch.no_grad():
        logits, _ = model(torch.arange(10)[None] % model.cfg.vocab_size)
    assert torch.isfinite(logits).all()

    # the checkpoint resumes in the same precision for one more step
    assert main(["fit", "-c", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "9"]) == 0


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", 16, "transformer-engine"])
def test_unsupported_precision_is_refused_in_one_line(precision, corpus, tmp_path, capsys):
    config = precision_config(tmp_path, corpus, precision)
    assert main(["fit", "-c", str(config)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "trainer.precision" in last and "bf16-mixed" in last and str(precision) in last
    assert not any(tmp_path.rglob("metrics.csv"))  # refused before the run started


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16", "32", 32, "64-true", None])
def test_supported_precisions_pass_the_check(precision):
    from rwkv_infctx.training.preflight import check_precision

    check_precision(precision)
