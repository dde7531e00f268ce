"""`rwkv-infctx export-hf`: the folder loads in transformers, offline, with equal logits."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import save_model
from rwkv_infctx.model import RWKV4Config

from ..conftest import random_model

transformers = pytest.importorskip("transformers")


def test_round_trip_through_transformers(tmp_path):
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=50277, dim_ffn=96)
    model = random_model(cfg, seed=11)
    save_model(model, tmp_path / "m.pth", "fp32")
    out = tmp_path / "hf"
    assert main(["export-hf", str(tmp_path / "m.pth"), str(out)]) == 0
    hf = transformers.RwkvForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = tok("Hello world, RWKV!\n\nThe quick brown fox", return_tensors="pt").input_ids
    assert ids[0].tolist() == [12092, 1533, 13, 416, 27767, 55, 2, 187, 187, 510, 3158, 8516, 30013]
    with torch.no_grad():
        assert (model(ids)[0] - hf(ids).logits).abs().max() <= 1e-5


def test_refuses_existing_folder_and_bad_inputs(tmp_path, capsys):
    save_model(random_model(RWKV4Config(2, 16, 300), seed=1), tmp_path / "small.pth", "fp32")
    (tmp_path / "taken").mkdir()
    assert main(["export-hf", str(tmp_path / "small.pth"), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-hf", str(tmp_path / "small.pth"), str(tmp_path / "hf")]) == 2
    assert "50277 tokens" in capsys.readouterr().err  # neox needs a 50277-row model
    assert not (tmp_path / "hf").exists()


def test_unwritable_output_folder(tmp_path, capsys, monkeypatch):
    """Tests run as root (who may write anywhere), so the refusal is simulated at the OS call."""
    save_model(random_model(RWKV4Config(2, 16, 50277), seed=1), tmp_path / "m.pth", "fp32")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", refuse)
    assert main(["export-hf", str(tmp_path / "m.pth"), str(tmp_path / "hf")]) == 2
    assert "cannot write in" in capsys.readouterr().err and not (tmp_path / "hf").exists()
