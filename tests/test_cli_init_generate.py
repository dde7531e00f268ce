"""`rwkv-infctx init` then `rwkv-infctx generate`, through the command-line entry point."""

from __future__ import annotations

import subprocess
import sys

import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import load_model, read_state_dict


def test_init_is_deterministic_and_refuses_to_overwrite(tmp_path, capsys):
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    args = ["--n_layer", "2", "--n_embd", "32", "--vocab_size", "neox", "--seed", "3"]
    assert main(["init", str(a), "--arch", "rwkv4", *args]) == 0
    assert main(["init", str(b), "--arch", "rwkv4", *args]) == 0
    sa, sb = read_state_dict(a), read_state_dict(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert sa["emb.weight"].shape == (50277, 32) and sa["emb.weight"].dtype == torch.bfloat16
    before = a.read_bytes()
    assert main(["init", str(a), "--arch", "rwkv4", *args[:-1], "4"]) == 2
    assert "already exists" in capsys.readouterr().err and a.read_bytes() == before
    assert main(["init", str(a), "--arch", "rwkv4", *args[:-1], "4", "--force"]) == 0
    assert not torch.equal(read_state_dict(a)["head.weight"], sa["head.weight"])


def test_init_scheme(tmp_path):
    path = tmp_path / "m.pth"
    assert (
        main(
            [
                "init",
                str(path),
                "--arch",
                "rwkv4",
                "--n_layer",
                "3",
                "--n_embd",
                "32",
                "--vocab_size",
                "500",
                "--dtype",
                "fp32",
            ]
        )
        == 0
    )
    sd = read_state_dict(path)
    for key in ("att.key", "att.receptance", "att.output", "ffn.value", "ffn.receptance"):
        assert not sd[f"blocks.1.{key}.weight"].any(), key
    assert sd["emb.weight"].abs().max() <= 1e-4
    head = sd["head.weight"]  # orthogonal columns with gain 0.5·sqrt(V/C)
    gram = head.T @ head
    torch.testing.assert_close(gram, torch.eye(32) * 0.25 * 500 / 32, atol=1e-3, rtol=1e-4)
    decay = sd["blocks.0.att.time_decay"]
    assert decay[0] == -5 and abs(decay[-1] - 3) < 1e-6 and (decay.diff() > 0).all()
    assert sd["blocks.2.att.time_mix_k"].shape == (1, 1, 32)
    assert load_model(path).cfg.n_layer == 3


def test_generate_streams_greedy_text(tmp_path):
    path = tmp_path / "m.pth"
    assert (
        main(
            ["init", str(path), "--arch", "rwkv4", "--n_layer", "2", "--n_embd", "32", "--vocab_size", "neox"]
        )
        == 0
    )
    cmd = [
        sys.executable,
        "-m",
        "rwkv_infctx",
        "generate",
        str(path),
        "--prompt",
        "Hello",
        "--max_tokens",
        "8",
    ]
    first = subprocess.run([*cmd, "--temperature", "0"], capture_output=True, text=True, check=True).stdout
    again = subprocess.run([*cmd, "--temperature", "0"], capture_output=True, text=True, check=True).stdout
    assert first.startswith("Hello") and len(first) > len("Hello\n") and first == again


def test_generate_rejects_tokenizer_larger_than_model(tmp_path, capsys):
    path = tmp_path / "m.pth"
    main(["init", str(path), "--arch", "rwkv4", "--n_layer", "2", "--n_embd", "16", "--vocab_size", "neox"])
    assert main(["generate", str(path), "--tokenizer", "world", "--max_tokens", "1"]) == 2
    assert "65536 tokens" in capsys.readouterr().err


def test_bad_arguments(tmp_path, capsys):
    assert (
        main(
            [
                "init",
                str(tmp_path / "m.pth"),
                "--arch",
                "rwkv4",
                "--n_layer",
                "0",
                "--n_embd",
                "8",
                "--vocab_size",
                "9",
            ]
        )
        == 2
    )
    assert "n_layer=0" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
