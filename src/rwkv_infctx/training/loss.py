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

The head's logits (B, T, V) of a whole segment would dominate its memory (V is ~50k), so
`head_loss_grad` and `head_loss_value` compute them from the final hidden states in chunks of about
`LOSS_CHUNK` positions: only one chunk's logits, and their gradient, exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rwkv_infctx.errors import UserError

L2WRAP_FACTOR = 1e-4
LOSS_CHUNK = 1024
"""Default number of positions (rows × columns) whose logits exist at a time."""


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


def chunk_columns(mask_BT: Tensor, chunk: int) -> list[slice]:
    """Column slices of about `chunk` positions each (B rows × at least one column), leaving out
    those without an unmasked token: their logits add nothing to the loss or its gradient."""
    if chunk <= 0:
        raise ValueError(f"loss chunk: {chunk} (expected a positive number of positions)")
    B, T = mask_BT.shape
    width = min(max(1, chunk // max(B, 1)), max(T, 1))
    n = -(-T // width)
    live = torch.zeros(n * width, dtype=torch.bool, device=mask_BT.device)
    live[:T] = (mask_BT != 0).any(0)
    alive = live.view(n, width).any(1).tolist()
    return [slice(i * width, min(T, (i + 1) * width)) for i in range(n) if alive[i]]


def check_loss_chunk(loss_chunk: int) -> None:
    """UserError unless `loss_chunk` is a positive number of positions."""
    if not isinstance(loss_chunk, int) or loss_chunk <= 0:
        raise UserError(f"model.loss_chunk: {loss_chunk!r} (expected a positive number of positions)")


def head_loss_grad(
    head: nn.Module,
    h_BTC: Tensor,
    targets_BT: Tensor,
    mask_BT: Tensor,
    n_tokens: Tensor,
    grad_out: Tensor,
    param_grad: Callable[[int, Tensor], None],
    chunk: int = LOSS_CHUNK,
) -> tuple[Tensor, Tensor]:
    """The objective of hidden states under `head`, differentiated eagerly, chunk by chunk.

    Returns (dh_BTC, ce_sum): the objective's gradient (times `grad_out`) w.r.t. h, and ce_sum as in
    `segment_terms`, detached. Each chunk's gradient of the k-th head parameter that requires grad
    is handed to `param_grad(k, g)` (the caller sums them: `bptt_step`). Only one chunk's logits
    exist at a time.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    h = h_BTC.detach()
    dh = torch.zeros_like(h)
    ce_sum = torch.zeros((), device=h.device, dtype=torch.float64)
    for cols in chunk_columns(mask_BT, chunk):
        g_h, g_params, ce = _chunk_grad(
            head, params, h[:, cols], targets_BT[:, cols], mask_BT[:, cols], n_tokens, grad_out
        )
        dh[:, cols] = g_h
        ce_sum += ce
        for j, g in enumerate(g_params):
            if g is not None:
                param_grad(j, g)
        g_params = g = None  # this chunk's head gradients are freed before the next chunk's exist
    return dh, ce_sum


def _chunk_grad(
    head: nn.Module,
    params: list[Tensor],
    h_BtC: Tensor,
    targets_Bt: Tensor,
    mask_Bt: Tensor,
    n_tokens: Tensor,
    grad_out: Tensor,
) -> tuple[Tensor, tuple[Tensor | None, ...], Tensor]:
    # a function of its own: the chunk's logits and their graph are freed on return
    h = h_BtC.detach().requires_grad_()
    logits = head(h)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    scale = grad_out.to(dt).reshape(()) / n_tokens.clamp_min(1).to(dt)
    # the logits become their own gradient; were they needed by the head's backward, autograd
    # would refuse (the in-place write bumps their version counter)
    ce = objective_grad_(logits.detach(), targets_Bt, mask_Bt, scale)
    g_h, *g_params = torch.autograd.grad(logits, [h, *params], logits.detach(), allow_unused=True)
    return g_h, tuple(g_params), ce


@torch.no_grad()
def objective_grad_(logits_BtV: Tensor, targets_Bt: Tensor, mask_Bt: Tensor, scale: Tensor) -> Tensor:
    """ce_sum (as `segment_terms`); the logits are overwritten with scale × d(ce_sum + L2WRAP_FACTOR ·
    l2_sum)/d(logits), that is scale · mask · (softmax − onehot(target) + L2WRAP_FACTOR · max ·
    onehot(argmax)), computed in place (float32 for half-precision logits, float64 for float64).

    The gradient of `objective` (times N · scale) written out, so that a chunk costs one (B, t, V)
    buffer (two for half precision) instead of the log-softmax and gradient buffers of autograd.
    """
    V = logits_BtV.shape[-1]
    dt = torch.float64 if logits_BtV.dtype == torch.float64 else torch.float32
    z = logits_BtV.reshape(-1, V).to(dt)  # the logits themselves unless half precision
    rows = torch.arange(z.shape[0], device=z.device)
    targets = targets_Bt.reshape(-1)
    mask = mask_Bt.reshape(-1).to(dt)
    live = mask != 0
    z_target = z[rows, targets]
    z_max, argmax = z.max(dim=-1)
    z.sub_(z_max[:, None]).exp_()
    total = z.sum(dim=-1)
    z.div_(total[:, None])  # softmax
    ce = z_max + total.log() - z_target
    # where() and not a product: a masked position can never bring in inf or NaN
    ce_sum = torch.where(live, ce * mask, 0.0).sum()
    z[rows, targets] -= 1.0
    z[rows, argmax] += L2WRAP_FACTOR * z_max
    z.mul_(torch.where(live, mask * scale, 0.0)[:, None]).masked_fill_(~live[:, None], 0.0)
    if z.data_ptr() != logits_BtV.data_ptr():
        logits_BtV.copy_(z.view(logits_BtV.shape))
    return ce_sum


@torch.no_grad()
def head_loss_value(
    head: nn.Module, h_BTC: Tensor, targets_BT: Tensor, mask_BT: Tensor, chunk: int = LOSS_CHUNK
) -> Tensor:
    """ce_sum of hidden states under `head` (as `segment_terms`), one chunk's logits at a time."""
    ce_sum = torch.zeros((), device=h_BTC.device, dtype=torch.float64)
    for cols in chunk_columns(mask_BT, chunk):
        ce_sum += segment_terms(head(h_BTC[:, cols]), targets_BT[:, cols], mask_BT[:, cols])[0]
    return ce_sum
