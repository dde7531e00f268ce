"""State files (`model.train_mode: state`): their orientation against the `rwkv` package, `export` of
a state-mode checkpoint, `generate` / `eval-positions --state`, and bad files refused in one line."""

from __future__ import annotations

import csv

import pytest
import torch
from tokenizers import Tokenizer

from rwkv_infctx.cli import main
from rwkv_infctx.generation import generate_text
from rwkv_infctx.io.model_file import load_model, read_state_dict, save_model
from rwkv_infctx.model import RWKV7Config
from rwkv_infctx.tokenizer import load_tokenizer
from rwkv_infctx.training.module import RWKVModule
from rwkv_infctx.training.segments import evaluate_loss
from rwkv_infctx.training.tuning.state import attach_initial_state, initial_states, save_initial_state
from rwkv_infctx.training.tuning.state_files import STATE_KEY
from tests.conftest import random_rwkv7
from tests.evaluation.conftest import write_char_tokenizer
from tests.training.batches import rel

from .rwkv7_package import run_package

CFG = RWKV7Config(
    n_layer=2, n_embd=128, vocab_size=300, d_decay_lora=32, d_aaa_lora=32, d_mv_lora=16, d_gate_lora=32,
    wkv_backend="chunked",
)  # fmt: skip
"""Two heads, so the file's head order is tested as well as each head's orientation."""
TOKENS = torch.randint(0, CFG.vocab_size, (24,), generator=torch.Generator().manual_seed(7)).tolist()


def random_state(model, seed: int = 1):
    """S0 attached to `model`, random and deliberately non-symmetric."""
    attach_initial_state(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in initial_states(model):
            s.copy_(torch.randn(s.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(model file, state file, our model with that S0)."""
    root = tmp_path_factory.mktemp("state_file")
    model = random_state(random_rwkv7(CFG, seed=2).eval())
    path = root / "x070.pth"
    save_model(random_rwkv7(CFG, seed=2), path, "fp32")  # the base weights, without S0
    return path, save_initial_state(model, root / "state.pth"), model


@torch.no_grad()
def decode(model, tokens: list[int]) -> torch.Tensor:
    state, rows = None, []
    for token in tokens:
        logits, state = model(torch.tensor([[token]]), state)
        rows.append(logits[0, 0])
    return torch.stack(rows)


def test_state_file_orientation_is_the_rwkv_packages(files, tmp_path):
    path, state_path, model = files
    sd = torch.load(state_path, weights_only=True)
    assert sorted(sd) == [STATE_KEY.format(i) for i in range(CFG.n_layer)]
    assert all(t.shape == (2, 64, 64) and t.dtype == torch.float32 for t in sd.values())
    assert "init_state.wkv.0" not in read_state_dict(path)  # the model file has only RWKV-LM's keys
    ref = run_package(path, {"from_state": (str(state_path), TOKENS)}, tmp_path)["from_state"]
    ours = decode(attach_initial_state(load_model(path, wkv_backend="chunked"), state_path), TOKENS)
    assert rel(ours, ref) <= 1e-5
    assert rel(decode(model, TOKENS), ref) <= 1e-5
    with torch.no_grad():  # the orientation matters: S0 transposed, or no S0, decodes differently
        for s in initial_states(model):
            s.copy_(s.transpose(-1, -2).clone())
    assert rel(decode(model, TOKENS), ref) > 1e-3
    assert rel(decode(load_model(path, wkv_backend="chunked"), TOKENS), ref) > 1e-3


def test_generate_and_eval_positions_with_state(files, tmp_path, capsys):
    path, state_path, _ = files
    text = tmp_path / "t.txt"
    text.write_text("the state file starts every sequence here", encoding="utf-8")
    tok = write_char_tokenizer(tmp_path / "char.json")
    out_csv = tmp_path / "r.csv"
    args = ["--text", str(text), "--tokenizer", str(tok), "--segment_len", "4", "--device", "cpu"]
    assert (
        main(
            [
                "eval-positions",
                str(path),
                str(path),
                *args,
                "--state",
                "-",
                str(state_path),
                "--out_csv",
                str(out_csv),
            ]
        )
        == 0
    )
    rows = {r["model"]: float(r["mean_loss"]) for r in csv.DictReader(out_csv.open())}
    ids = torch.tensor([Tokenizer.from_file(str(tok)).encode(text.read_text()).ids])
    batch = {"input_ids": ids[:, :-1], "target_ids": ids[:, 1:], "loss_mask": torch.ones(1, ids.shape[1] - 1)}
    with_s0 = attach_initial_state(load_model(path), state_path)
    assert rows["x070+state"] == pytest.approx(evaluate_loss(with_s0, batch, 64).loss, rel=1e-5)
    assert abs(rows["x070"] - rows["x070+state"]) > 1e-3
    capsys.readouterr()
    generate = ["generate", str(path), "--prompt", "Hi", "--tokenizer", str(tok), "--max_tokens", "8"]
    assert main([*generate, "--temperature", "0", "--device", "cpu", "--state", str(state_path)]) == 0
    want = generate_text(with_s0, load_tokenizer(str(tok)), "Hi", 8, temperature=0.0)
    assert capsys.readouterr().out == "Hi" + want + "\n"


def test_export_of_a_state_mode_checkpoint(tmp_path, capsys):
    module = RWKVModule(arch="rwkv7", n_layer=2, n_embd=64, vocab_size=200, train_mode="state")
    with torch.no_grad():
        for s in initial_states(module.model):
            s.normal_()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": module.state_dict(), "global_step": 1, "epoch": 0}, ckpt)
    out = tmp_path / "state.pth"
    assert main(["export", str(ckpt), str(out)]) == 0
    assert "state file" in capsys.readouterr().out
    sd = torch.load(out, weights_only=True)
    assert sorted(sd) == [STATE_KEY.format(i) for i in range(2)]
    assert all(torch.equal(sd[STATE_KEY.format(i)], s) for i, s in enumerate(initial_states(module.model)))
    assert main(["export", str(ckpt), str(tmp_path / "state.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a state file is a .pth" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "state.pth"]


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("missing", "missing key 'blocks.1.att.time_state' (expected one of shape (2, 64, 64)"),
        ("shape", "key 'blocks.0.att.time_state' has shape (2, 64, 32), expected (2, 64, 64)"),
        ("layers", "unexpected key 'blocks.2.att.time_state' (expected blocks.i.att.time_state for i < 2"),
        ("garbage", "not a readable dict of tensors"),
    ],
)
def test_bad_state_files_are_refused_in_one_line(files, tmp_path, capsys, bad, expected):
    path, state_path, _ = files
    sd = torch.load(state_path, weights_only=True)
    if bad == "missing":
        del sd[STATE_KEY.format(1)]
    elif bad == "shape":
        sd[STATE_KEY.format(0)] = sd[STATE_KEY.format(0)][..., :32]
    elif bad == "layers":
        sd[STATE_KEY.format(2)] = sd[STATE_KEY.format(0)]
    broken = tmp_path / "broken.pth"
    if bad == "garbage":
        broken.write_bytes(b"not a pickle")
    else:
        torch.save(sd, broken)
    assert main(["generate", str(path), "--state", str(broken), "--max_tokens", "1", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"state file {broken}" in err and expected in err
