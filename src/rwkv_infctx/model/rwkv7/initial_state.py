"""A learnt initial WKV state for RWKV-7 (state tuning): the state every fresh entry starts from.

Shape legend: L n_layer, B batch, H heads, N head size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InitialState(nn.Module):
    """S0: one (H, N, N) float32 WKV matrix set per layer, rows indexed by value and columns by key
    (the layout of `RWKV7State.wkv`). The token shifts of a fresh state stay zero.

    Kept in float32 whatever dtype the model is cast to (a bf16 cast leaves it alone).
    """

    def __init__(self, n_layer: int, n_head: int, head_size: int) -> None:
        super().__init__()
        shape = (n_head, head_size, head_size)
        self.wkv = nn.ParameterList(nn.Parameter(torch.zeros(shape)) for _ in range(n_layer))

    def batch(self, batch_size: int, device: torch.device | str | None = None) -> Tensor:
        """S0 broadcast over the batch: (L, B, H, N, N), differentiable (the batch rows' gradients
        sum into each layer's matrix)."""
        s0_LHNN = torch.stack(list(self.wkv))
        s0_LBHNN = s0_LHNN.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        return s0_LBHNN.to(device or s0_LHNN.device).contiguous()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for p in self.wkv:
            if p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
        return self
