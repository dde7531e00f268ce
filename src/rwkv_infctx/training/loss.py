"""The training objective: token-level cross-entropy plus RWKV's L2Wrap, both summed per piece.

Shape legend: B batch, T time, V vocab_size.

The loss of a micro-batch is the cross-entropy averaged over all its unmasked target tokens
(weighted by tokens, not by segments or rows). A caller sums `ce_sum` over the segments and divides
by the batch's token count N, which it knows before the first segment runs; the division therefore
happens per segment and the sum of the segment objectives is exactly the batch objective.

L2Wrap (RWKV-LM) pushes the largest logit of every position towards 0 by adding
`L2WRAP_FACTOR / N * max_logit` to that logit's gradient. It is written here as the differentiable
term `0.5 * L2WRAP_FACTOR / N * sum(max_logit**2)` over unmasked positions, whose gradient is exactly
that; it is part of the objective that is differentiated, never of the reported loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

L2WRAP_FACTOR = 1e-4


def token_count(loss_mask_BT: Tensor) -> Tensor:
    """N: the number of unmasked target tokens (a float scalar; mask values are 0/1 weights)."""
    return loss_mask_BT.to(torch.float64).sum()


def segment_terms(logits_BTV: Tensor, targets_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    """(ce_sum, l2_sum): masked sums over the positions of one segment, in float32 (float64 if fp64).

    ce_sum: sum of cross-entropy × mask. l2_sum: sum of 0.5 · max_logit² × mask; multiply it by
    L2WRAP_FACTOR / N to get the L2Wrap term.
    """
    dt = torch.float64 if logits_BTV.dtype == torch.float64 else torch.float32
    logits = logits_BTV.to(dt)
    mask = mask_BT.to(dt)
    ce_BT = F.cross_entropy(logits.flatten(0, 1), targets_BT.flatten(), reduction="none").view_as(mask)
    # where() and not a product: a masked position can never bring in inf or NaN
    ce_sum = torch.where(mask != 0, ce_BT * mask, 0.0).sum()
    max_BT = logits.max(dim=-1).values
    l2_sum = torch.where(mask != 0, 0.5 * max_BT.square() * mask, 0.0).sum()
    return ce_sum, l2_sum


def objective(ce_sum: Tensor, l2_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """The differentiated objective of one segment: (ce_sum + L2Wrap) / N; 0 when N = 0."""
    n = n_tokens.clamp_min(1).to(ce_sum.dtype)
    return (ce_sum + L2WRAP_FACTOR * l2_sum) / n
