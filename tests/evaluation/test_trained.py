"""A model trained briefly (plain PyTorch loop, character tokenizer) beats its untrained init in
every position bucket, through `eval-positions`' CSV."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4, RWKV4Config
from rwkv_infctx.model.init import init_weights
from rwkv_infctx.tokenizer import load_tokenizer
from tests.evaluation.conftest import CHAR_VOCAB, shakespeare

HELD_OUT = 2048
"""Characters at the end of the corpus kept for evaluation: positions 1..2047, buckets up to 2048."""


def train_briefly(model: RWKV4, ids: torch.Tensor, steps: int = 150, T: int = 32, B: int = 32) -> float:
    """AdamW on random windows of `ids`; returns the last batch loss."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - T - 1, (B,), generator=gen)
        x = torch.stack([ids[s : s + T + 1] for s in starts])
        logits, _ = model(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.slow
def test_trained_model_beats_its_init_in_every_bucket(tmp_path, char_tokenizer, capsys):
    text = shakespeare()[:200_000]
    ids = torch.tensor(load_tokenizer(str(char_tokenizer)).encode(text))
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=CHAR_VOCAB)
    torch.manual_seed(0)
    model = init_weights(RWKV4(cfg), seed=0)
    save_model(model, tmp_path / "init.pth", "fp32")
    assert train_briefly(model, ids[:-HELD_OUT]) < 2.6
    save_model(model, tmp_path / "trained.pth", "fp32")
    held = tmp_path / "held.txt"
    held.write_text(text[-HELD_OUT:], encoding="utf-8")
    out_csv, out_png = tmp_path / "r.csv", tmp_path / "r.png"
    argv = ["eval-positions", str(tmp_path / "init.pth"), str(tmp_path / "trained.pth"), "--text", str(held)]
    argv += ["--tokenizer", str(char_tokenizer), "--out_csv", str(out_csv), "--out_png", str(out_png)]
    assert main(argv) == 0
    print(capsys.readouterr().out)
    rows = list(csv.DictReader(out_csv.open()))
    by_model: dict[str, dict[str, float]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[f"{r['bucket_start']}-{r['bucket_end']}"] = float(r["mean_loss"])
    init, trained = by_model["init"], by_model["trained"]
    assert list(init) == ["1-128", "128-256", "256-512", "512-1024", "1024-2048"] == list(trained)
    for bucket in init:
        assert trained[bucket] < init[bucket] - 1.0, (bucket, trained[bucket], init[bucket])
