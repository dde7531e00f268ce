"""RWKV-7 (x070) model files: RWKV-LM's keys and shapes (/work/shared/RWKV7.md §2), dims from the
shapes, dtypes, layer 0's optional value-residual keys, and one line for a missing key."""

from __future__ import annotations

import zipfile

import pytest
import torch

from rwkv_infctx.cli import main
from rwkv_infctx.errors import UserError
from rwkv_infctx.io.model_file import infer_config, load_model, read_state_dict, save_model, save_state_dict
from rwkv_infctx.model import RWKV7, RWKV7Config

CFG = RWKV7Config(
    n_layer=2, n_embd=128, vocab_size=300,
    d_decay_lora=32, d_aaa_lora=48, d_mv_lora=16, d_gate_lora=64, wkv_backend="reference",
)  # fmt: skip
LAYER0_OPTIONAL = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")


def random_rwkv7(cfg: RWKV7Config = CFG, seed: int = 0) -> RWKV7:
    """Every tensor random, the zero-initialised matrices and layer 0's unused v0/v1/v2 included."""
    gen = torch.Generator().manual_seed(seed)
    model = RWKV7(cfg)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.rsplit(".", 1)[-1].startswith("x_"):
                t.copy_(torch.rand(t.shape, generator=gen))
            elif ".ln" in name or name.startswith("ln_"):
                base = 1.0 if name.endswith("weight") else 0.0
                t.copy_(base + 0.2 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) / t.shape[-1] ** 0.5)
    return model


