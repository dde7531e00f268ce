"""Analytic forward FLOPs of RWKV-4 per token: what the MFU report and the model summary count.

Per token, with C n_embd, A dim_att, F dim_ffn, V vocab_size, L n_layer:

    matmuls  2 · (L · (3·C·A + A·C + C·F + C·C + F·C) + C·V)
             time-mix key, value, receptance (C→A) and output (A→C); channel-mix key (C→F),
             receptance (C→C) and value (F→C); the head (C→V). One multiply and one add per weight.
    WKV      WKV_OPS_PER_CHANNEL · L · A
             the recurrence's elementwise work per channel (listed below), an exp counting as one.

Not counted (each O(C) per layer per token, under 0.1% of the total at C = 768): the embedding
lookup, layer norms, token-shift mixing, sigmoid, squared ReLU and the gating products. The
backward does twice the forward's matmul work, so a training step is 3 × these figures per token
(`training.throughput`), not counting segmented BPTT's recomputation (useful work only).
"""

from __future__ import annotations

from rwkv_infctx.model.config import RWKV4Config

WKV_OPS_PER_CHANNEL = 23
"""Elementwise ops per channel per token of the WKV-4 forward (ops/wkv4/reference.py), per step t:

output (12):  ww = u + k;  p = max(pp, ww);  e1 = exp(pp - p);  e2 = exp(ww - p);
              y = (e1·aa + e2·v) / (e1·bb + e2)
state (11):   ww = w + pp;  p = max(ww, k);  e1 = exp(ww - p);  e2 = exp(k - p);
              aa = e1·aa + e2·v;  bb = e1·bb + e2
"""


def matmul_weights(cfg: RWKV4Config) -> int:
    """Weights used in a matrix product per token: every Linear of the blocks, and the head."""
    C, A, Fd, V = cfg.n_embd, cfg.dim_att, cfg.dim_ffn, cfg.vocab_size
    per_layer = 3 * C * A + A * C + C * Fd + C * C + Fd * C
    return cfg.n_layer * per_layer + C * V


def matmul_flops_per_token(cfg: RWKV4Config) -> float:
    """2 FLOPs (multiply, add) per matmul weight."""
    return 2.0 * matmul_weights(cfg)


def wkv_flops_per_token(cfg: RWKV4Config) -> float:
    """The WKV recurrence's elementwise FLOPs over all layers."""
    return float(WKV_OPS_PER_CHANNEL * cfg.n_layer * cfg.dim_att)


def forward_flops_per_token(cfg: RWKV4Config) -> float:
    """Forward FLOPs per token: matmuls plus the WKV recurrence (module doc)."""
    return matmul_flops_per_token(cfg) + wkv_flops_per_token(cfg)
