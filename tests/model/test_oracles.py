"""Our RWKV-4 against two independent implementations: HF transformers and the `rwkv` package."""

from __future__ import annotations

import os

import pytest
import torch

from rwkv_infctx.convert.hf import hf_config_kwargs, to_hf_state_dict
from rwkv_infctx.io.model_file import load_model, save_model
from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.model.init import init_weights
from rwkv_infctx.model.rwkv4 import RWKV4

from ..conftest import random_model

TOL = 1e-5
CFGS = [
    RWKV4Config(n_layer=2, n_embd=32, vocab_size=97),
    RWKV4Config(n_layer=3, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80),
]


def _tokens(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _hf_model(model: RWKV4):
    transformers = pytest.importorskip("transformers")
    hf = transformers.RwkvForCausalLM(transformers.RwkvConfig(**hf_config_kwargs(model.cfg)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf.eval()


def _rwkv_package_model(path):
    os.environ.setdefault("RWKV_JIT_ON", "0")  # the package reads these switches at import
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    rwkv_model = pytest.importorskip("rwkv.model")
    return rwkv_model.RWKV(str(path), strategy="cpu fp32")


@pytest.mark.parametrize("cfg", CFGS, ids=["square", "dim_att-dim_ffn"])
@torch.no_grad()
def test_matches_hf_transformers(cfg):
    model = random_model(cfg, seed=1)
    tokens = _tokens(40, cfg.vocab_size)
    ours, _ = model(tokens)
    hf = _hf_model(model)
    assert (ours - hf(tokens, use_cache=False).logits).abs().max() < TOL


@torch.no_grad()
def test_state_and_single_token_steps_match_hf_transformers():
    """HF keeps its state as [ffn shift, att shift, aa, bb, pp], each (B, C, L) (needs dim_att = C)."""
    cfg = CFGS[0]
    model = random_model(cfg, seed=7)
    hf = _hf_model(model)
    tokens = _tokens(41, cfg.vocab_size, seed=8)
    _, state = model(tokens[:, :40])
    hf_state = hf(tokens[:, :40], use_cache=True).state
    ours_fields = (state.ffn_shift, state.att_shift, state.wkv_aa, state.wkv_bb)
    for ours_t, theirs in zip(ours_fields, hf_state[:4], strict=True):
        torch.testing.assert_close(ours_t, theirs.permute(2, 0, 1), rtol=1e-5, atol=1e-5)
    for t in range(40, 41):
        step, state = model(tokens[:, t : t + 1], state)
        hf_out = hf(tokens[:, t : t + 1], state=hf_state, use_cache=True)
        hf_state = hf_out.state
        assert (step - hf_out.logits).abs().max() < TOL


@pytest.mark.parametrize("cfg", [CFGS[0], RWKV4Config(2, 32, 97, dim_ffn=80)], ids=["square", "dim_ffn"])
@torch.no_grad()
def test_matches_rwkv_package(cfg, tmp_path):
    """The package's state assumes dim_att = n_embd, so only dim_ffn varies here."""
    model = random_model(cfg, seed=2)
    path = tmp_path / "model.pth"
    save_model(model, path, dtype="fp32")
    theirs = _rwkv_package_model(path)
    tokens = _tokens(33, cfg.vocab_size, seed=3)
    ours, _ = model(tokens)
    logits, their_state = theirs.forward(tokens[0].tolist(), None, full_output=True)
    assert (ours[0] - logits).abs().max() < TOL
    # continue token by token through both states
    ours_state = model(tokens)[1]
    for t in _tokens(5, cfg.vocab_size, seed=4)[0].tolist():
        a, ours_state = model(torch.tensor([[t]]), ours_state)
        b, their_state = theirs.forward([t], their_state)
        assert (a[0, -1] - b).abs().max() < TOL


@torch.no_grad()
def test_init_file_loads_in_both_oracles_with_equal_logits(tmp_path):
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=97)
    path = tmp_path / "init.pth"
    save_model(init_weights(RWKV4(cfg), seed=5), path, dtype="fp32")
    model = load_model(path)
    tokens = _tokens(17, cfg.vocab_size, seed=6)
    ours, _ = model(tokens)
    assert (ours - _hf_model(model)(tokens).logits).abs().max() < TOL
    assert (
        ours[0] - _rwkv_package_model(path).forward(tokens[0].tolist(), None, full_output=True)[0]
    ).abs().max() < TOL
