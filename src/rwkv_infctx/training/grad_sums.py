"""Per-parameter gradient sums over the segments of a step, streamed as autograd produces them.

`bptt_step` (training/segments.py) runs one backward per segment. Summing those with
`torch.autograd.grad` would hold a full second set of parameter gradients per segment; instead
`aliased_params` swaps the model's parameters for detached aliases whose post-accumulate hooks add
each gradient into `GradSums` and drop it, so at most one extra parameter-sized tensor exists at a
time. `GradSums.take` hands the sums back in the parameters' dtypes.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from rwkv_infctx.errors import UserError

GradAccumDtype = Literal["float32", "param"]
GRAD_ACCUM_DTYPES = ("float32", "param")
"""float32: half-precision gradients are summed over segments in fp32 (fp32 and fp64 ones in their
own dtype) and returned in the parameter's dtype. param: summed in the parameter's own dtype (with
bf16 weights half the accumulator memory; each segment's bf16 gradient is rounded into the sum)."""


def check_grad_accum_dtype(value: str) -> None:
    """UserError unless `value` is one of GRAD_ACCUM_DTYPES."""
    if value not in GRAD_ACCUM_DTYPES:
        raise UserError(f"model.grad_accum_dtype: {value!r} (expected one of {', '.join(GRAD_ACCUM_DTYPES)})")


class GradSums:
    """One gradient accumulator per parameter, filled segment by segment (`add`), emptied by `take`."""

    def __init__(self, params: list[Tensor], mode: GradAccumDtype) -> None:
        self.params = params
        half = (torch.bfloat16, torch.float16)
        self.dtypes = [torch.float32 if mode == "float32" and p.dtype in half else p.dtype for p in params]
        self.sums: list[Tensor | None] = [None] * len(params)

    def add(self, j: int, g: Tensor) -> None:
        """sums[j] += g; the first gradient is adopted as the sum when it has the sum's dtype (as
        AccumulateGrad adopts a parameter's first gradient)."""
        s = self.sums[j]
        if s is None:
            self.sums[j] = g.to(self.dtypes[j])
        else:
            s.add_(g)

    def take(self) -> list[Tensor]:
        """The sums in the parameters' dtypes (zeros where no gradient came), each accumulator
        converted and released before the next: at most one extra parameter-sized tensor at a time."""
        out = []
        for j, p in enumerate(self.params):
            s, self.sums[j] = self.sums[j], None
            out.append(torch.zeros_like(p) if s is None else s.to(p.dtype))  # same dtype: no copy
        return out


@contextlib.contextmanager
def aliased_params(model: nn.Module, params: list[Tensor], sums: GradSums) -> Iterator[list[Tensor]]:
    """Inside, every module holds, in place of each parameter in `params`, a detached alias: a leaf
    sharing the parameter's storage (no copy) whose post-accumulate hook moves its gradient into
    `sums` and drops it. Yields the aliases, in `params` order.

    Why leaves: the engine runs AccumulateGrad nodes as soon as their gradient is complete, so each
    segment gradient is summed and freed right after the op that produced it. (An identity Function
    applied to each parameter before the recompute would run last: the engine picks ready nodes by
    descending creation order, so every gradient would wait, alive, for the whole segment.)
    The real parameters stay out of the sweep's graphs, so their hooks (DDP, DeepSpeed) run once, when
    the node returns the sums. The modules' `_parameters` entries are swapped (what
    torch.func.functional_call does) and restored on exit, also on error.
    """
    aliases = [p.detach().requires_grad_() for p in params]
    for j, a in enumerate(aliases):
        a.register_post_accumulate_grad_hook(functools.partial(_move_grad, sums, j))
    by_id = {id(p): a for p, a in zip(params, aliases, strict=True)}
    swapped = [
        (m, name, p)
        for m in model.modules()
        for name, p in m._parameters.items()
        if p is not None and id(p) in by_id
    ]
    try:
        for m, name, p in swapped:
            m._parameters[name] = by_id[id(p)]
        yield aliases
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _move_grad(sums: GradSums, j: int, alias: Tensor) -> None:
    g, alias.grad = alias.grad, None
    sums.add(j, g)
