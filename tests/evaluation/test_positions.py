"""Bucketing, accumulation against a direct per-token computation, and segmented == whole."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwkv_infctx.data.collator import collate
from rwkv_infctx.evaluation.positions import (
    PositionLoss,
    bucket_edges,
    bucket_index,
    evaluate,
    segment_losses,
)
from rwkv_infctx.evaluation.samples import batches, truncate
from tests.conftest import family_config, random_family_model
from tests.evaluation.conftest import tiny_model


def test_bucket_edges_double_from_128_past_the_largest_position():
    assert bucket_edges(1) == [1, 128]
    assert bucket_edges(127) == [1, 128]
    assert bucket_edges(128) == [1, 128, 256]
    assert bucket_edges(255) == [1, 128, 256]
    assert bucket_edges(256) == [1, 128, 256, 512]
    assert bucket_edges(5000) == [1, 128, 256, 512, 1024, 2048, 4096, 8192]
    with pytest.raises(ValueError):
        bucket_edges(0)


def test_bucket_index_is_half_open():
    positions = torch.tensor([1, 127, 128, 255, 256, 511, 512, 1023, 1024, 2**20 - 1, 2**20])
    assert bucket_index(positions).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 13, 14]


def test_rows_report_empty_buckets_as_nan():
    acc = PositionLoss()
    acc.add(torch.tensor([1, 2, 300]), torch.tensor([1.0, 3.0, 0.5]))
    rows = acc.rows()
    assert [(r.start, r.end, r.tokens) for r in rows] == [(1, 128, 2), (128, 256, 0), (256, 512, 1)]
    assert rows[0].mean_loss == pytest.approx(2.0) and rows[0].perplexity == pytest.approx(math.e**2)
    assert math.isnan(rows[1].mean_loss) and math.isnan(rows[1].perplexity)
    assert acc.total_tokens == 3 and PositionLoss().rows() == []


def _batch(lengths: list[int], vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=gen)
        mask = (torch.rand(n, generator=gen) > 0.2).long()
        samples.append({"input_ids": ids.numpy(), "loss_mask": mask.numpy()})
    return collate(samples)


def test_accumulation_equals_direct_per_token_computation():
    model = tiny_model()
    batch = _batch([300, 140, 20], 97, seed=1)  # padding and masked targets both present
    acc = evaluate(model, [batch], segment_len=64)
    with torch.no_grad():
        logits, _ = model(batch["input_ids"])
    ce = F.cross_entropy(logits.flatten(0, 1), batch["target_ids"].flatten(), reduction="none")
    ce = ce.view_as(batch["loss_mask"]).double()
    expected: dict[int, list[float]] = {}
    B, T = ce.shape
    for b in range(B):
        for t in range(T):
            if batch["loss_mask"][b, t] > 0:
                position = t + 1
                bucket = 0 if position < 128 else int(math.log2(position)) - 6
                expected.setdefault(bucket, []).append(float(ce[b, t]))
    rows = acc.rows()
    assert [(r.start, r.end) for r in rows] == [(1, 128), (128, 256), (256, 512)]
    for i, row in enumerate(rows):
        assert row.tokens == len(expected[i])
        assert row.mean_loss == pytest.approx(sum(expected[i]) / len(expected[i]), abs=1e-5)
    assert acc.total_tokens == int((batch["loss_mask"] > 0).sum())


def test_segmented_evaluation_matches_one_pass(family):
    model = random_family_model(family_config(family, 97), seed=3)
    batch = _batch([90, 61], 97, seed=2)

    def losses(segment_len: int) -> torch.Tensor:
        parts = list(segment_losses(model, batch["input_ids"], batch["target_ids"], segment_len))
        assert [start for start, _ in parts] == list(range(0, 89, segment_len))
        return torch.cat([loss for _, loss in parts], dim=1)

    whole, split = losses(4096), losses(7)
    assert whole.shape == split.shape == (2, 89)
    torch.testing.assert_close(split, whole, atol=1e-5, rtol=0)
    a, b = evaluate(model, [batch], 7).rows(), evaluate(model, [batch], 4096).rows()
    assert [r.tokens for r in a] == [r.tokens for r in b]
    for x, y in zip(a, b, strict=True):
        assert x.mean_loss == pytest.approx(y.mean_loss, abs=1e-5)


def test_truncate_counts_predictions_and_batches_cover_every_sample():
    samples = [([1] * 10, [1] * 10), ([2] * 5, [1] * 5), ([3] * 8, [1] * 8)]
    assert [len(i) for i, _ in truncate(samples, None)] == [10, 5, 8]
    assert [len(i) for i, _ in truncate(samples, 9)] == [10]
    assert [len(i) for i, _ in truncate(samples, 11)] == [10, 3]
    assert [len(i) for i, _ in truncate(samples, 4)] == [5]
    got = list(batches(truncate(samples, None), batch_size=2))
    assert [b["input_ids"].shape for b in got] == [(2, 9), (1, 4)]
