"""Segmented BPTT: exact against unsegmented autograd, constant-memory bookkeeping, masks, cutoff."""

from __future__ import annotations

import math

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.loss import L2WRAP_FACTOR, objective, segment_terms
from rwkv_infctx.training.segments import Segment, bptt_step, evaluate_loss, plan_segments
from tests.conftest import family_config, random_family_model

from .batches import flat_grad, make_batch, plain_objective, rel

T = 112
VOCAB = 97


def tiny(family: str, seed: int, dtype=torch.float32, **options):
    """The family's tiny random model (tests/conftest.py)."""
    return random_family_model(family_config(family, VOCAB, **options), seed, dtype)


def segmented_grad(model, batch, ctx_len, **kw):
    proxy, report = bptt_step(model, batch, ctx_len, **kw)
    proxy.backward()
    return flat_grad(model), report


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-10)])
def test_gradients_match_unsegmented_bptt(family, dtype, tol):
    model = tiny(family, 1, dtype)
    batch = make_batch([T, T - 37], VOCAB, seed=2)
    ref_obj = plain_objective(model, batch)
    ref_obj.backward()
    ref = flat_grad(model)
    with torch.no_grad():
        logits = model(batch["input_ids"])[0]
        ref_loss = float(segment_terms(logits, batch["target_ids"], batch["loss_mask"])[0]) / (2 * T - 37)
    for ctx_len in (T, T // 4, round(T / 7)):
        grad, report = segmented_grad(model, batch, ctx_len)
        assert rel(grad, ref) <= tol, (dtype, ctx_len, rel(grad, ref))
        assert report.loss == pytest.approx(ref_loss, rel=1e-5)
        assert report.n_segments == math.ceil(T / ctx_len)
    truncated, _ = segmented_grad(model, batch, T // 4, bptt="truncated")
    assert rel(truncated, ref) > 1e-3  # the comparison can fail: dropping the state gradient shows


def test_batch_with_variable_lengths_equals_per_sample_computation(family):
    model = tiny(family, 3, torch.float64)
    lengths = [T, 45, 80]
    batch = make_batch(lengths, VOCAB, seed=4)
    grad, report = segmented_grad(model, batch, 16)
    total = sum(lengths)
    expected = torch.zeros_like(grad)
    ce = 0.0
    for b, n in enumerate(lengths):  # each sample alone, unpadded, weighted by its share of tokens
        one = {k: v[b : b + 1, :n] for k, v in batch.items() if k != "lengths"}
        g, r = segmented_grad(model, one, 16)
        expected += g * n / total
        ce += r.ce_sum
    assert rel(grad, expected) < 1e-10
    assert report.loss == pytest.approx(ce / total, rel=1e-12)


def test_masked_segments_give_zero_not_nan(family):
    model = tiny(family, 5, torch.float64)
    batch = make_batch([T, T], VOCAB, seed=6)
    batch["loss_mask"][:, 20:60] = 0  # whole segments without a learnt token, inside the sample
    batch["loss_mask"][:, 90:] = 0  # and at its end
    grad, report = segmented_grad(model, batch, 16)
    plain_objective(model, batch).backward()
    assert torch.isfinite(grad).all() and rel(grad, flat_grad(model)) < 1e-10
    assert report.n_tokens == 2 * (20 + 30)

    batch["loss_mask"].zero_()  # nothing learnt at all: loss 0, gradients 0
    grad, report = segmented_grad(model, batch, 16)
    assert report.loss == 0.0 and torch.count_nonzero(grad) == 0
    assert evaluate_loss(model, batch, 16).loss == 0.0


def test_ctx_len_cutoff_learns_pieces_as_separate_samples(family):
    model = tiny(family, 7, torch.float64)
    batch = make_batch([T, 70], VOCAB, seed=8)
    cutoff = 48
    grad, report = segmented_grad(model, batch, 20, ctx_len_cutoff=cutoff)
    pieces = {k: torch.cat(v.split(cutoff, dim=1)[:-1], dim=0) for k, v in batch.items() if k != "lengths"}
    last = {k: v[:, 2 * cutoff :] for k, v in batch.items() if k != "lengths"}
    n = float(batch["loss_mask"].sum())
    # every piece as its own row, fresh state, plain autograd; the same token-weighted normalisation
    obj = plain_objective(model, pieces) * pieces["loss_mask"].sum() / n
    obj = obj + plain_objective(model, last) * last["loss_mask"].sum() / n
    obj.backward()
    assert rel(grad, flat_grad(model)) < 1e-10
    assert report.n_segments == len(plan_segments(T, 20, cutoff))


def test_plan_segments_cuts_pieces_then_segments():
    assert plan_segments(10, 4) == [Segment(0, 4, "fresh"), Segment(4, 8, "carry"), Segment(8, 10, "carry")]
    assert [s.entry for s in plan_segments(10, 4, bptt="truncated")] == ["fresh", "detach", "detach"]
    assert plan_segments(10, 4, ctx_len_cutoff=6) == [
        Segment(0, 4, "fresh"),
        Segment(4, 6, "carry"),
        Segment(6, 10, "fresh"),
    ]
    for bad in ({"ctx_len": 0}, {"ctx_len": 4, "ctx_len_cutoff": 0}, {"ctx_len": 4, "bptt": "half"}):
        with pytest.raises(UserError):
            plan_segments(10, **bad)


def test_l2wrap_gradient_is_rwkv_lm_formula():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5), generator=gen)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    n = mask.sum()
    ce, l2 = segment_terms(logits, targets, mask)
    (g_all,) = torch.autograd.grad(objective(ce, l2, n), logits)
    (g_ce,) = torch.autograd.grad(segment_terms(logits, targets, mask)[0] / n, logits)
    maxx, ids = logits.detach().max(-1, keepdim=True)
    expected = torch.zeros_like(logits).scatter_(-1, ids, maxx * L2WRAP_FACTOR / n) * mask[..., None]
    assert torch.allclose(g_all - g_ce, expected, atol=1e-15)


