"""bptt: truncated runs each segment once, in forward order, without the state-only pass.

The oracle is plain autograd segment by segment: each segment's objective (`segment_terms`,
`objective` with the batch's token count) from the previous segment's detached output state, a
fresh state at each piece's start, the gradients summed.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import Tensor, nn

from rwkv_infctx.training.loss import objective, segment_terms, token_count
from rwkv_infctx.training.segments import bptt_step, plan_segments
from tests.conftest import family_config, random_family_model

from .batches import flat_grad, make_batch, rel

T = 112
VOCAB = 97


def tiny(family: str, seed: int, dtype=torch.float32, **options) -> nn.Module:
    """The family's tiny random model (tests/conftest.py)."""
    return random_family_model(family_config(family, VOCAB, **options), seed, dtype)


def oracle(
    model: nn.Module,
    batch: dict[str, Tensor],
    ctx_len: int,
    ctx_len_cutoff: int | None = None,
    n_norm: Tensor | None = None,
) -> tuple[Tensor, float]:
    """(flat gradient, loss) of truncated BPTT by plain autograd, one segment at a time."""
    inputs, targets, mask = batch["input_ids"], batch["target_ids"], batch["loss_mask"]
    n = token_count(mask) if n_norm is None else n_norm
    ce_total = 0.0
    state = None
    for seg in plan_segments(inputs.shape[1], ctx_len, ctx_len_cutoff, "truncated"):
        if seg.entry == "fresh":
            state = None  # the model's fresh state
        cols = slice(seg.start, seg.end)
        logits, state = model(inputs[:, cols], state)
        state = state.map(lambda t, f: t.detach())
        ce, l2 = segment_terms(logits, targets[:, cols], mask[:, cols])
        objective(ce, l2, n).backward()
        ce_total += float(ce.detach())
    return flat_grad(model), ce_total / float(n) if float(n) > 0 else 0.0


def truncated(model: nn.Module, batch: dict[str, Tensor], ctx_len: int, scale: float = 1.0, **kw):
    proxy, report = bptt_step(model, batch, ctx_len, bptt="truncated", **kw)
    (proxy * scale).backward()
    return flat_grad(model), report


def masked_batch() -> dict[str, Tensor]:
    """Two rows of different lengths; row 0 has no learnt token in columns 30..70 either."""
    batch = make_batch([T, 70], VOCAB, seed=2)
    batch["loss_mask"][0, 30:70] = 0
    batch["target_ids"][0, 30:70] = 0
    return batch