def x070_key_shapes(L: int, C: int, V: int, H: int, N: int, D: tuple[int, int, int, int], F: int):
    """RWKV7.md §2's key table, written out: every key of an x070 file and its shape."""
    Dw, Da, Dv, Dg = D
    vec = (1, 1, C)
    shapes = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    shapes |= {"blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(L):
        p = f"blocks.{i}."
        shapes |= {p + f"{ln}.{wb}": (C,) for ln in ("ln1", "ln2") for wb in ("weight", "bias")}
        shapes |= {p + f"att.x_{c}": vec for c in "rwkvag"}
        shapes |= {p + "att.w0": vec, p + "att.w1": (C, Dw), p + "att.w2": (Dw, C)}
        shapes |= {p + "att.a0": vec, p + "att.a1": (C, Da), p + "att.a2": (Da, C)}
        shapes |= {p + "att.v0": vec, p + "att.v1": (C, Dv), p + "att.v2": (Dv, C)}
        shapes |= {p + "att.g1": (C, Dg), p + "att.g2": (Dg, C)}
        shapes |= {p + "att.k_k": vec, p + "att.k_a": vec, p + "att.r_k": (H, N)}
        shapes |= {p + f"att.{m}.weight": (C, C) for m in ("receptance", "key", "value", "output")}
        shapes |= {p + "att.ln_x.weight": (C,), p + "att.ln_x.bias": (C,)}
        shapes |= {p + "ffn.x_k": vec, p + "ffn.key.weight": (F, C), p + "ffn.value.weight": (C, F)}
    return shapes


@pytest.fixture(scope="module")
def model() -> RWKV7:
    return random_rwkv7()


def logits(model: RWKV7, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens)[0]


TOKENS = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_files_have_rwkv_lm_keys_and_shapes(model, tmp_path, suffix):
    path = save_model(model, tmp_path / f"m{suffix}", "fp32")
    sd = read_state_dict(path)
    expected = x070_key_shapes(2, 128, 300, 2, 64, (32, 48, 16, 64), 512)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    want = model.state_dict()
    assert all(torch.equal(sd[k], want[k]) for k in expected)


def test_pth_is_torch_zip_format_and_loads_with_mmap(model, tmp_path):
    """The `rwkv` package loads with torch.load(mmap=True), which needs torch's zip format."""
    path = save_model(model, tmp_path / "m.pth", "bf16")
    assert zipfile.is_zipfile(path)
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    assert sd.keys() == model.state_dict().keys()


@pytest.mark.parametrize("head_size", [64, 32])
def test_every_dim_is_inferred_from_the_shapes(tmp_path, head_size):
    cfg = RWKV7Config(
        n_layer=3, n_embd=128, vocab_size=77, head_size=head_size, dim_ffn=192,
        d_decay_lora=16, d_aaa_lora=24, d_mv_lora=8, d_gate_lora=40, wkv_backend="reference",
    )  # fmt: skip
    model = random_rwkv7(cfg)
    assert model.state_dict()["blocks.0.att.r_k"].shape == (128 // head_size, head_size)
    assert infer_config(model.state_dict(), wkv_backend="reference") == cfg
    path = save_model(model, tmp_path / "m.safetensors", "fp32")
    loaded = load_model(path, wkv_backend="reference")
    assert loaded.cfg == cfg
    torch.testing.assert_close(logits(loaded, TOKENS % 77), logits(model, TOKENS % 77), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_files_of_each_dtype_load(model, tmp_path, dtype):
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    path = save_model(model, tmp_path / "m.pth", dtype)
    assert {v.dtype for v in read_state_dict(path).values()} == {torch_dtype}
    loaded = load_model(path, wkv_backend="reference")
    assert loaded.cfg == CFG and {p.dtype for p in loaded.parameters()} == {torch.float32}
    rounded = RWKV7(CFG)
    rounded.load_state_dict({k: v.to(torch_dtype).float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(logits(loaded, TOKENS), logits(rounded, TOKENS), rtol=0, atol=0)
    as_bf16 = load_model(path, torch.bfloat16, wkv_backend="reference")
    assert as_bf16.emb.weight.dtype == torch.bfloat16


def test_a_file_of_mixed_dtypes_loads(model, tmp_path):
    """As the inference demos keep them: fp16 weights with att.w0 in fp32."""
    sd = {
        k: v.to(torch.float32 if k.endswith("att.w0") else torch.float16)
        for k, v in model.state_dict().items()
    }
    torch.save(sd, tmp_path / "mixed.pth")
    loaded = load_model(tmp_path / "mixed.pth", wkv_backend="reference")
    rounded = RWKV7(CFG)
    rounded.load_state_dict({k: v.float() for k, v in sd.items()})
    torch.testing.assert_close(logits(loaded, TOKENS), logits(rounded, TOKENS), rtol=0, atol=0)


def test_layer0_value_residual_keys_may_be_present_or_absent(model, tmp_path):
    sd = model.state_dict()
    without = {k: v for k, v in sd.items() if k not in LAYER0_OPTIONAL}
    other = {**sd, **{k: torch.randn(sd[k].shape) for k in LAYER0_OPTIONAL}}  # never read
    for name, state in (("with", sd), ("without", without), ("other", other)):
        torch.save(state, tmp_path / f"{name}.pth")
    base = logits(load_model(tmp_path / "with.pth", wkv_backend="reference"), TOKENS)
    torch.testing.assert_close(base, logits(model, TOKENS), rtol=0, atol=0)
    for name in ("without", "other"):
        loaded = load_model(tmp_path / f"{name}.pth", wkv_backend="reference")
        assert loaded.cfg == CFG
        torch.testing.assert_close(logits(loaded, TOKENS), base, rtol=0, atol=0)
    assert infer_config(without, wkv_backend="reference") == CFG  # d_mv_lora from layer 1's v1


@pytest.mark.parametrize("key", ["blocks.1.att.r_k", "blocks.0.att.r_k", "blocks.1.att.k_a"])
def test_a_missing_key_is_one_line_naming_it(model, tmp_path, capsys, key):
    path = tmp_path / "m.pth"
    save_state_dict({k: v for k, v in model.state_dict().items() if k != key}, path, "bf16")
    with pytest.raises(UserError) as e:
        load_model(path, wkv_backend="reference")
    message = str(e.value)
    assert "\n" not in message and repr(key) in message and str(path) in message
    assert main(["generate", str(path), "--max_tokens", "1", "--device", "cpu"]) == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and repr(key) in lines[0] and out.out == ""
