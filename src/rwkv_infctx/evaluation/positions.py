"""Loss by token position: log-spaced buckets, per-token losses segment by segment, accumulation.

Shape legend: B batch, T time (whole sample), S segment, V vocab_size.

Position p (1-based) is the p-th prediction of a sample: the model has read tokens 0..p-1 and is
scored on token p. Buckets are half-open, [1, 128), [128, 256), [256, 512), ..., doubling until one
holds the largest position seen. Masked targets (loss_mask 0) are not counted.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rwkv_infctx.model import RWKVModel

FIRST_EDGE = 128
"""End of the first bucket: positions 1..127 are pooled (too few tokens per octave below this)."""
LOSS_CHUNK = 1024
"""Positions per cross-entropy call: bounds the float32 log-softmax copy of a segment's logits."""


def bucket_edges(max_position: int) -> list[int]:
    """Edges [1, 128, 256, ..., E] with E > max_position; bucket i is [edges[i], edges[i + 1])."""
    if max_position < 1:
        raise ValueError(f"max_position must be at least 1, got {max_position}")
    edges = [1, FIRST_EDGE]
    while edges[-1] <= max_position:
        edges.append(edges[-1] * 2)
    return edges


def bucket_index(positions: Tensor) -> Tensor:
    """Bucket of each position (int64, same shape): 0 for 1..127, k for [64·2^k, 128·2^k)."""
    edges = torch.tensor(bucket_edges(int(positions.max())), dtype=torch.int64, device=positions.device)
    return torch.bucketize(positions.to(torch.int64), edges, right=True) - 1


@dataclass(frozen=True)
class BucketRow:
    """One bucket's result: positions [start, end), unmasked tokens, mean loss (nats), perplexity."""

    start: int
    end: int
    tokens: int
    mean_loss: float
    perplexity: float


@dataclass
class PositionLoss:
    """Running sums of loss (float64) and token counts per bucket; `rows()` gives the means."""

    loss_sum: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    max_position: int = 0

    def add(self, positions: Tensor, losses: Tensor) -> None:
        """Add per-token losses (nats) at 1-based positions (any matching shapes, masked ones removed)."""
        if positions.numel() == 0:
            return
        index = bucket_index(positions).flatten()
        n = int(index.max()) + 1
        sums = torch.zeros(n, dtype=torch.float64, device=losses.device)
        sums.index_add_(0, index, losses.flatten().to(torch.float64))
        counts = torch.bincount(index, minlength=n)
        grow = n - len(self.tokens)
        if grow > 0:
            self.loss_sum += [0.0] * grow
            self.tokens += [0] * grow
        for i, (s, c) in enumerate(zip(sums.tolist(), counts.tolist(), strict=True)):
            self.loss_sum[i] += s
            self.tokens[i] += c
        self.max_position = max(self.max_position, int(positions.max()))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)

    def rows(self) -> list[BucketRow]:
        """One row per bucket up to the largest position; empty buckets have NaN loss."""
        if self.max_position == 0:
            return []
        edges = bucket_edges(self.max_position)
        out = []
        for i, (start, end) in enumerate(itertools.pairwise(edges)):
            n = self.tokens[i] if i < len(self.tokens) else 0
            mean = self.loss_sum[i] / n if n else math.nan
            out.append(BucketRow(start, end, n, mean, _perplexity(mean)))
        return out


def _perplexity(mean_loss: float) -> float:
    if math.isnan(mean_loss):
        return math.nan
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def token_losses(logits_BSV: Tensor, targets_BS: Tensor) -> Tensor:
    """Cross-entropy (nats, float32) of every position, (B, S); computed in chunks of LOSS_CHUNK."""
    out = []
    for i in range(0, logits_BSV.shape[1], LOSS_CHUNK):
        logits = logits_BSV[:, i : i + LOSS_CHUNK].float()
        targets = targets_BS[:, i : i + LOSS_CHUNK]
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
        out.append(ce.view_as(targets))
    return torch.cat(out, dim=1)


@torch.no_grad()
def segment_losses(
    model: RWKVModel, input_ids_BT: Tensor, target_ids_BT: Tensor, segment_len: int
) -> Iterator[tuple[int, Tensor]]:
    """Yield (offset, losses (B, S)) for consecutive segments, carrying the state between them.

    Column t of the batch reads `input_ids[:, t]` and is scored on `target_ids[:, t]`, so its position
    is t + 1. Memory depends on B · segment_len · V, not on T.
    """
    if segment_len < 1:
        raise ValueError(f"segment_len must be at least 1, got {segment_len}")
    device = next(model.parameters()).device
    state = None
    for start in range(0, input_ids_BT.shape[1], segment_len):
        inputs = input_ids_BT[:, start : start + segment_len].to(device)
        targets = target_ids_BT[:, start : start + segment_len].to(device)
        logits, state = model(inputs, state)
        yield start, token_losses(logits, targets)


@torch.no_grad()
def accumulate_batch(model: RWKVModel, batch: dict[str, Tensor], acc: PositionLoss, segment_len: int) -> None:
    """Add one collated batch (`input_ids`, `target_ids`, `loss_mask`, all (B, T)) to `acc`."""
    mask_BT = batch["loss_mask"]
    for start, loss_BS in segment_losses(model, batch["input_ids"], batch["target_ids"], segment_len):
        S = loss_BS.shape[1]
        keep_BS = mask_BT[:, start : start + S].to(loss_BS.device) > 0
        positions_S = torch.arange(start + 1, start + S + 1, device=loss_BS.device)
        positions_BS = positions_S.expand_as(loss_BS)
        acc.add(positions_BS[keep_BS], loss_BS[keep_BS])


def evaluate(model: RWKVModel, batches: Iterable[dict[str, Tensor]], segment_len: int = 4096) -> PositionLoss:
    """Loss by position of `model` over collated batches (the model is put in eval mode)."""
    was_training = model.training
    model.eval()
    acc = PositionLoss()
    try:
        for batch in batches:
            accumulate_batch(model, batch, acc, segment_len)
    finally:
        model.train(was_training)
    return acc
