"""Samples of any length to one padded batch of inputs, targets and loss mask.

A sample of n tokens gives n - 1 positions: position t reads `input_ids[t]` and is scored on
predicting `target_ids[t]` (the sample's token t + 1), weighted by `loss_mask[t]` (the stored mask of
that target token). Shorter samples are padded with 0 and mask 0 up to T = longest sample - 1; there
is no cap at ctx_len (the trainer cuts T into segments).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch


def collate(samples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Batch samples with `input_ids` (and optionally `loss_mask`) into tensors.

    Returns `input_ids` and `target_ids` (B, T) int64, `loss_mask` (B, T) float32 and `lengths` (B,)
    int64, the number of valid positions of each row. Samples under 2 tokens are dropped with a warning.
    Samples carrying `sample_index` (see `data.sampler.MarkedDataset`) add `sample_index` (B,) int64;
    those with `padding` true (copies that even out the ranks) get an all-zero loss mask. Samples
    carrying `step_tokens` (the learnt tokens of their optimizer step, `data.step_tokens`; the same
    for every sample of a batch) add it as `step_tokens`, a float64 scalar.
    """
    ids = [np.asarray(s["input_ids"], dtype=np.int64) for s in samples]
    masks = [np.asarray(s["loss_mask"]) if s.get("loss_mask") is not None else None for s in samples]
    keep = [i for i, x in enumerate(ids) if len(x) >= 2]
    if len(keep) < len(ids):
        short = len(ids) - len(keep)
        warnings.warn(f"collate: dropped {short} samples with fewer than 2 tokens", stacklevel=2)
        if not keep:
            raise ValueError("collate: every sample in the batch has fewer than 2 tokens")
    lengths = torch.tensor([len(ids[i]) - 1 for i in keep], dtype=torch.int64)
    B, T = len(keep), int(lengths.max())
    input_ids = torch.zeros(B, T, dtype=torch.int64)
    target_ids = torch.zeros(B, T, dtype=torch.int64)
    loss_mask = torch.zeros(B, T, dtype=torch.float32)
    for b, i in enumerate(keep):
        x = torch.from_numpy(ids[i])
        n = len(x) - 1
        input_ids[b, :n] = x[:-1]
        target_ids[b, :n] = x[1:]
        if not samples[i].get("padding", False):
            loss_mask[b, :n] = 1.0 if masks[i] is None else torch.from_numpy(masks[i][1:].astype(np.float32))
    batch = {"input_ids": input_ids, "target_ids": target_ids, "loss_mask": loss_mask, "lengths": lengths}
    if all("sample_index" in samples[i] for i in keep):
        batch["sample_index"] = torch.tensor([samples[i]["sample_index"] for i in keep], dtype=torch.int64)
    steps = {samples[i].get("step_tokens") for i in keep}
    if steps != {None}:
        if len(steps) != 1:
            raise ValueError(f"collate: samples of one batch carry different step_tokens {steps}")
        batch["step_tokens"] = torch.tensor(float(steps.pop()), dtype=torch.float64)
    return batch