def test_proxy_scale_scales_gradients_and_grad_cp_changes_nothing(family):
    model = tiny(family, 9, torch.float64)
    batch = make_batch([T], VOCAB, seed=10)
    ref, _ = segmented_grad(model, batch, 24)
    proxy, _ = bptt_step(model, batch, 24)
    (proxy * 0.25).backward()
    assert rel(flat_grad(model), 0.25 * ref) < 1e-12
    cp, _ = segmented_grad(model, batch, 24, grad_cp=True)
    assert rel(cp, ref) < 1e-12


def test_dropout_is_replayed_identically_in_the_recompute(family):
    """With dropout the recompute replays the state pass's RNG: runs are reproducible and finite."""
    model = tiny(family, 11, torch.float64, dropout=0.3)
    batch = make_batch([64], VOCAB, seed=12)
    torch.manual_seed(123)
    g1, r1 = segmented_grad(model, batch, 16)
    torch.manual_seed(123)
    g2, r2 = segmented_grad(model, batch, 16)
    assert torch.equal(g1, g2) and r1.loss == r2.loss and torch.isfinite(g1).all()
    model.eval()
    g3, _ = segmented_grad(model, batch, 16)
    assert rel(g3, g1) > 1e-3  # dropout was active in training mode


def test_recompute_with_dropout_reproduces_the_saved_boundary_states(family):
    """The backward's recompute of segment i must end in exactly the state the forward saved for i+1."""
    from rwkv_infctx.training.segments import StepReport, _SegmentedRun, unpack_batch

    model = tiny(family, 13, dropout=0.3)
    inputs, targets, mask = unpack_batch(make_batch([64], VOCAB, seed=14))
    run = _SegmentedRun(model, inputs, targets, mask, plan_segments(64, 16), False, StepReport(64, 4, 64))
    with torch.no_grad():
        run.state_pass()
        for i, seg in enumerate(run.segments[:-1]):
            with run._replay(i):
                _, out = model(inputs[:, seg.start : seg.end], run.in_states[i], compute_logits=True)
            for a, b in zip(out.tensors(), run.in_states[i + 1].tensors(), strict=True):
                assert torch.equal(a, b)
