"""RWKV-4's recurrent state: per layer, two token-shift vectors and the WKV (aa, bb, pp)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rwkv_infctx.ops.wkv4 import FRESH_MAX, WKV4State
from rwkv_infctx.state import RecurrentState, state_field


@dataclass(frozen=True)
class RWKV4State(RecurrentState):
    """Layer-major state of an RWKV-4 model. L layers, B batch rows, C n_embd, A dim_att.

    att_shift: (L, B, C) last ln1 output of the previous token (time-mix token shift).
    ffn_shift: (L, B, C) last ln2 output of the previous token (channel-mix token shift).
    wkv_aa, wkv_bb, wkv_pp: (L, B, A) float32 WKV numerator, denominator and running max.
    """

    att_shift: Tensor = state_field(fill=0.0)
    ffn_shift: Tensor = state_field(fill=0.0)
    wkv_aa: Tensor = state_field(fill=0.0, fp32=True)
    wkv_bb: Tensor = state_field(fill=0.0, fp32=True)
    wkv_pp: Tensor = state_field(fill=FRESH_MAX, fp32=True)

    @classmethod
    def fresh_for(cls, n_layer: int, batch: int, n_embd: int, dim_att: int, device=None, dtype=torch.float32):
        shift, wkv = (n_layer, batch, n_embd), (n_layer, batch, dim_att)
        shapes = {"att_shift": shift, "ffn_shift": shift, "wkv_aa": wkv, "wkv_bb": wkv, "wkv_pp": wkv}
        return cls.fresh(shapes, device=device, dtype=dtype)

    def wkv(self, layer: int) -> WKV4State:
        return WKV4State(self.wkv_aa[layer], self.wkv_bb[layer], self.wkv_pp[layer])
