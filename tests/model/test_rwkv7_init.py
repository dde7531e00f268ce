"""`rwkv-infctx init --arch rwkv7`: RWKV-LM train_temp's initialisation, checked value by value
against /work/shared/RWKV7.md §2's init table (the expected values are computed here from the table,
channel by channel), the LoRA dims (official table, else train_temp's formula), seeds and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.io.model_file import read_state_dict
from rwkv_infctx.model import RWKV7Config
from tests.model.test_rwkv7_files import x070_key_shapes

L, C, V, N = 3, 128, 300, 64
LERP_P = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}
ZERO_MATRICES = ("att.output.weight", "ffn.value.weight", "att.w1", "att.a1", "att.v1", "att.g1")


def init(path, *args: str) -> int:
    return main(["init", str(path), "--arch", "rwkv7", *args])


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> dict[str, torch.Tensor]:
    path = tmp_path_factory.mktemp("init") / "x070.pth"
    args = ("--n_layer", str(L), "--n_embd", str(C), "--vocab_size", str(V), "--dtype", "fp32")
    assert init(path, *args) == 0
    out = read_state_dict(path)
    assert {v.dtype for v in out.values()} == {torch.float32}
    return out


def table_vectors(layer: int) -> dict[str, torch.Tensor]:
    """§2's per-channel formulas for one layer, in float64, one channel at a time."""
    r01, r10 = layer / (L - 1), 1 - layer / L
    out: dict[str, list[float]] = {name: [] for name in (*LERP_P, "w0", "a0", "v0", "k_k", "ffn.x_k")}
    for n in range(C):
        ddd, lin = n / C, n / (C - 1) - 0.5
        ramp = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)  # −1 … 1 across each head
        zz = ramp * abs(ramp)
        for name, p in LERP_P.items():
            out[name].append(1 - ddd ** (p * r10))
        out["w0"].append(-6 + 6 * (n / (C - 1)) ** (1 + r01**0.3) + 0.5 + 2.5 * zz)
        out["a0"].append(-0.19 + 0.3 * zz + 0.4 * lin)
        out["v0"].append(0.73 - 0.4 * lin)
        out["k_k"].append(0.71 - 0.1 * lin)
        out["ffn.x_k"].append(1 - ddd ** (r10**4))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_vectors_follow_the_table(sd, layer):
    p = f"blocks.{layer}."
    for name, want in table_vectors(layer).items():
        key = p + (name if name.startswith("ffn.") else f"att.{name}")
        assert sd[key].shape == (1, 1, C), key
        torch.testing.assert_close(sd[key].double().flatten(), want, rtol=0, atol=2e-6, msg=key)
    assert torch.equal(sd[p + "att.k_a"], torch.full((1, 1, C), 1.02))
    assert torch.equal(sd[p + "att.r_k"], torch.full((C // N, N), -0.04))
    torch.testing.assert_close(sd[p + "att.ln_x.weight"], torch.full((C,), ((layer + 1) / L) ** 0.7))
    assert torch.equal(sd[p + "att.ln_x.bias"], torch.zeros(C))


def test_layer_norms_and_embedding(sd):
    norms = [k for k in sd if k.split(".")[-2] in ("ln0", "ln1", "ln2", "ln_out")]
    assert len(norms) == 2 * (1 + 2 * L + 1)
    for key in norms:
        assert torch.equal(sd[key], torch.ones(C) if key.endswith("weight") else torch.zeros(C)), key
    emb = sd["emb.weight"]
    assert emb.shape == (V, C) and emb.abs().max() <= 1e-4
    assert abs(emb.std().item() - 1e-4 / math.sqrt(3)) < 0.05e-4  # uniform in ±1e-4


def assert_orthogonal(w: torch.Tensor, gain: float, key: str) -> None:
    """W Wᵀ = gain²·I for a wide matrix, Wᵀ W = gain²·I for a tall one (orthonormal rows/columns)."""
    w = w.double()
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    torch.testing.assert_close(gram, gain**2 * torch.eye(gram.shape[0], dtype=torch.float64), rtol=0,
                               atol=1e-5 * max(gain**2, 1), msg=key)  # fmt: skip


def test_matrices_are_orthogonal_with_the_table_gains_or_zero(sd):
    for layer in range(L):
        p = f"blocks.{layer}."
        for name in ZERO_MATRICES:
            assert sd[p + name].abs().max() == 0, p + name
        gains = {"att.receptance.weight": 1.0, "att.key.weight": 0.1, "att.value.weight": 1.0}
        gains |= {"ffn.key.weight": 1.0, "att.w2": 0.1, "att.a2": 0.1, "att.v2": 0.1, "att.g2": 0.1}
        for name, gain in gains.items():
            assert_orthogonal(sd[p + name], gain, p + name)
    assert sd["blocks.0.ffn.key.weight"].shape == (4 * C, C)
    assert_orthogonal(sd["head.weight"], 0.5 * math.sqrt(V / C), "head.weight")
    # a random orthogonal matrix, not a fixed pattern: the layers differ
    assert not torch.equal(sd["blocks.0.att.receptance.weight"], sd["blocks.1.att.receptance.weight"])


def test_the_file_has_every_x070_key(sd):
    """train_temp's output: the x070 key table, layer 0's unused v0/v1/v2 included."""
    want = x070_key_shapes(L, C, V, C // N, N, (32, 32, 32, 64), 4 * C)
    assert {k: tuple(v.shape) for k, v in sd.items()} == want


def test_head_gain_when_the_vocabulary_is_not_above_the_width(tmp_path):
    path = tmp_path / "m.pth"
    assert init(path, "--n_layer", "1", "--n_embd", "64", "--vocab_size", "50", "--dtype", "fp32") == 0
    assert_orthogonal(read_state_dict(path)["head.weight"], 0.5, "head.weight")


def test_lora_dims_default_to_the_formula_for_other_widths(sd):
    # C = 128: max(32, round(k·√128/32)·32) with k = 2.5, 2.5, 1.7, 5 → 32, 32, 32, 64
    assert [sd[f"blocks.1.att.{m}1"].shape for m in "wavg"] == [(C, 32), (C, 32), (C, 32), (C, 64)]
    assert [sd[f"blocks.1.att.{m}2"].shape for m in "wavg"] == [(32, C), (32, C), (32, C), (64, C)]
    worked = {512: (64, 64, 32, 128), 1536: (96, 96, 64, 192), 3072: (128, 128, 96, 288)}
    for width, dims in worked.items():
        cfg = RWKV7Config(n_layer=1, n_embd=width, vocab_size=100)
        assert (cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) == dims, width


# RWKV7.md §2 "Official sizes": n_embd -> Dw/Da/Dv/Dg
OFFICIAL = {768: (64, 64, 32, 128), 1024: (64, 64, 32, 128), 2048: (96, 96, 64, 256),
            2560: (96, 96, 64, 320), 4096: (128, 128, 96, 480)}  # fmt: skip


def test_lora_dims_default_to_the_official_table(tmp_path):
    for width, dims in OFFICIAL.items():
        cfg = RWKV7Config(n_layer=1, n_embd=width, vocab_size=100)
        assert (cfg.d_decay_lora, cfg.d_aaa_lora, cfg.d_mv_lora, cfg.d_gate_lora) == dims, width
    path = tmp_path / "768.safetensors"
    assert init(path, "--n_layer", "1", "--n_embd", "768", "--vocab_size", "100") == 0
    sd = read_state_dict(path)
    assert [sd[f"blocks.0.att.{m}1"].shape[1] for m in "wavg"] == [64, 64, 32, 128]
    assert sd["blocks.0.att.r_k"].shape == (12, 64) and sd["emb.weight"].dtype == torch.bfloat16


def test_given_lora_dims_and_named_vocabularies(tmp_path):
    path = tmp_path / "m.pth"
    loras = ("--d_decay_lora", "16", "--d_aaa_lora", "24", "--d_mv_lora", "8", "--d_gate_lora", "40")
    assert init(path, "--n_layer", "2", "--n_embd", "64", "--vocab_size", "world", *loras) == 0
    sd = read_state_dict(path)
    assert [sd[f"blocks.1.att.{m}1"].shape for m in "wavg"] == [(64, 16), (64, 24), (64, 8), (64, 40)]
    assert sd["emb.weight"].shape == (65536, 64) and sd["head.weight"].shape == (65536, 64)
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}  # the default dtype
    path = tmp_path / "neox.pth"
    assert init(path, "--n_layer", "1", "--n_embd", "64", "--vocab_size", "neox") == 0
    assert read_state_dict(path)["emb.weight"].shape == (50277, 64)


def test_deterministic_per_seed(tmp_path):
    dims = ("--n_layer", "1", "--n_embd", "64", "--vocab_size", "100")
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        assert init(tmp_path / f"{name}.pth", *dims, "--seed", seed) == 0
    a, b, c = (read_state_dict(tmp_path / f"{n}.pth") for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert not torch.equal(a["blocks.0.att.g2"], c["blocks.0.att.g2"])


def test_dim_att_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / "m.pth"
    assert init(path, "--n_layer", "1", "--n_embd", "64", "--vocab_size", "100", "--dim_att", "64") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dim_att 64" in err and "RWKV-7" in err
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_init_without_arch_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["init", str(tmp_path / "m.pth"), "--n_layer", "1", "--n_embd", "64", "--vocab_size", "100"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: rwkv-infctx init") and "the following arguments are required: --arch" in err
    assert list(tmp_path.iterdir()) == []
