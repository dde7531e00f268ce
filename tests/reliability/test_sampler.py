"""ResumableSampler: rank sharding, equal batch counts, padding that nobody learns, exact cursor."""

from __future__ import annotations

import itertools

import pytest
import torch

from rwkv_infctx.data.collator import collate
from rwkv_infctx.data.sampler import MarkedDataset, Padding, ResumableSampler
from rwkv_infctx.errors import UserError


def epoch(n: int, world: int, epoch_no: int = 0, seed: int = 3) -> list[list[int]]:
    samplers = [ResumableSampler(n, True, seed, rank, world) for rank in range(world)]
    for s in samplers:
        s.set_epoch(epoch_no)
    return [list(s) for s in samplers]


@pytest.mark.parametrize("n,world", [(10, 1), (10, 3), (7, 4), (2, 5), (12, 2)])
def test_every_sample_learnt_once_and_ranks_equal(n, world):
    per_rank = epoch(n, world)
    assert len({len(r) for r in per_rank}) == 1 and len(per_rank[0]) == -(-n // world)
    learnt = [i for r in per_rank for i in r if not isinstance(i, Padding)]
    assert sorted(learnt) == list(range(n))
    padded = [i for r in per_rank for i in r if isinstance(i, Padding)]
    assert len(padded) == len(per_rank[0]) * world - n


def test_order_depends_on_seed_and_epoch_only():
    assert epoch(20, 2, 0) == epoch(20, 2, 0)
    assert epoch(20, 2, 0) != epoch(20, 2, 1)
    assert epoch(20, 2, 0, seed=4) != epoch(20, 2, 0, seed=3)
    s = ResumableSampler(5, shuffle=False)
    assert list(s) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("world,consumed", [(1, 3), (2, 2), (3, 1), (3, 4)])
def test_resume_mid_epoch_continues_the_same_order(world, consumed):
    n = 11
    full = epoch(n, world, epoch_no=2)
    for rank in range(world):
        before = ResumableSampler(n, True, 3, rank, world)
        before.set_epoch(2)
        state = before.state_dict(consumed)
        after = ResumableSampler(n, True, 99, rank, world)  # the seed comes from the state
        after.load_state_dict(state)
        after.set_epoch(2)
        assert list(after) == full[rank][consumed:]
        after.set_epoch(3)  # the cursor belongs to its epoch only
        assert list(after) == epoch(n, world, epoch_no=3)[rank]


def test_resume_refuses_other_data_or_world_size_mid_epoch():
    state = ResumableSampler(10, True, 0, 0, 2).state_dict(1)
    with pytest.raises(UserError, match="10 training samples"):
        ResumableSampler(11, True, 0, 0, 2).load_state_dict(state)
    with pytest.raises(UserError, match="2 ranks, resumed with 1"):
        ResumableSampler(10, True, 0, 0, 1).load_state_dict(state)
    ResumableSampler(10, True, 0, 0, 1).load_state_dict(ResumableSampler(10, True, 0, 0, 2).state_dict(0))


def test_padding_is_masked_by_the_collator():
    rows = [{"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1]}, {"input_ids": [4, 5], "loss_mask": [1, 1]}]
    data = MarkedDataset(rows)
    batch = collate([data[0], data[Padding(1)]])
    assert batch["sample_index"].tolist() == [0, 1]
    assert batch["loss_mask"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert torch.equal(batch["input_ids"][1], torch.tensor([4, 0]))


def test_lightning_keeps_it(tmp_path):
    """use_distributed_sampler must not wrap it: it is a DistributedSampler already."""
    from torch.utils.data.distributed import DistributedSampler

    assert isinstance(ResumableSampler(4), DistributedSampler)
    assert list(itertools.islice(ResumableSampler(4, shuffle=False), 2)) == [0, 1]