CASES = {
    "several-segments": ([T], 16, None, False),
    "uneven-last": ([T], 24, None, False),  # 4 × 24 + 16
    "B2-masks": (None, 20, None, False),
    "cutoff-pieces": ([T, 70], 20, 48, False),  # pieces 48, 48, 16; 3 segments in each full piece
    "grad-cp": (None, 24, None, True),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_truncated_equals_per_segment_autograd(family, case):
    lengths, ctx_len, cutoff, grad_cp = case
    model = tiny(family, 1, torch.float64)
    batch = masked_batch() if lengths is None else make_batch(lengths, VOCAB, seed=3)
    ref, ref_loss = oracle(model, batch, ctx_len, cutoff)
    grad, report = truncated(model, batch, ctx_len, ctx_len_cutoff=cutoff, grad_cp=grad_cp)
    assert rel(grad, ref) < 1e-12, rel(grad, ref)
    assert report.loss == pytest.approx(ref_loss, rel=1e-12)
    assert report.n_segments == len(plan_segments(T, ctx_len, cutoff))
    full, _ = bptt_step(model, batch, ctx_len, cutoff, "full")
    full.backward()
    assert rel(flat_grad(model), ref) > 1e-3  # the comparison can fail: full mode differs


def test_proxy_scale_and_n_norm(family):
    """Gradient accumulation scales the proxy; data parallelism passes the global token count."""
    model = tiny(family, 4, torch.float64)
    batch = masked_batch()
    n_norm = torch.tensor(500.0)
    ref, _ = oracle(model, batch, 24, n_norm=n_norm)
    grad, report = truncated(model, batch, 24, scale=0.25, n_norm=n_norm)
    assert rel(grad, 0.25 * ref) < 1e-12
    assert report.n_tokens == float(token_count(batch["loss_mask"]))  # the loss stays per local token


def count_hidden_calls(model: nn.Module) -> Counter:
    """Wraps model.hidden; the counter keys are (first column, columns, state_only). The tokens
    are a column slice of the batch's (B, T) input_ids, so row 0's storage offset is the column."""
    calls: Counter = Counter()
    hidden = model.hidden

    def counted(tokens_BT, state=None, state_only=False, grad_cp=False):
        calls[(tokens_BT.storage_offset(), tokens_BT.shape[1], state_only)] += 1
        return hidden(tokens_BT, state, state_only=state_only, grad_cp=grad_cp)

    model.hidden = counted
    return calls


def test_no_state_pass_and_one_run_per_segment(family):
    model = tiny(family, 5, torch.float64)
    batch = make_batch([T], VOCAB, seed=6)
    segments = plan_segments(T, 16)
    calls = count_hidden_calls(model)
    truncated(model, batch, 16)
    assert sum(n for (_, _, state_only), n in calls.items() if state_only) == 0
    expected = {(s.start, s.end - s.start, False): 1 for s in segments}
    assert dict(calls) == expected

    calls.clear()  # full mode, for contrast: the state pass, then every segment again
    proxy, _ = bptt_step(model, batch, 16)
    proxy.backward()
    assert sum(n for (_, _, state_only), n in calls.items() if state_only) == len(segments) - 1
    assert sum(calls.values()) == 2 * len(segments) - 1


def test_masked_segments_run_for_the_state_and_idle_tails_not_at_all(family):
    model = tiny(family, 7, torch.float64)
    batch = make_batch([T], VOCAB, seed=8)
    batch["loss_mask"][:, 16:48] = 0  # segments 1 and 2: no learnt token, their state is needed
    batch["loss_mask"][:, 80:] = 0  # segments 5 and 6: an idle tail
    ref, ref_loss = oracle(model, batch, 16)
    calls = count_hidden_calls(model)
    grad, report = truncated(model, batch, 16)
    assert dict(calls) == {
        (0, 16, False): 1,
        (16, 16, True): 1,
        (32, 16, True): 1,
        (48, 16, False): 1,
        (64, 16, False): 1,
    }
    assert rel(grad, ref) < 1e-12 and report.loss == pytest.approx(ref_loss, rel=1e-12)

    batch["loss_mask"].zero_()  # nothing learnt: loss 0, gradients 0, nothing run
    calls.clear()
    grad, report = truncated(model, batch, 16)
    assert report.loss == 0.0 and torch.count_nonzero(grad) == 0 and not calls


@pytest.mark.parametrize("grad_cp", [False, True], ids=["plain", "grad-cp"])
def test_dropout_draws_from_the_forward_rng_state_and_advance_it(family, grad_cp):
    """The masks are drawn in the backward, from the RNG state of bptt_step's call: exactly the
    draws of the per-segment oracle from that state, leaving the RNG where the oracle leaves it."""
    model = tiny(family, 9, torch.float64, dropout=0.3)
    batch = make_batch([64, 50], VOCAB, seed=10)
    torch.manual_seed(123)
    ref, ref_loss = oracle(model, batch, 16)
    rng_after_oracle = torch.get_rng_state()

    torch.manual_seed(123)
    proxy, report = bptt_step(model, batch, 16, bptt="truncated", grad_cp=grad_cp)
    torch.rand(1000)  # draws between forward and backward do not change the step's masks
    proxy.backward()
    assert rel(flat_grad(model), ref) < 1e-12 and report.loss == pytest.approx(ref_loss, rel=1e-12)
    assert torch.equal(torch.get_rng_state(), rng_after_oracle)

    next_step, _ = truncated(model, batch, 16, grad_cp=grad_cp)  # fresh masks: a different gradient
    assert rel(next_step, ref) > 1e-3 and torch.isfinite(next_step).all()


def test_autocast_is_replayed_in_the_backward(family):
    """bf16 autocast around bptt_step holds in the segments run by the backward: the oracle under the
    same autocast is close (tolerances of test_precision.py), fp32 is measurably further."""
    model = tiny(family, 11)
    batch = make_batch([80, 43], VOCAB, seed=12)
    fp32, _ = oracle(model, batch, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, _ = oracle(model, batch, 16)
        proxy, _ = bptt_step(model, batch, 16, bptt="truncated")
    proxy.backward()  # outside autocast, as Lightning calls it
    grad = flat_grad(model)
    assert rel(grad, ref) < 2e-2 and 1e-4 < rel(grad, fp32) < 5e-2, (rel(grad, ref), rel(grad, fp32))


def test_parameter_hooks_see_one_gradient_per_step(family):
    """The segments' gradients are summed through the aliases: a real parameter's AccumulateGrad
    (where DDP and DeepSpeed hook in) runs once per step, not once per segment."""
    model = tiny(family, 13, torch.float64)
    batch = make_batch([T], VOCAB, seed=14)
    seen: Counter = Counter()
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda p, name=name: seen.update([name]))
    truncated(model, batch, 16)
    assert set(seen.values()) == {1} and len(seen) == len(list(model.parameters()))
