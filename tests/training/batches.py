"""Synthetic batches in the data module's format, and the unsegmented reference computation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rwkv_infctx.training.loss import objective, segment_terms, token_count


def make_batch(lengths: list[int], vocab: int, seed: int = 0, T: int | None = None) -> dict[str, Tensor]:
    """input_ids/target_ids (B, T) padded with 0, loss_mask 1 on each row's first `length` positions."""
    gen = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    B = len(lengths)
    ids = torch.randint(0, vocab, (B, T + 1), generator=gen)
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
        ids[b, n + 1 :] = 0
    return {
        "input_ids": ids[:, :-1].contiguous(),
        "target_ids": ids[:, 1:].contiguous() * (mask > 0),
        "loss_mask": mask,
        "lengths": torch.tensor(lengths),
    }


def plain_objective(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The objective by ordinary autograd over the whole unsegmented batch."""
    logits, _ = model(batch["input_ids"])
    ce, l2 = segment_terms(logits, batch["target_ids"], batch["loss_mask"])
    return objective(ce, l2, token_count(batch["loss_mask"]))


def flat_grad(model: nn.Module) -> Tensor:
    """All parameter gradients as one vector (zeros where None); clears them."""
    out = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
    )
    model.zero_grad(set_to_none=True)
    return out


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
