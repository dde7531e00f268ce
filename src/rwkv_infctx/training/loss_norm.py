"""`model.loss_normalization`: what a micro-batch's loss divides by, and the factor on its proxy.

step_tokens (default): the loss of an optimizer step is the mean cross-entropy over every learnt
token of all its micro-batches on all ranks, N_step, as one process holding all the step's samples in
one micro-batch would compute it. N_step is known before the step runs: the training batches of
`RWKVDataModule` carry it (`step_tokens`, computed from the stored masks by the sampler for all
ranks at once, `data.step_tokens`), so no collective is needed. Without accumulation a batch lacking
it is normalised by its own token count all-reduced over the ranks (`distributed.global_token_norm`),
which is the same number; with accumulation such a batch is refused.

micro_batch_tokens: each micro-step's loss is the mean over its own tokens on all ranks, and the
step's gradient the mean of its micro-steps' gradients (each micro-step weighs the same, whatever its
token count: the behaviour before step_tokens existed).

The scaling the strategies apply is undone on the proxy: DDP and every DeepSpeed stage average the
W ranks' gradients; Lightning divides each micro-step's loss by k = accumulate_grad_batches (also in
an epoch's shorter last step); DeepSpeed's engine divides it by k once more (its
gradient_accumulation_steps). So the proxy is multiplied by W · k (W · k² under DeepSpeed), and the
gradients summed over a step are those of Σ ce / N_step.

DeepSpeed counts its own micro-steps and carries an unfinished step over an epoch's end, where
Lightning would step: with step_tokens and accumulation it needs the batches of an epoch to be a
multiple of k (`check_step_grouping`), and the two counts to agree (a resume between two micro-steps
of a step would break that).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.distributed import deepspeed_config, global_token_norm

LossNormalization = Literal["step_tokens", "micro_batch_tokens"]
LOSS_NORMALIZATIONS = ("step_tokens", "micro_batch_tokens")


def check_loss_normalization(value: Any) -> None:
    """UserError unless `value` is one of LOSS_NORMALIZATIONS."""
    if value not in LOSS_NORMALIZATIONS:
        raise UserError(
            f"model.loss_normalization: {value!r} (expected one of {', '.join(LOSS_NORMALIZATIONS)})"
        )


def loss_norm(
    batch: dict[str, Tensor], mode: LossNormalization, trainer: Any, batch_idx: int
) -> tuple[Tensor, float]:
    """(N, scale): the denominator of this micro-batch's objective, and the factor on its proxy."""
    strategy = trainer.strategy
    k = int(getattr(trainer, "accumulate_grad_batches", 1))
    world = float(getattr(strategy, "world_size", 1))
    deepspeed = deepspeed_config(strategy) is not None
    undo = float(k * k if deepspeed else k)  # Lightning's division by k, and DeepSpeed's
    if mode == "micro_batch_tokens":
        n_all, world = global_token_norm(batch["loss_mask"], strategy)
        return n_all, world * undo / k
    n_step = batch.get("step_tokens")
    if n_step is None:
        if k > 1:
            raise UserError(
                f"model.loss_normalization: step_tokens with trainer.accumulate_grad_batches {k} needs "
                "training batches that carry step_tokens, as RWKVDataModule's do; this one has none "
                "(use RWKVDataModule, or model.loss_normalization: micro_batch_tokens)"
            )
        n_all, world = global_token_norm(batch["loss_mask"], strategy)
        return n_all, world
    if deepspeed and k > 1:
        check_deepspeed_position(trainer, batch_idx, k)
    return n_step.to(batch["loss_mask"].device, torch.float64), world * undo


def check_step_grouping(trainer: Any, mode: LossNormalization) -> None:
    """UserError if DeepSpeed would group this epoch's batches into steps otherwise than Lightning."""
    k = int(getattr(trainer, "accumulate_grad_batches", 1))
    if mode != "step_tokens" or k == 1 or deepspeed_config(trainer.strategy) is None:
        return
    batches = trainer.num_training_batches
    if batches != float("inf") and int(batches) % k:
        raise UserError(
            f"model.loss_normalization: step_tokens under DeepSpeed needs the batches of an epoch per "
            f"rank ({int(batches)}) to be a multiple of trainer.accumulate_grad_batches ({k}): DeepSpeed "
            "carries an unfinished step over the epoch's end (set trainer.limit_train_batches, or "
            "model.loss_normalization: micro_batch_tokens)"
        )


def check_deepspeed_position(trainer: Any, batch_idx: int, k: int) -> None:
    """UserError if DeepSpeed's micro-step count is not at this batch's place within its step."""
    engine = getattr(trainer.strategy, "model", None)
    micro = getattr(engine, "micro_steps", None)
    if micro is not None and int(micro) % k != batch_idx % k:
        raise UserError(
            f"model.loss_normalization: step_tokens: batch {batch_idx} of the epoch is micro-step "
            f"{batch_idx % k} of its optimizer step, DeepSpeed counts {int(micro) % k} (a checkpoint "
            "written between the micro-steps of a step?); resume from one written after an optimizer "
            "step, or use model.loss_normalization: micro_batch_tokens"
        )
