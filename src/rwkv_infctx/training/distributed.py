"""Data parallelism: the loss normaliser across ranks, `target_batch_size`, and DeepSpeed specifics.

Every strategy we support (DDP, DeepSpeed ZeRO 1–3, with or without offload) *averages* the
gradients of its W data-parallel ranks. One process holding the whole global micro-batch would
divide the summed cross-entropy by the token count of all ranks, N_all. So each rank normalises by
N_all (one all-reduce of a scalar per micro-step, the same on every rank whatever its segment count)
and scales its proxy by W, which the strategy's averaging undoes:

    mean_r (W · ce_r / N_all) = Σ_r ce_r / N_all

That is the normaliser of a micro-step on its own; with gradient accumulation the trainer divides by
the token total of the whole optimizer step instead, carried by the batches (`training.loss_norm`).

ZeRO-3 gathers a module's weights in its forward (and again in its backward) with a collective. A
layer-by-layer gather would need every rank to call the layers equally often, but a rank's segment
count is its sample's length, so ranks would hang. `make_zero3_leaf` makes the network DeepSpeed's
*leaf*, and `run_on_network` calls it once per micro-batch on every rank with all the segments inside
that call: the whole network is gathered once for the forward and once for the backward. Gradients
and optimizer states stay partitioned, and so do the weights between micro-steps; the whole network
must fit on one device during a step (ZeRO-3's layer-by-layer gathering is not used).

DeepSpeed is imported inside the functions that need it, never at module load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from rwkv_infctx.errors import UserError
from rwkv_infctx.training.loss import token_count

T = TypeVar("T")


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


def make_zero3_leaf(network: nn.Module) -> None:
    """Make `network` a ZeRO-3 leaf: no hooks on its submodules; its own call gathers all its weights.

    Call before DeepSpeed wraps the model (LightningModule.setup), then run it with `run_on_network`.
    """
    from deepspeed.utils import set_z3_leaf_module

    set_z3_leaf_module(network, True)


def run_on_network(
    network: nn.Module,
    fn: Callable[[Any, Tensor | None], T],
    zero3: bool,
    grad_device: torch.device | None = None,
) -> T:
    """`fn(net, anchor)`: directly (`net` is `network`, `anchor` None), or under ZeRO-3 inside one call
    of the leaf `network`, so DeepSpeed gathers its weights once for all of `fn`'s segments.

    Under ZeRO-3 `net` calls the network's forward without hooks, and with `grad_device` an `anchor`
    (a scalar requiring grad) is passed through the call: `fn` must make it an input of its autograd
    node (bptt_step does), so that DeepSpeed gathers the weights again for the backward and reduces the
    leaf's gradients after that node has produced them, not when the output's gradient arrives.
    """
    if not zero3:
        return fn(network, None)
    anchor = None if grad_device is None else torch.ones((), device=grad_device, requires_grad=True)

    def redirected(*args: Tensor) -> T:
        del network.forward  # back to the class's forward, which `_Unhooked` calls
        # the anchor as the hooks handed it on (wrapped in their autograd nodes), not the original
        return fn(_Unhooked(network), args[0] if args else None)

    network.forward = redirected  # the hooked call runs `fn` (as Lightning's forward redirection)
    try:
        return network(anchor) if anchor is not None else network()
    finally:
        network.__dict__.pop("forward", None)


class _Unhooked:
    """`network` whose calls run its forward without module hooks (each segment's call under ZeRO-3)."""

    def __init__(self, network: nn.Module) -> None:
        self._network = network

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self._network).forward(self._network, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)


@contextlib.contextmanager
def full_weights(model: nn.Module, strategy: Any) -> Iterator[None]:
    """Inside, `model` holds its full weights on every rank (gathered under ZeRO-3: call on all ranks)."""
    if zero_stage(strategy) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield


@contextlib.contextmanager
def gathered_network(network: nn.Module, strategy: Any) -> Iterator[Any]:
    """`network` with its full weights, to run outside a training step (e.g. sampling on rank 0).

    Every rank must enter: under ZeRO-3 the gather is a collective. Inside, any rank may call the
    yielded network on its own: under ZeRO-3 it is `network` without DeepSpeed's hooks, whose forward
    would otherwise gather (a collective the other ranks do not join) and release the weights again.
    """
    with full_weights(network, strategy):
        yield _Unhooked(network) if zero_stage(strategy) == 3 else network
