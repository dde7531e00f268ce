"""`model.loss_normalization`: the denominators and proxy factors, and the refusals (`training.loss_norm`).

The exactness itself is tested end to end in tests/distributed/test_accumulation.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.loss_norm import check_step_grouping, loss_norm
from rwkv_infctx.training.module import RWKVModule


class DeepSpeedStrategy:
    """Stands in for Lightning's (recognised by its class name), on one rank."""

    world_size = 1

    def __init__(self, micro_steps: int = 0) -> None:
        self.config = {"zero_optimization": {"stage": 2}}
        self.model = SimpleNamespace(micro_steps=micro_steps)


def trainer(k: int, strategy=None, batches: int = 4):
    strategy = strategy or SimpleNamespace(world_size=1)
    return SimpleNamespace(strategy=strategy, accumulate_grad_batches=k, num_training_batches=batches)


def batch(step_tokens: float | None = None) -> dict[str, torch.Tensor]:
    out = {"loss_mask": torch.tensor([[1.0, 1.0, 0.0]])}
    if step_tokens is not None:
        out["step_tokens"] = torch.tensor(step_tokens, dtype=torch.float64)
    return out


def test_step_tokens_divide_by_the_step_total_and_undo_the_division_by_k():
    n, scale = loss_norm(batch(7.0), "step_tokens", trainer(2), 0)
    assert (float(n), scale) == (7.0, 2.0)
    n, scale = loss_norm(batch(7.0), "step_tokens", trainer(2, DeepSpeedStrategy()), 0)
    assert (float(n), scale) == (7.0, 4.0)  # DeepSpeed divides by k again
    n, scale = loss_norm(batch(), "step_tokens", trainer(1), 0)  # without accumulation: its own count
    assert (float(n), scale) == (2.0, 1.0)


def test_micro_batch_tokens_divide_by_the_micro_batch_and_average_the_micro_steps():
    for strategy in (None, DeepSpeedStrategy()):
        n, scale = loss_norm(batch(7.0), "micro_batch_tokens", trainer(2, strategy), 0)
        assert (float(n), scale) == (2.0, 1.0 if strategy is None else 2.0)


def test_accumulating_without_step_totals_is_refused():
    with pytest.raises(UserError, match=r"step_tokens with trainer\.accumulate_grad_batches 2 needs"):
        loss_norm(batch(), "step_tokens", trainer(2), 0)


def test_deepspeed_must_group_the_steps_as_lightning_does():
    with pytest.raises(UserError, match=r"batches of an epoch per rank \(5\) to be a multiple of .* \(2\)"):
        check_step_grouping(trainer(2, DeepSpeedStrategy(), batches=5), "step_tokens")
    check_step_grouping(trainer(2, DeepSpeedStrategy(), batches=4), "step_tokens")
    check_step_grouping(trainer(2, None, batches=5), "step_tokens")  # Lightning steps at the epoch's end
    check_step_grouping(trainer(2, DeepSpeedStrategy(), batches=5), "micro_batch_tokens")
    with pytest.raises(UserError, match="DeepSpeed counts 1"):
        loss_norm(batch(7.0), "step_tokens", trainer(2, DeepSpeedStrategy(micro_steps=3)), 4)
    loss_norm(batch(7.0), "step_tokens", trainer(2, DeepSpeedStrategy(micro_steps=3)), 5)


def test_an_unknown_mode_is_one_line():
    expected = r"^model\.loss_normalization: 'tokens' \(expected one of step_tokens, micro_batch_tokens\)$"
    with pytest.raises(UserError, match=expected):
        RWKVModule(n_layer=1, n_embd=16, vocab_size=50, loss_normalization="tokens")
