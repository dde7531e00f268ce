"""The WKV recurrence's FLOPs, made visible to Lightning's model summary.

Lightning's `ModelSummary` runs `example_input_array` through `RWKVModule.forward` under torch's
`FlopCounterMode`, which counts matrix products (mm, addmm, bmm, convolutions, attention) and no
elementwise op. The matmuls it measures are exactly the family's matmul FLOPs; the WKV recurrence
is elementwise work it cannot see. So `RWKVModule.forward` also calls `declare_wkv_work`: a torch op
that does nothing and whose registered flop formula is the analytic WKV work it is given
(`ModelFamily.wkv_flops_per_token` × tokens). The summary's Total FLOPs is then the analytic forward
FLOPs of the input: matmuls measured, WKV declared (tests/training/test_flops.py).

The WKV op must then be one whose work the counter does not see: the references of WKV-4 and WKV-7
(elementwise ops only) and the Triton op are; the chunked CPU ops are not (they compute the
recurrence through per-chunk GEMMs, an implementation's extra work the counter would add as
matmuls). `counting_backend` runs the WKV
through the reference op instead while a FLOP counter is active (same results).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

# the dispatch mode a FlopCounterMode pushes (a class of its own since torch 2.5)
_COUNTER_MODES = tuple(
    {FlopCounterMode, getattr(torch.utils.flop_counter, "_FlopCounterMode", FlopCounterMode)}
)


@torch.library.custom_op("rwkv_infctx::wkv_work", mutates_args=())
def _wkv_work(anchor: Tensor, flops: int) -> Tensor:
    """No computation: a FLOP counter's record of WKV work done elsewhere."""
    return anchor.new_empty(0)


@_wkv_work.register_fake
def _(anchor: Tensor, flops: int) -> Tensor:
    return anchor.new_empty(0)


@register_flop_formula(torch.ops.rwkv_infctx.wkv_work)
def _wkv_flops(anchor_shape, flops: int, *args, **kwargs) -> int:
    return flops


def declare_wkv_work(anchor: Tensor, flops: int) -> None:
    """Record, for an active `FlopCounterMode`, `flops` of WKV work (the family's WKV FLOPs per token
    × tokens). Outside a FLOP counter it costs one op call."""
    torch.ops.rwkv_infctx.wkv_work(anchor.detach(), int(flops))


@contextlib.contextmanager
def counting_backend(network: nn.Module, device: torch.device) -> Iterator[None]:
    """Inside, while a `FlopCounterMode` is active, every WKV op of `network` that would run the
    chunked op (`chunked`, or `auto` off CUDA) runs the reference op instead."""
    counting = any(isinstance(mode, _COUNTER_MODES) for mode in _get_current_dispatch_mode_stack())
    swapped = [
        m
        for m in network.modules()
        if counting and (getattr(m, "wkv_backend", None) == "chunked" or (
            getattr(m, "wkv_backend", None) == "auto" and device.type != "cuda"))
    ]  # fmt: skip
    saved = [m.wkv_backend for m in swapped]
    try:
        for m in swapped:
            m.wkv_backend = "reference"
        yield
    finally:
        for m, backend in zip(swapped, saved, strict=True):
            m.wkv_backend = backend
