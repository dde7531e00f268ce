"""The head and loss in chunks of positions: the same gradients and loss, bounded logits."""

from __future__ import annotations

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.model import RWKV4Config
from rwkv_infctx.training.loss import (
    chunk_columns,
    head_loss_grad,
    objective,
    objective_grad_,
    segment_terms,
)
from rwkv_infctx.training.segments import bptt_step, evaluate_loss
from tests.conftest import family_config, random_family_model, random_model

from .batches import flat_grad, make_batch, plain_objective, rel

CFG = RWKV4Config(n_layer=2, n_embd=32, vocab_size=97, dim_att=24, dim_ffn=80)
T = 112
WHOLE = 10**9  # a chunk larger than any segment: the head sees whole segments


def step_grad(model, batch, ctx_len, **kw):
    proxy, report = bptt_step(model, batch, ctx_len, **kw)
    proxy.backward()
    return flat_grad(model), report


def logit_rows(model):
    """A list that collects the number of positions of every head call (and the hook's handle)."""
    rows: list[int] = []
    handle = model.head.register_forward_hook(lambda m, i, out: rows.append(out[..., 0].numel()))
    return rows, handle


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_chunked_loss_gradients_equal_unchunked_and_unsegmented(family, dtype, tol):
    model = random_family_model(family_config(family, CFG.vocab_size), seed=21, dtype=dtype)
    batch = make_batch([T, T - 37], CFG.vocab_size, seed=22)
    batch["loss_mask"][:, 30:50] = 0  # a fully masked chunk inside the sample is skipped
    plain_objective(model, batch).backward()
    ref = flat_grad(model)
    whole, whole_report = step_grad(model, batch, 48, loss_chunk=WHOLE)
    rows, handle = logit_rows(model)
    chunked, report = step_grad(model, batch, 48, loss_chunk=26)  # 13 columns: divides neither 48 nor T
    handle.remove()
    assert rel(chunked, whole) <= tol and rel(chunked, ref) <= tol
    assert report.loss == pytest.approx(whole_report.loss, rel=tol)
    assert max(rows) <= 26 and len(rows) > 2 * len(range(0, T, 48))  # several chunks per segment


def test_bf16_weights_chunked_equal_unchunked():
    """Half-precision head gradients are summed over chunks in float32, like the other parameters."""
    model = random_model(CFG, seed=23).to(torch.bfloat16)
    batch = make_batch([T], CFG.vocab_size, seed=24)
    whole, r1 = step_grad(model, batch, 56, loss_chunk=WHOLE)
    chunked, r2 = step_grad(model, batch, 56, loss_chunk=9)
    assert torch.isfinite(chunked).all() and rel(chunked, whole) < 2e-2
    assert r2.loss == pytest.approx(r1.loss, rel=1e-3)


def test_evaluate_loss_in_chunks_equals_the_unsegmented_loss():
    model = random_model(CFG, seed=25, dtype=torch.float64)
    batch = make_batch([T, 60], CFG.vocab_size, seed=26)
    with torch.no_grad():
        logits = model(batch["input_ids"])[0]
    ce = float(segment_terms(logits, batch["target_ids"], batch["loss_mask"])[0])
    rows, handle = logit_rows(model)
    report = evaluate_loss(model, batch, 40, loss_chunk=10)
    handle.remove()
    assert report.loss == pytest.approx(ce / float(batch["loss_mask"].sum()), rel=1e-12)
    assert max(rows) <= 10


def test_chunk_columns_cover_every_unmasked_column_once():
    mask = torch.zeros(3, 50)
    mask[0, 3:9] = 1
    mask[2, 31] = 1
    cols = chunk_columns(mask, 21)  # 7 columns of 3 rows
    assert cols == [slice(0, 7), slice(7, 14), slice(28, 35)]
    assert chunk_columns(torch.ones(4, 5), 2) == [slice(i, i + 1) for i in range(5)]  # at least 1 column
    assert chunk_columns(torch.ones(1, 5), 1 << 62) == [slice(0, 5)]  # no buffer of the chunk size
    assert chunk_columns(torch.zeros(2, 5), 4) == []
    with pytest.raises(UserError, match="loss_chunk"):
        bptt_step(random_model(CFG), make_batch([8], CFG.vocab_size), 4, loss_chunk=0)


def test_written_out_logit_gradient_is_autograds():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 7, 13, generator=gen, dtype=torch.float64) * 4
    targets = torch.randint(0, 13, (3, 7), generator=gen)
    mask = torch.rand(3, 7, generator=gen, dtype=torch.float64).round() * 0.75  # weights, some 0
    n, grad_out = mask.sum(), torch.tensor(0.3, dtype=torch.float64)
    x = logits.clone().requires_grad_()
    ce, l2 = segment_terms(x, targets, mask)
    (expected,) = torch.autograd.grad(objective(ce, l2, n), x, grad_out)
    got = logits.clone()
    got[mask == 0] = float("nan")  # masked positions bring in nothing, not even NaN
    ce_sum = objective_grad_(got, targets, mask, grad_out / n)
    assert float(ce_sum) == pytest.approx(float(ce.detach()), rel=1e-13)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-16)


def test_a_head_that_needs_its_output_in_backward_is_refused():
    head = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.Tanh())  # tanh saves its output
    h, targets, mask = torch.randn(1, 5, 4), torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5)
    with pytest.raises(RuntimeError, match="inplace"):
        head_loss_grad(head, h, targets, mask, mask.sum(), torch.ones(()), lambda k, g: None, 2)
