"""The batch format: inputs, targets shifted by one, loss mask on targets, padding masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rwkv_infctx.data import collate


def test_shapes_shift_padding_and_mask():
    batch = collate(
        [
            {"input_ids": np.array([5, 6, 7, 8], np.int32), "loss_mask": np.array([0, 0, 1, 1], np.uint8)},
            {"input_ids": np.array([9, 10], np.int32), "loss_mask": np.array([1, 1], np.uint8)},
        ]
    )
    assert set(batch) == {"input_ids", "target_ids", "loss_mask", "lengths"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["target_ids"].tolist() == [[6, 7, 8], [10, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert batch["lengths"].tolist() == [3, 1]
    assert batch["input_ids"].dtype == batch["target_ids"].dtype == torch.int64
    assert batch["loss_mask"].dtype == torch.float32 and batch["lengths"].dtype == torch.int64


def test_no_mask_means_learn_everything_and_no_length_cap():
    long = list(range(1, 100_001))
    batch = collate([{"input_ids": long}])
    assert batch["input_ids"].shape == (1, 99_999)
    assert batch["loss_mask"].sum().item() == 99_999


def test_short_samples_dropped_with_warning():
    with pytest.warns(UserWarning, match="dropped 1 samples"):
        batch = collate([{"input_ids": [3]}, {"input_ids": [1, 2, 3]}])
    assert batch["input_ids"].tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="every sample"), pytest.warns(UserWarning):
        collate([{"input_ids": []}])
