"""`NanGuard`: what happens when a loss or gradient is not finite (`model.nan_policy`).

- `stop` (default): training stops before the optimizer step, with one line naming the global step
  and the sample indices of the offending micro-batch(es). The weights are not updated and no
  checkpoint is written, so the last checkpoint is the last good state.
- `skip`: the optimizer step is skipped (every gradient is dropped, so the parameters and the
  optimizer's moments stay as they were), `nan_skips` counts it in the logs, and training goes on.
  The step counter and the learning-rate schedule still advance.

The loss of segmented BPTT is only known after backward (`StepReport`), so each micro-batch's loss
is checked in `on_after_backward`; the gradients, summed over the micro-batches (and all-reduced over
ranks, so every rank takes the same decision), in `on_before_optimizer_step`.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from rwkv_infctx.errors import UserError

NanPolicy = Literal["stop", "skip"]
NAN_POLICIES = ("stop", "skip")


class NonFiniteError(UserError):
    """Training stopped on a non-finite loss or gradient (nan_policy: stop)."""


def non_finite_grads(module: torch.nn.Module) -> list[str]:
    """Names of the parameters whose gradient holds inf or NaN."""
    named = [(n, p.grad) for n, p in module.named_parameters() if p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
    return [n for (n, _), ok in zip(named, finite, strict=True) if not ok]


class NanGuard(pl.Callback):
    """Stop or skip on a non-finite loss or gradient (see the module doc).

    Args:
        policy: stop or skip.
    """

    def __init__(self, policy: NanPolicy = "stop") -> None:
        if policy not in NAN_POLICIES:
            raise UserError(f"model.nan_policy: {policy!r} (expected one of {', '.join(NAN_POLICIES)})")
        self.policy = policy
        self.skipped = 0
        self._samples: list[int] = []
        self._bad_loss: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index = batch.get("sample_index") if isinstance(batch, dict) else None
        self._samples = index.tolist() if index is not None else [f"batch {batch_idx}"]

    def on_after_backward(self, trainer, pl_module) -> None:
        report = getattr(pl_module, "last_report", None)
        if report is None or report.ce_sum is None:
            return
        # ce_sum and the token count: report.loss hides a NaN count (it reads 0 when the count isn't > 0)
        if not (math.isfinite(report.ce_sum) and math.isfinite(report.n_tokens)):
            self._bad_loss += self._samples

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        bad_grads = non_finite_grads(pl_module)
        bad_loss, self._bad_loss = self._bad_loss, []
        if not bad_grads and not bad_loss:
            return
        what = "loss" if bad_loss else f"gradient of {bad_grads[0]}"
        samples = ", ".join(map(str, bad_loss or self._samples))
        where = f"non-finite {what} at global step {trainer.global_step} (samples {samples})"
        if self.policy == "stop":
            raise NonFiniteError(
                f"training stopped: {where}; no checkpoint was written for this step "
                "(set model.nan_policy: skip to skip such steps)"
            )
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        rank_zero_warn(f"nan_policy skip: {where}; optimizer step skipped ({self.skipped} so far)")
        pl_module.log("nan_skips", float(self.skipped), batch_size=1)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
