"""`hidden` + `head` is `forward`; grad_cp recomputes blocks in backward without changing anything."""

from __future__ import annotations

import torch

from rwkv_infctx.model import RWKV4Config

from ..conftest import random_model


def test_head_of_hidden_chunks_is_forward(tiny_model, tiny_cfg):
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(2))
    state = tiny_model(tokens[:, :5])[1]
    with torch.no_grad():
        logits, full = tiny_model(tokens[:, 5:], state)
        h, hidden_state = tiny_model.hidden(tokens[:, 5:], state)
        none, only = tiny_model.hidden(tokens[:, 5:], state, state_only=True)
    assert h.shape == (2, 14, tiny_cfg.n_embd) and none is None
    chunks = torch.cat([tiny_model.head(h[:, c : c + 4]) for c in range(0, 14, 4)], 1)
    torch.testing.assert_close(chunks, logits, rtol=0, atol=0)
    for a, b, c in zip(hidden_state.tensors(), full.tensors(), only.tensors(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(c, b, rtol=0, atol=0)


def count_calls(block: torch.nn.Module, calls: list[int]) -> None:
    """Append to `calls` on every run of block's forward (hooks do not see checkpoint replays)."""
    forward = block.forward
    block.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]


def _grads_and_block_calls(model, tokens, grad_cp: bool, seed: int):
    calls = []
    for block in model.blocks:
        count_calls(block, calls)
    torch.manual_seed(seed)
    h, state = model.hidden(tokens, grad_cp=grad_cp)
    (h.square().sum() + state.wkv_aa.sum()).backward()
    for block in model.blocks:
        del block.forward
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads, len(calls)


def test_grad_cp_recomputes_blocks_and_replays_dropout():
    cfg = RWKV4Config(n_layer=2, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80, dropout=0.3)
    model = random_model(cfg, seed=4, dtype=torch.float64)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    plain, n_plain = _grads_and_block_calls(model, tokens, grad_cp=False, seed=7)
    cp, n_cp = _grads_and_block_calls(model, tokens, grad_cp=True, seed=7)
    assert (n_plain, n_cp) == (2, 4)  # each block ran again in backward
    assert torch.allclose(cp, plain, rtol=1e-12, atol=0)  # the same dropout masks in the recompute
    other, _ = _grads_and_block_calls(model, tokens, grad_cp=True, seed=8)
    assert not torch.allclose(other, plain, rtol=1e-3)  # dropout is active: the check can fail
    calls = []
    count_calls(model.blocks[0], calls)
    with torch.no_grad():
        model.hidden(tokens, grad_cp=True)  # without grad there is nothing to checkpoint
    assert len(calls) == 1
