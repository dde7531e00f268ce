"""Data parallelism: the loss normaliser across ranks, `target_batch_size`, and DeepSpeed specifics.

Every strategy we support (DDP, DeepSpeed ZeRO 1–3, with or without offload) *averages* the
gradients of its W data-parallel ranks. One process holding the whole global micro-batch would
divide the summed cross-entropy by the token count of all ranks, N_all. So each rank normalises by
N_all (one all-reduce of a scalar per micro-step, the same on every rank whatever its segment count)
and scales its proxy by W, which the strategy's averaging undoes:

    mean_r (W · ce_r / N_all) = Σ_r ce_r / N_all

DeepSpeed is imported inside the functions that need it, never at module load.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.loss import token_count


def global_token_norm(loss_mask_BT: Tensor, strategy: Any) -> tuple[Tensor, float]:
    """(N_all, W): unmasked tokens of this micro-step on all ranks, and the data-parallel world size.

    Normalise the objective by N_all and multiply the proxy by W (see the module doc). On one
    process this is (N, 1). `strategy` is the Trainer's strategy (its `reduce` and `world_size`).
    """
    n = token_count(loss_mask_BT).to(loss_mask_BT.device)
    world = int(getattr(strategy, "world_size", 1))
    if world == 1:
        return n, 1.0
    return strategy.reduce(n.clone(), reduce_op="sum"), float(world)


def accumulation_for(target_batch_size: int, num_nodes: int, devices: int, batch_size: int) -> int:
    """`trainer.accumulate_grad_batches` giving `target_batch_size` samples per optimizer step."""
    per_step = num_nodes * devices * batch_size
    if target_batch_size <= 0:
        raise UserError(f"target_batch_size: {target_batch_size} (expected a positive number of samples)")
    if target_batch_size % per_step:
        raise UserError(
            f"target_batch_size: {target_batch_size} is not a multiple of num_nodes × devices × "
            f"data.batch_size = {num_nodes} × {devices} × {batch_size} = {per_step}"
        )
    return target_batch_size // per_step


def deepspeed_config(strategy: Any) -> dict | None:
    """The DeepSpeed config dict of a DeepSpeed strategy, else None (no import of deepspeed)."""
    if not any(cls.__name__ == "DeepSpeedStrategy" for cls in type(strategy).__mro__):
        return None
    config = getattr(strategy, "config", None)
    return config if isinstance(config, dict) else None


def zero_stage(strategy: Any) -> int:
    """The ZeRO stage of a DeepSpeed strategy (0 when not DeepSpeed or ZeRO is off)."""
    config = deepspeed_config(strategy) or {}
    return int((config.get("zero_optimization") or {}).get("stage", 0) or 0)


def offloads_optimizer(strategy: Any) -> bool:
    """True when DeepSpeed keeps the optimizer on the CPU (the *_offload strategies)."""
    config = deepspeed_config(strategy) or {}
    offload = (config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def cpu_adam(groups: list[dict], adamw: bool, lr: float, betas: tuple[float, float], eps: float):
    """DeepSpeed's CPU Adam(W) (`DeepSpeedCPUAdam`) over `groups`; it compiles its op on first use."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(groups, lr=lr, betas=betas, eps=eps, adamw_mode=adamw)
