"""Any split of a sequence, carried through the state, equals one pass."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.model.state import RWKV4State

from ..conftest import random_model


def _run_split(model, tokens, sizes):
    state, outs = None, []
    for chunk in torch.split(tokens, sizes, dim=1):
        logits, state = model(chunk, state)
        outs.append(logits)
    return torch.cat(outs, 1), state


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Within tol, relative to the tensor's scale (logits, pp and bb reach ~10: fp32 ulps there are ~1e-6)."""
    return bool((a - b).abs().max() <= tol * b.abs().max().clamp_min(1.0))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize(
    "sizes", [[1, 31], [7, 25], [16, 16], [1] * 32], ids=["1+31", "7+25", "16+16", "1x32"]
)
@torch.no_grad()
def test_split_matches_one_pass(tiny_cfg, sizes, dtype, tol):
    model = random_model(tiny_cfg, seed=3, dtype=dtype)
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    full_logits, full_state = model(tokens)
    logits, state = _run_split(model, tokens, sizes)
    assert _close(logits, full_logits, tol)
    for a, b in zip(state.tensors(), full_state.tensors(), strict=True):
        assert _close(a, b, tol)


@torch.no_grad()
def test_state_only_pass_gives_the_same_state(tiny_model, tiny_cfg):
    tokens = torch.randint(0, tiny_cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    _, full = tiny_model(tokens)
    none, only = tiny_model(tokens, compute_logits=False)
    assert none is None
    for a, b in zip(only.tensors(), full.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_operations(tiny_model):
    state = tiny_model(torch.randint(0, 97, (3, 5)))[1]
    assert state.batch_size == 3 and state.n_layer == 2
    assert state.select([2, 0]).att_shift.shape[1] == 2
    torch.testing.assert_close(state.select([1]).wkv_aa[:, 0], state.wkv_aa[:, 1])
    reset = state.reset_rows(torch.tensor([True, False, True]))
    fresh = tiny_model.fresh_state(3)
    for r, s, f in zip(reset.tensors(), state.tensors(), fresh.tensors(), strict=True):
        torch.testing.assert_close(r[:, 0], f[:, 0])
        torch.testing.assert_close(r[:, 1], s[:, 1])
    assert all(not t.requires_grad for t in state.detach().tensors())
    half = state.to(dtype=torch.bfloat16)
    assert half.att_shift.dtype == torch.bfloat16 and half.wkv_pp.dtype == torch.float32
    both = RWKV4State.cat([state.select([0]), state.select([1, 2])])
    for a, b in zip(both.tensors(), state.tensors(), strict=True):
        torch.testing.assert_close(a, b)
    assert state.nbytes == sum(t.numel() * 4 for t in state.tensors())


def test_gradient_reaches_the_initial_state(tiny_model):
    state = tiny_model(torch.randint(0, 97, (1, 6)))[1].detach()
    leaves = [t.clone().requires_grad_() for t in state.tensors()]
    logits, _ = tiny_model(torch.randint(0, 97, (1, 4)), RWKV4State.from_tensors(leaves))
    logits.square().sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)


def test_rejects_empty_input(tiny_model):
    with pytest.raises(ValueError, match="at least one token"):
        tiny_model(torch.zeros(1, 0, dtype=torch.long))
