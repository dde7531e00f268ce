"""RWKV-LM's v4 initialisation for models trained from scratch.

- Matrices: orthogonal with gain sqrt(rows / cols) when rows > cols, else 1; zero for att.key,
  att.receptance, att.output, ffn.value and ffn.receptance; head at 0.5 · that gain.
- Embedding: uniform in [-1e-4, 1e-4].
- LayerNorms: weight 1, bias 0.
- time_decay, time_first and the time_mix curves depend on the layer's depth and the channel.
Deterministic for a given seed.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rwkv_infctx.model.rwkv4 import RWKV4

ZERO_MATRICES = (".att.key.", ".att.receptance.", ".att.output.", ".ffn.value.", ".ffn.receptance.")
EMBEDDING_RANGE = 1e-4


def _depth_ratios(layer_id: int, n_layer: int) -> tuple[float, float]:
    """(0 → 1 over the layers, 1 → almost 0 over the layers). A single layer counts as the first."""
    ratio_0_to_1 = layer_id / (n_layer - 1) if n_layer > 1 else 0.0
    return ratio_0_to_1, 1.0 - layer_id / n_layer


def _time_curves(model: RWKV4) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    C, A = cfg.n_embd, cfg.dim_att
    channel = torch.arange(C, dtype=torch.float64) / C  # 0 .. (C-1)/C
    head = torch.arange(A, dtype=torch.float64) / max(A - 1, 1)  # 0 .. 1
    zigzag = ((torch.arange(A) + 1) % 3 - 1).to(torch.float64) * 0.5
    out: dict[str, torch.Tensor] = {}
    for i in range(cfg.n_layer):
        up, down = _depth_ratios(i, cfg.n_layer)
        p = f"blocks.{i}."
        out[p + "att.time_decay"] = -5 + 8 * head ** (0.7 + 1.3 * up)
        out[p + "att.time_first"] = torch.full((A,), math.log(0.3), dtype=torch.float64) + zigzag
        out[p + "att.time_mix_k"] = channel.pow(down).view(1, 1, C)
        out[p + "att.time_mix_v"] = (channel.pow(down) + 0.3 * up).view(1, 1, C)
        out[p + "att.time_mix_r"] = channel.pow(0.5 * down).view(1, 1, C)
        out[p + "ffn.time_mix_k"] = channel.pow(down).view(1, 1, C)
        out[p + "ffn.time_mix_r"] = channel.pow(down).view(1, 1, C)
    return out


@torch.no_grad()
def init_weights(model: RWKV4, seed: int = 0) -> RWKV4:
    """Overwrite every parameter of `model` with RWKV-LM's v4 initialisation, in place."""
    gen = torch.Generator().manual_seed(seed)
    curves = _time_curves(model)
    for name, p in model.named_parameters():
        if name in curves:
            value = curves[name]
        elif ".ln" in name or name.startswith("ln_"):
            value = torch.ones(p.shape) if name.endswith("weight") else torch.zeros(p.shape)
        elif name == "emb.weight":
            value = torch.empty(p.shape).uniform_(-EMBEDDING_RANGE, EMBEDDING_RANGE, generator=gen)
        elif any(z in name for z in ZERO_MATRICES):
            value = torch.zeros(p.shape)
        else:
            rows, cols = p.shape
            gain = math.sqrt(rows / cols) if rows > cols else 1.0
            if name == "head.weight":
                gain *= 0.5
            value = nn.init.orthogonal_(torch.empty(p.shape), gain=gain, generator=gen)
        p.copy_(value.to(p.dtype))
    return model
