"""Token totals of optimizer steps, known before the steps run (`model.loss_normalization: step_tokens`).

The trainer divides the loss of an optimizer step by the number of learnt target tokens of all its
micro-batches on all ranks. A stored sample of n tokens gives n - 1 scored positions, position t
weighted by the mask of token t + 1 (`data.collator`): its count is the sum of `loss_mask[1:]`, and 0
below 2 tokens (the collator drops such samples). `ctx_len_cutoff` cuts those positions into pieces
without losing or adding one, so it does not change the count; padding entries (`sampler.Padding`)
count 0.

Where a sample lands: the sampler deals global position p of an epoch's order to rank p mod W as its
(p div W)-th sample, so with `batch_size` b and `accumulate_grad_batches` k position p is in batch
(p div W) div b of its rank, and in optimizer step ((p div W) div b) div k, the same on every rank.
Lightning steps after every k batches and after the last batch of an epoch (`epoch_batches`, after
`limit_train_batches`), so the last step of an epoch may hold fewer; batches past `epoch_batches`
never run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    import datasets

READ_ROWS = 10_000


def learnt_tokens(ds: datasets.Dataset) -> np.ndarray:
    """Per sample of a prepared split: the learnt target tokens the loss counts (float64)."""
    parts = [_learnt(table) for table in ds.with_format("arrow").iter(batch_size=READ_ROWS)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


def _learnt(table: pa.Table) -> np.ndarray:
    column = table.column("loss_mask").combine_chunks()
    lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = column.flatten().to_numpy(zero_copy_only=False)  # uint8: summed in int64, never widened
    ends = np.cumsum(lengths)
    counted = lengths >= 2  # tokens 1..n-1 of each row: the first token is only read, never predicted
    out = np.zeros(len(lengths), np.float64)
    if counted.any():
        bounds = np.stack([ends[counted] - lengths[counted] + 1, ends[counted]], axis=1).ravel()
        # reduceat sums values[bounds[2i]:bounds[2i+1]]; the appended 0 keeps the last bound in range
        out[counted] = np.add.reduceat(np.append(values, 0), bounds, dtype=np.int64)[::2]
    return out


@dataclass(frozen=True)
class StepPlan:
    """How an epoch's batches group into optimizer steps (see the module doc)."""

    batch_size: int
    accumulate: int
    epoch_batches: int
    """Batches per rank that run this epoch (Lightning's num_training_batches)."""


def position_weights(order: Sequence[int], counts: np.ndarray, is_padding: Sequence[bool]) -> np.ndarray:
    """The learnt tokens of each global position of an epoch's order (0 where it is padding)."""
    index = np.fromiter((int(i) for i in order), np.int64, len(order))
    padding = np.fromiter(is_padding, bool, len(order))
    return np.where(padding, 0.0, counts[index]) if len(index) else np.zeros(0, np.float64)


def step_totals(weights: np.ndarray, world: int, plan: StepPlan) -> np.ndarray:
    """Per global position (`weights`: its learnt tokens): the learnt tokens of its optimizer step
    over all ranks; 0 for positions in batches that never run."""
    batch = np.arange(len(weights)) // world // plan.batch_size
    runs = batch < plan.epoch_batches
    step = batch // plan.accumulate
    totals = np.bincount(step[runs], weights=weights[runs], minlength=int(step.max(initial=-1)) + 1)
    return np.where(runs, totals[step], 0.0)
