"""model.compile: compiled time-mix and channel-mix change no result of segmented BPTT."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.training.module import RWKVModule, compile_mixers
from rwkv_infctx.training.segments import bptt_step
from tests.conftest import random_model

from .batches import flat_grad, make_batch, rel

CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80)


def bptt_grad(model, batch, grad_cp: bool):
    proxy, report = bptt_step(model, batch, 16, grad_cp=grad_cp)
    proxy.backward()
    return flat_grad(model), report.loss


@pytest.mark.slow
def test_compiled_mixers_give_the_eager_gradients():
    """fp32 inductor against eager: equal up to reassociation (~1e-7 measured), grad_cp off and on.

    T = 40 in segments of 16, 16 and 8 tokens: the shorter last segment runs the dynamic graphs; the
    state pass (compute_logits=False: no channel-mix in the last block) runs them without grad.
    """
    eager, compiled = random_model(CFG, seed=1), random_model(CFG, seed=1)
    compile_mixers(compiled)
    batch = make_batch([40, 29], CFG.vocab_size, seed=2)
    counters.clear()
    for grad_cp in (False, True):
        ref, ref_loss = bptt_grad(eager, batch, grad_cp)
        got, loss = bptt_grad(compiled, batch, grad_cp)
        assert torch.isfinite(got).all() and rel(got, ref) < 1e-5, (grad_cp, rel(got, ref))
        assert loss == pytest.approx(ref_loss, rel=1e-6)
    assert counters["stats"]["unique_graphs"] > 0  # the comparison can fail: compiled code ran

    with torch.no_grad():
        ids = batch["input_ids"][:, :7]
        none, state = compiled(ids, compute_logits=False)
        _, ref_state = eager(ids, compute_logits=False)
    assert none is None
    for a, b in zip(state.tensors(), ref_state.tensors(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compile_option_compiles_each_mixer_once_and_keeps_the_keys():
    plain = RWKVModule(arch="rwkv4", n_layer=2, n_embd=32, vocab_size=97)
    module = RWKVModule(arch="rwkv4", n_layer=2, n_embd=32, vocab_size=97, compile=True)
    for _ in range(2):  # Lightning may call configure_model again (fit, then validate)
        module.configure_model()
    plain.configure_model()
    mixers = [m for b in module.model.blocks for m in (b.att, b.ffn)]
    assert all(m._compiled_call_impl is not None for m in mixers)
    assert all(b.att._compiled_call_impl is None for b in plain.model.blocks)
    assert module.state_dict().keys() == plain.state_dict().keys()  # no _orig_mod: files stay RWKV-LM's
