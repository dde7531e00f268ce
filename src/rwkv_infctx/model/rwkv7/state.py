"""RWKV-7's recurrent state: per layer, two token-shift vectors and the WKV matrix of each head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rwkv_infctx.state import RecurrentState, state_field


@dataclass(frozen=True)
class RWKV7State(RecurrentState):
    """Layer-major state of an RWKV-7 model. L layers, B batch rows, C n_embd, H heads, N head size.

    att_shift: (L, B, C) ln1 output of the previous token (time-mix token shift).
    ffn_shift: (L, B, C) ln2 output of the previous token (channel-mix token shift).
    wkv: (L, B, H, N, N) float32 WKV matrix per head, rows indexed by value and columns by key
        (RWKV-LM's and the `rwkv` package's layout).
    """

    att_shift: Tensor = state_field(fill=0.0)
    ffn_shift: Tensor = state_field(fill=0.0)
    wkv: Tensor = state_field(fill=0.0, fp32=True)

    @classmethod
    def fresh_for(
        cls, n_layer: int, batch: int, n_embd: int, head_size: int, device=None, dtype=torch.float32
    ) -> RWKV7State:
        H = n_embd // head_size
        shift = (n_layer, batch, n_embd)
        shapes = {"att_shift": shift, "ffn_shift": shift, "wkv": (n_layer, batch, H, head_size, head_size)}
        return cls.fresh(shapes, device=device, dtype=dtype)
