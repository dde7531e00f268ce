"""RWKV-LM model files: round trips, dtypes, prefixes, and one clear line for every bad file."""

from __future__ import annotations

import pickle

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import infer_config, load_model, read_state_dict, save_model, save_state_dict


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_load_save_load_is_bit_exact(tiny_model, tmp_path, dtype):
    save_model(tiny_model, tmp_path / "a.pth", dtype)
    first = read_state_dict(tmp_path / "a.pth")
    save_state_dict(first, tmp_path / "b.pth", dtype)
    assert _same(first, read_state_dict(tmp_path / "b.pth"))
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert all(v.dtype == want for v in first.values())


def test_bf16_file_loads_and_dims_come_from_shapes(tiny_model, tiny_cfg, tmp_path):
    save_model(tiny_model, tmp_path / "m.pth", "bf16")
    model = load_model(tmp_path / "m.pth")
    assert model.cfg == tiny_cfg
    ref = tiny_model.to(torch.bfloat16).float()
    tokens = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(model(tokens)[0], ref(tokens)[0])


def test_safetensors_round_trip(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "m.safetensors", "fp32")
    save_model(tiny_model, tmp_path / "m.pth", "fp32")
    assert _same(read_state_dict(tmp_path / "m.safetensors"), read_state_dict(tmp_path / "m.pth"))


def test_wrapper_prefixes_are_stripped(tiny_model, tmp_path):
    sd = tiny_model.state_dict()
    torch.save({f"_forward_module.module.{k}": v for k, v in sd.items()}, tmp_path / "w.pth")
    assert _same(read_state_dict(tmp_path / "w.pth"), sd)


def test_infer_config_reads_every_dimension(tiny_model, tiny_cfg):
    assert infer_config(tiny_model.state_dict()) == tiny_cfg


class _RunsCode:
    def __reduce__(self):
        return (print, ("pwned",))


def _bad_files(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    good = tmp_path / "good.pth"
    torch.save(sd, good)
    raw = good.read_bytes()
    cases = {
        "missing": (tmp_path / "absent.pth", "not found"),
        "not a model": (tmp_path / "text.pth", "not a"),
        "truncated": (tmp_path / "trunc.pth", "truncated or corrupt"),
        "missing key": (tmp_path / "missing_key.pth", "missing key 'blocks.1.att.time_first'"),
        "unexpected key": (tmp_path / "extra.pth", "unexpected key 'blocks.1.att.bogus'"),
        "wrong shape": (tmp_path / "shape.pth", "'blocks.0.att.time_decay' has shape (5,), expected (24,)"),
        "pickle runs code": (tmp_path / "evil.pth", "pickled objects that would run code"),
    }
    (tmp_path / "text.pth").write_text("hello, I am not a model\n")
    (tmp_path / "trunc.pth").write_bytes(raw[: len(raw) // 2])
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.att.time_first"}, tmp_path / "missing_key.pth")
    torch.save({**sd, "blocks.1.att.bogus": torch.zeros(3)}, tmp_path / "extra.pth")
    torch.save({**sd, "blocks.0.att.time_decay": torch.zeros(5)}, tmp_path / "shape.pth")
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"emb.weight": _RunsCode()}, f)
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not a model",
        "truncated",
        "missing key",
        "unexpected key",
        "wrong shape",
        "pickle runs code",
    ],
)
def test_bad_model_files_give_one_clear_line(case, tmp_path, tiny_model, capsys):
    path, expected = _bad_files(tmp_path, tiny_model)[case]
    with pytest.raises(UserError, match="model file"):
        load_model(path)
    code = main(["generate", str(path), "--prompt", "hi", "--max_tokens", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err
    assert "pwned" not in capsys.readouterr().out


def test_every_key_problem_is_named_at_once(tmp_path, tiny_model):
    sd = tiny_model.state_dict()
    sd.pop("head.weight")
    sd["ln_out.weight"] = torch.zeros(3)
    sd["extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(UserError) as err:
        load_model(tmp_path / "m.pth")
    msg = str(err.value)
    assert "missing key 'head.weight' (expected shape (97, 32))" in msg
    assert "unexpected key 'extra'" in msg and "'ln_out.weight' has shape (3,), expected (32,)" in msg


def test_failed_save_leaves_previous_file_intact(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    save_model(tiny_model, path, "fp32")
    before = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_model(tiny_model, path, "fp32")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]
