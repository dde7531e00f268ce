"""`PositionLossCallback`: loss by token position on validation batches, logged during `fit`.

Needs only `pl_module.model` (a model of any family) and the trainer's validation dataloader
(collated batches of `input_ids`, `target_ids`, `loss_mask`); it does not touch the training step. Logs
`val_pos_loss/<start>-<end>` per bucket. Under several processes each rank evaluates its own shard of
the validation data and loggers record rank 0's values (no cross-rank sync: shards may differ in
their buckets, and a sync on differing metric names would hang).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator

import lightning.pytorch as pl
from torch import Tensor

from rwkv_infctx.evaluation.positions import PositionLoss, evaluate


def bounded_batches(batches: Iterable[dict[str, Tensor]], max_tokens: int) -> Iterator[dict[str, Tensor]]:
    """Batches until `max_tokens` positions (padding included) are taken; the last one is cut short."""
    left = max_tokens
    for batch in batches:
        if left <= 0:
            return
        T = batch["input_ids"].shape[1]
        B = batch["input_ids"].shape[0]
        keep = max(1, min(T, left // B))
        yield {k: batch[k][:, :keep] for k in ("input_ids", "target_ids", "loss_mask")}
        left -= keep * B


class PositionLossCallback(pl.Callback):
    """Per-bucket validation loss by token position, logged as `val_pos_loss/<start>-<end>`.

    Args:
        max_tokens: Positions (batch rows × length) evaluated each time, at most.
        segment_len: Tokens per forward call (the state is carried between segments).
        every_n_steps: Also evaluate every this many optimizer steps during training. Empty: only at
            the end of each validation epoch.
    """

    def __init__(self, max_tokens: int = 65536, segment_len: int = 4096, every_n_steps: int | None = None):
        if max_tokens < 1 or segment_len < 1 or (every_n_steps is not None and every_n_steps < 1):
            raise ValueError("PositionLossCallback: max_tokens, segment_len and every_n_steps must be >= 1")
        self.max_tokens = max_tokens
        self.segment_len = segment_len
        self.every_n_steps = every_n_steps
        self._last_step = -1
        self.last_result: PositionLoss | None = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._run(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._run(trainer, pl_module)

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = _val_loader(trainer)
        if loader is None:
            warnings.warn("PositionLossCallback: no validation data (set data.test_split)", stacklevel=2)
            return
        acc = evaluate(pl_module.model, bounded_batches(loader, self.max_tokens), self.segment_len)
        self.last_result = acc
        for row in acc.rows():
            if row.tokens and not math.isnan(row.mean_loss):
                pl_module.log(f"val_pos_loss/{row.start}-{row.end}", row.mean_loss, batch_size=row.tokens)


def _val_loader(trainer: pl.Trainer) -> Iterable[dict[str, Tensor]] | None:
    """The trainer's (first) validation dataloader, or the datamodule's before validation has run."""
    loader = trainer.val_dataloaders
    if loader is None and trainer.datamodule is not None:
        loader = trainer.datamodule.val_dataloader()
    if isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    return loader
