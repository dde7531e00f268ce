"""`ResumableSampler`: the training order, sharded over ranks, that resumes mid-epoch exactly.

Per epoch the order is a permutation of the samples drawn from (seed, epoch) alone (or 0..n-1 when
not shuffling). It is padded to a multiple of the world size and dealt out rank by rank, as
`DistributedSampler` does: rank r gets positions r, r + W, r + 2W, ... So

- every rank yields the same number of samples, hence runs the same number of batches;
- every sample is learnt exactly once per epoch over all ranks: the padding entries are copies
  marked `Padding`; `MarkedDataset` flags them and the collator zeroes their loss mask, so they are
  computed (keeping the ranks in step) but learnt by nobody;
- the cursor (samples consumed so far this epoch, all ranks together) is in `state_dict()`;
  `load_state_dict()` makes the next `__iter__` of that epoch start right after it;
- with a step plan (`set_step_plan`), each index it yields is a `SampleKey` carrying the learnt
  tokens of its optimizer step over all ranks (`data.step_tokens`), which `MarkedDataset` and the
  collator hand on to the trainer as the batch's `step_tokens`.

It subclasses `DistributedSampler` so that Lightning's `use_distributed_sampler` leaves it alone.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sized
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from rwkv_infctx.data.step_tokens import StepPlan, position_weights, step_totals
from rwkv_infctx.errors import UserError


class Padding(int):
    """A sample index repeated only to even out the ranks: its loss is masked (learnt by nobody)."""


class SampleKey(int):
    """A sample index as `ResumableSampler` yields it with a step plan: whether it is padding, and the
    learnt tokens of its optimizer step over all ranks (`step_tokens`)."""

    padding: bool = False
    step_tokens: float | None = None

    @classmethod
    def of(cls, index: int, step_tokens: float) -> SampleKey:
        key = cls(index)
        key.padding, key.step_tokens = isinstance(index, Padding), float(step_tokens)
        return key


def rank_and_world(trainer: Any = None) -> tuple[int, int]:
    """(global rank, world size): from a Lightning trainer, else torch.distributed, else (0, 1)."""
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableSampler(DistributedSampler):
    """Deterministic, rank-sharded sample order with a resumable cursor (see the module doc).

    Args:
        num_samples_total: Samples in the dataset (n).
        shuffle: Permute the order each epoch (from seed and epoch); else 0..n-1.
        seed: Seed of the permutation; must be the same on every rank.
        rank: This process's global rank.
        world_size: Number of ranks.
    """

    def __init__(
        self, num_samples_total: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} of world size {world_size}")
        # DistributedSampler's own fields, for code that reads them (no torch.distributed call here)
        self.dataset = range(num_samples_total)
        self.num_replicas, self.rank = world_size, rank
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0
        self.drop_last = False
        self.n = num_samples_total
        self.num_samples = -(-num_samples_total // world_size)  # per rank, padding included
        self.total_size = self.num_samples * world_size
        self.cursor = 0
        """Global position (all ranks) of the next sample of `epoch`, set by load_state_dict."""
        self._resume_epoch: int | None = None
        self._counts: np.ndarray | None = None
        self._plan: Callable[[], StepPlan] | None = None

    def set_step_plan(self, learnt: np.ndarray, plan: Callable[[], StepPlan]) -> None:
        """Yield `SampleKey`s with their step's token total: `learnt` per sample (`step_tokens.
        learnt_tokens`), `plan()` read when an epoch's iteration starts (Lightning knows its batch
        count by then)."""
        if len(learnt) != self.n:
            raise ValueError(f"{len(learnt)} token counts for {self.n} samples")
        self._counts, self._plan = learnt, plan

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start; a restored cursor applies to its epoch only."""
        self.epoch = epoch
        if self._resume_epoch != epoch:
            self.cursor = 0

    def order(self, epoch: int) -> list[int]:
        """The global order of `epoch` with its padding: `total_size` entries."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            base = torch.randperm(self.n, generator=g).tolist()
        else:
            base = list(range(self.n))
        pad = self.total_size - self.n
        return base + [Padding(i) for i in (base * (pad // max(self.n, 1) + 1))[:pad]]

    def __iter__(self) -> Iterator[int]:
        # a generator: the epoch and cursor are read at the first next(), after set_epoch
        order = self.order(self.epoch)
        start = self.cursor if self._resume_epoch == self.epoch else 0
        self._resume_epoch = None
        mine = range(start + self.rank, len(order), self.num_replicas)
        if self._plan is None or self._counts is None:
            yield from (order[p] for p in mine)
            return
        weights = position_weights(order, self._counts, [isinstance(i, Padding) for i in order])
        totals = step_totals(weights, self.num_replicas, self._plan())
        yield from (SampleKey.of(order[p], totals[p]) for p in mine)

    def __len__(self) -> int:
        """Samples per rank in a whole epoch (a resumed epoch yields only the rest)."""
        return self.num_samples

    def state_dict(self, consumed_per_rank: int = 0) -> dict[str, int | bool]:
        """The cursor after each rank consumed `consumed_per_rank` samples of the current epoch."""
        return {
            "epoch": self.epoch,
            "cursor": min(consumed_per_rank * self.num_replicas, self.total_size),
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_samples_total": self.n,
            "world_size": self.num_replicas,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the order's seed, and where the saved epoch continues.

        Raises `UserError` if the data changed, or if the world size changed mid-epoch (the rest of
        that epoch would be dealt out differently).
        """
        if state["num_samples_total"] != self.n:
            raise UserError(
                f"checkpoint: its data had {state['num_samples_total']} training samples, data_path now "
                f"has {self.n} (expected the data the checkpoint was trained on)"
            )
        if state["cursor"] and state["world_size"] != self.num_replicas:
            raise UserError(
                f"checkpoint: written mid-epoch by {state['world_size']} ranks, resumed with "
                f"{self.num_replicas} (expected the same number, or an end-of-epoch checkpoint)"
            )
        if state["shuffle"] != self.shuffle:
            warnings.warn("data.shuffle differs from the checkpoint's; using the new value", stacklevel=2)
        self.seed = int(state["seed"])
        self.epoch = self._resume_epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])


class MarkedDataset(Dataset):
    """Rows of `dataset` with `sample_index` and `padding` added (for the collator and the NaN guard),
    and `step_tokens` when the key is a `SampleKey`."""

    def __init__(self, dataset: Sized) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int) -> dict[str, Any]:
        row = dict(self.dataset[int(key)])  # type: ignore[index]
        row["sample_index"] = int(key)
        row["padding"] = isinstance(key, Padding) or bool(getattr(key, "padding", False))
        if getattr(key, "step_tokens", None) is not None:
            row["step_tokens"] = key.step_tokens
        return row
