"""Shared fixtures: tiny random RWKV-4 and RWKV-7 models."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before lightning imports triton (below): see tests/ops/fla_interpreter.py
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from rwkv_infctx.model import RWKV4, RWKV7, RWKV4Config, RWKV7Config
from rwkv_infctx.model.rwkv7.init import init_weights as init_rwkv7


def random_model(cfg: RWKV4Config, seed: int = 0, dtype=torch.float32) -> RWKV4:
    """Every weight random (time parameters included): zero-initialised matrices would hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    model = RWKV4(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("time_decay"):
                p.copy_(torch.rand(p.shape, generator=gen) * 8 - 5)
            elif name.endswith("time_first"):
                p.copy_(torch.rand(p.shape, generator=gen) * 3 - 2)
            elif "time_mix" in name:
                p.copy_(torch.rand(p.shape, generator=gen))
            elif ".ln" in name or name.startswith("ln_"):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    return model.to(dtype)


def random_rwkv7(cfg: RWKV7Config, seed: int = 0, dtype=torch.float32) -> RWKV7:
    """train_temp's init with every weight perturbed: the all-zero matrices (output, ffn.value, the
    first LoRA factors) made non-zero, so the state and every LoRA reach the logits."""
    gen = torch.Generator().manual_seed(seed)
    model = init_rwkv7(RWKV7(cfg), seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            scale = 0.5 / max(p.shape) ** 0.5 if p.dim() == 2 else 0.1
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model.to(dtype)


FAMILY_NAMES = ("rwkv4", "rwkv7")
"""The model families that every guarantee test runs for (`family` fixture, `family_config`)."""


def family_config(family: str, vocab_size: int = 97, **options) -> RWKV4Config | RWKV7Config:
    """The tiny test model of `family`: RWKV-4 2 × 32 (dim_att 24, dim_ffn 80), RWKV-7 2 × 64 (one
    head of 64, LoRA dims at their minimum of 32); `options` (dropout, wkv_backend, or a dim) override."""
    if family == "rwkv4":
        dims = {"n_layer": 2, "n_embd": 32, "dim_att": 24, "dim_ffn": 80}
        return RWKV4Config(**{**dims, "vocab_size": vocab_size, **options})
    if family == "rwkv7":
        return RWKV7Config(**{"n_layer": 2, "n_embd": 64, "vocab_size": vocab_size, **options})
    raise ValueError(f"family {family!r}: expected one of {FAMILY_NAMES}")


def random_family_model(cfg: RWKV4Config | RWKV7Config, seed: int = 0, dtype=torch.float32) -> RWKV4 | RWKV7:
    """`random_model` or `random_rwkv7`, whichever family `cfg` belongs to."""
    if isinstance(cfg, RWKV7Config):
        return random_rwkv7(cfg, seed, dtype)
    return random_model(cfg, seed, dtype)


@pytest.fixture(params=FAMILY_NAMES)
def family(request) -> str:
    """Runs a test once per model family."""
    return request.param


@pytest.fixture(autouse=True)
def _restore_environment():
    """Each test sees the environment the session started with: an in-process `fit` leaves
    Lightning's PL_GLOBAL_SEED and PL_SEED_WORKERS behind, and rank subprocesses launched by later
    tests would inherit them (tests/distributed then trained differently in some test orders)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def tiny_cfg() -> RWKV4Config:
    return RWKV4Config(n_layer=2, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80)


@pytest.fixture
def tiny_model(tiny_cfg) -> RWKV4:
    return random_model(tiny_cfg)
