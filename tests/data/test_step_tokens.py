"""Token totals of optimizer steps, handed to the batches before the steps run (`data.step_tokens`).

Oracles: the collator's own loss mask summed as the trainer sums it (`loss.token_count`), and the
ranks' batches as they come out of the sampler, grouped into steps by counting batches."""

from __future__ import annotations

import itertools

import datasets
import numpy as np
import pytest
import torch

from rwkv_infctx.data.collator import collate
from rwkv_infctx.data.sampler import MarkedDataset, ResumableSampler
from rwkv_infctx.data.step_tokens import StepPlan, learnt_tokens
from rwkv_infctx.training.loss import token_count

MASKS = [[1, 1, 0, 1], [0], [], [1, 1], [0, 0, 1, 1, 1, 0, 1], [1], [0, 1, 1], [1, 0, 0, 0, 0, 0, 0, 0, 1]]


def stored(masks: list[list[int]]) -> datasets.Dataset:
    ids = [list(range(len(m))) for m in masks]
    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "loss_mask": datasets.List(datasets.Value("uint8")),
        }
    )
    return datasets.Dataset.from_dict({"input_ids": ids, "loss_mask": masks}, features=features)


def counted_by_the_trainer(row: dict) -> float:
    """What the loss divides by for this sample alone: its collated mask, summed (0 if dropped)."""
    if len(row["input_ids"]) < 2:
        return 0.0
    return float(token_count(collate([row])["loss_mask"]))


def test_learnt_tokens_are_what_the_loss_counts():
    ds = stored(MASKS)
    expected = [counted_by_the_trainer(row) for row in ds.with_format("numpy")]
    assert learnt_tokens(ds).tolist() == expected
    assert expected[0] == 2.0 and expected[3] == 1.0  # the first token is read, never predicted


def oracle_step_tokens(per_rank: list[list[int]], counts, b: int, k: int, limit: int | None) -> list[list]:
    """Per rank, per yielded sample: the learnt tokens of the step it is in, found by batching each
    rank's samples and summing the steps' batches over the ranks."""
    batches = [[keys[i : i + b] for i in range(0, len(keys), b)] for keys in per_rank]
    batches = [r[:limit] for r in batches]
    step_sum: dict[int, float] = {}
    for r in batches:
        for j, batch in enumerate(r):
            learnt = sum(0.0 if key.padding else counts[int(key)] for key in batch)
            step_sum[j // k] = step_sum.get(j // k, 0.0) + learnt
    return [[step_sum[j // k] for j, batch in enumerate(r) for _ in batch] for r in batches]


def ranks_with_plan(n, world, counts, plan, cursor_state=None, epoch=1):
    out = []
    for rank in range(world):
        s = ResumableSampler(n, True, 5, rank, world)
        if cursor_state is not None:
            s.load_state_dict(cursor_state)
        s.set_step_plan(counts, lambda: plan)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize(
    "n,world,b,k,limit", [(8, 1, 1, 2, None), (9, 2, 1, 2, None), (11, 3, 2, 3, None), (13, 2, 2, 2, 3)]
)
def test_each_key_carries_the_token_total_of_its_step_over_all_ranks(n, world, b, k, limit):
    counts = np.arange(n, dtype=np.float64) * 3 + 1
    samples_per_rank = -(-n // world)
    per_rank_batches = -(-samples_per_rank // b)
    plan = StepPlan(b, k, min(per_rank_batches, limit or per_rank_batches))
    per_rank = ranks_with_plan(n, world, counts, plan)
    expected = oracle_step_tokens(per_rank, counts, b, k, limit)
    for keys, want in zip(per_rank, expected, strict=True):
        assert [key.step_tokens for key in keys[: len(want)]] == want
        assert all(key.step_tokens == 0 for key in keys[len(want) :])  # batches that never run
    assert any(key.padding for r in per_rank for key in r) == (n % world != 0)


def test_a_resumed_epoch_hands_out_the_same_step_totals():
    n, world, plan = 10, 2, StepPlan(1, 2, 5)
    counts = np.arange(n, dtype=np.float64) + 1
    full = ranks_with_plan(n, world, counts, plan)
    state = ResumableSampler(n, True, 5, 0, world)
    state.set_epoch(1)
    resumed = ranks_with_plan(n, world, counts, plan, cursor_state=state.state_dict(2))
    for before, after in zip(full, resumed, strict=True):
        assert [(int(k), k.step_tokens) for k in after] == [(int(k), k.step_tokens) for k in before[2:]]


def test_the_collated_batch_carries_its_step_total():
    ds = MarkedDataset(stored(MASKS).with_format("numpy"))
    sampler = ResumableSampler(len(MASKS), False)
    sampler.set_step_plan(learnt_tokens(stored(MASKS)), lambda: StepPlan(2, 2, 4))
    keys = list(sampler)
    with pytest.warns(UserWarning, match="dropped 1 samples"):  # a 1-token sample: counted 0
        batch = collate([ds[keys[0]], ds[keys[1]]])
    assert batch["step_tokens"].dtype == torch.float64
    first_step = sum(counted_by_the_trainer(ds[i]) for i in range(4))
    assert float(batch["step_tokens"]) == first_step
    with pytest.raises(ValueError, match="different step_tokens"):
        collate([ds[keys[0]], ds[keys[4]]])
    assert "step_tokens" not in collate([ds[0], ds[3]])  # plain indices: nothing to hand on


def test_keys_survive_pickling_to_dataloader_workers():
    import pickle

    sampler = ResumableSampler(3, False, 0, 0, 2)
    sampler.set_step_plan(np.ones(3), lambda: StepPlan(1, 2, 2))
    for key in itertools.islice(sampler, 2):
        again = pickle.loads(pickle.dumps(key))
        assert (int(again), again.padding, again.step_tokens) == (int(key), key.padding, key.step_tokens)
