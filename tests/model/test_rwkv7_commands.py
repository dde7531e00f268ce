"""`generate`, `eval-positions`, `export` and `export-hf` on RWKV-7 (x070) files, through the CLI.

generate and eval-positions run the default WKV backend ("auto"); see tests/model/conftest.py."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import load_model, read_state_dict, save_model
from rwkv_infctx.model import RWKV7Config
from rwkv_infctx.training.module import RWKVModule
from tests.evaluation.conftest import CHAR_VOCAB, shakespeare, write_char_tokenizer
from tests.model.test_rwkv7_files import random_rwkv7

CFG = RWKV7Config(
    n_layer=2, n_embd=64, vocab_size=CHAR_VOCAB,
    d_decay_lora=32, d_aaa_lora=32, d_mv_lora=16, d_gate_lora=32, wkv_backend="reference",
)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(an x070 model file in fp32 over the character tokenizer, that tokenizer.json)."""
    root = tmp_path_factory.mktemp("x070")
    model = random_rwkv7(CFG, seed=3)
    with torch.no_grad():
        model.head.weight.mul_(8.0)  # peaked logits: greedy choices far from ties
    return save_model(model, root / "x070.pth", "fp32"), write_char_tokenizer(root / "char.json")


def one_pass_logits(model, ids: list[int]) -> torch.Tensor:
    """Logits of every position from one forward call over the whole sequence (no state carried)."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0]


def test_generate_greedy(files, capsys):
    path, tok_path = files
    prompt = "ROMEO:"
    tok = Tokenizer.from_file(str(tok_path))
    model = load_model(path, wkv_backend="reference")
    ids = tok.encode(prompt).ids
    new: list[int] = []
    for _ in range(6):  # greedy, each step recomputed from the start
        token = int(one_pass_logits(model, ids + new)[-1].argmax())
        if token == 0:  # end of text stops generation
            break
        new.append(token)
    assert new, "the model ends the text at once: pick another seed"
    args = ["--tokenizer", str(tok_path), "--prompt", prompt, "--max_tokens", "6"]
    assert main(["generate", str(path), *args, "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == prompt + tok.decode(new) + "\n"


def test_eval_positions_matches_one_pass(files, tmp_path, capsys):
    path, tok_path = files
    text = tmp_path / "sample.txt"
    text.write_text(shakespeare()[:90], encoding="utf-8")
    out_csv = tmp_path / "r.csv"
    args = ["--text", str(text), "--tokenizer", str(tok_path), "--segment_len", "16"]
    assert main(["eval-positions", str(path), *args, "--out_csv", str(out_csv)]) == 0
    assert "89 tokens scored" in capsys.readouterr().out
    rows = list(csv.DictReader(out_csv.open()))
    assert [(r["bucket_start"], r["bucket_end"], r["tokens"]) for r in rows] == [("1", "128", "89")]
    ids = Tokenizer.from_file(str(tok_path)).encode(shakespeare()[:90]).ids
    logits = one_pass_logits(load_model(path, wkv_backend="reference"), ids)
    loss = F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert float(rows[0]["mean_loss"]) == pytest.approx(loss, abs=2e-6)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_of_a_lightning_checkpoint(tmp_path, capsys, dtype):
    module = RWKVModule(arch="rwkv7", n_layer=2, n_embd=64, vocab_size=200, wkv_backend="reference")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init: its zero matrices would match anything zero
        for t in module.model.state_dict(keep_vars=True).values():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 1, "epoch": 0}, ckpt)
    out = tmp_path / "x070.pth"
    assert main(["export", str(ckpt), str(out), "--dtype", dtype]) == 0
    assert "RWKV-7" in capsys.readouterr().out
    sd, want = read_state_dict(out), module.model.state_dict()
    assert sd.keys() == want.keys() and "blocks.0.att.w0" in sd and "blocks.0.att.v0" in sd
    to = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert all(sd[k].dtype == to and torch.equal(sd[k], want[k].to(to)) for k in want)


def test_export_hf_refuses_an_x070_file(files, tmp_path, capsys):
    path, _ = files
    outdir = tmp_path / "hf"
    assert main(["export-hf", str(path), str(outdir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and "RWKV-7" in err and "transformers" in err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder
