"""The WKV recurrence's FLOPs, made visible to Lightning's model summary.

Lightning's `ModelSummary` runs `example_input_array` through `RWKVModule.forward` under torch's
`FlopCounterMode`, which counts matrix products (mm, addmm, bmm, convolutions, attention) and no
elementwise op. The matmuls it measures are exactly `rwkv4_flops.matmul_flops_per_token`; the WKV
recurrence is elementwise work it cannot see. So `RWKVModule.forward` also calls
`declare_wkv_work`: a torch op that does nothing and whose registered flop formula is the analytic
`WKV_OPS_PER_CHANNEL · layers · tokens · dim_att`. The summary's Total FLOPs is then the analytic
forward FLOPs of the input: matmuls measured, WKV declared (tests/training/test_flops.py).

The WKV op must then be one whose work the counter does not see: the reference (elementwise) and
Triton ops are; the chunked CPU op is not (it computes the recurrence through per-chunk GEMMs, an
implementation's extra work the counter would add as matmuls). `counting_backend` runs the WKV
through the reference op instead while a FLOP counter is active (same results).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from rwkv_infctx.model.rwkv4_flops import WKV_OPS_PER_CHANNEL

# the dispatch mode a FlopCounterMode pushes (a class of its own since torch 2.5)
_COUNTER_MODES = tuple(
    {FlopCounterMode, getattr(torch.utils.flop_counter, "_FlopCounterMode", FlopCounterMode)}
)


@torch.library.custom_op("rwkv_infctx::wkv4_work", mutates_args=())
def _wkv4_work(anchor: Tensor, layers: int, tokens: int, channels: int) -> Tensor:
    """No computation: a FLOP counter's record of WKV work done elsewhere."""
    return anchor.new_empty(0)


@_wkv4_work.register_fake
def _(anchor: Tensor, layers: int, tokens: int, channels: int) -> Tensor:
    return anchor.new_empty(0)


@register_flop_formula(torch.ops.rwkv_infctx.wkv4_work)
def _wkv4_flops(anchor_shape, layers: int, tokens: int, channels: int, *args, **kwargs) -> int:
    return WKV_OPS_PER_CHANNEL * layers * tokens * channels


def declare_wkv_work(anchor: Tensor, layers: int, tokens: int, channels: int) -> None:
    """Record, for an active `FlopCounterMode`, the WKV work of `tokens` tokens (batch × time) through
    `layers` layers of `channels` (dim_att) channels. Outside a FLOP counter it costs one op call."""
    torch.ops.rwkv_infctx.wkv4_work(anchor.detach(), layers, tokens, channels)


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
