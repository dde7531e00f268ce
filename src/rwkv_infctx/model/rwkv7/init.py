"""RWKV-LM `train_temp`'s RWKV-7 initialisation for models trained from scratch.

Per layer l of L (r01 = l/(L−1), r10 = 1 − l/L), channel n of C, head size N:
- lerps x_r, x_w, x_k, x_v, x_a, x_g = 1 − (n/C)^(p·r10), p = .2, .9, .7, .7, .9, .2; ffn.x_k with
  p·r10 replaced by r10⁴;
- w0 = −6 + 6·(n/(C−1))^(1 + r01^0.3) + 0.5 + 2.5·zz, a0 = −0.19 + 0.3·zz + 0.4·lin,
  v0 = 0.73 − 0.4·lin, k_k = 0.71 − 0.1·lin, k_a = 1.02, r_k = −0.04, where lin = n/(C−1) − ½ and
  zz is the signed square of a ramp from −1 to 1 across each head;
- LoRA factors: the first (C, D) zero, the second (D, C) orthogonal with gain 0.1 (times
  √(rows/cols) where rows > cols);
- matrices: orthogonal with gain 1; att.key gain 0.1; att.output and ffn.value zero; head gain
  0.5·√(V/C) (0.5 when V ≤ C); embedding uniform in ±1e-4;
- LayerNorms weight 1, bias 0; ln_x weight ((l+1)/L)^0.7, bias 0.
Deterministic for a given seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rwkv_infctx.model.rwkv7.model import RWKV7

EMBEDDING_RANGE = 1e-4
LERP_POWERS = {"x_r": 0.2, "x_w": 0.9, "x_k": 0.7, "x_v": 0.7, "x_a": 0.9, "x_g": 0.2}
MATRIX_GAINS = {".att.key.": 0.1, ".att.output.": 0.0, ".ffn.value.": 0.0}
LORA_SECOND_FACTORS = ("w2", "a2", "v2", "g2")


def _channel_curves(C: int, N: int) -> tuple[Tensor, Tensor, Tensor]:
    """(n/C, lin = n/(C−1) − ½, zz) over the channels n, in float64."""
    n = torch.arange(C, dtype=torch.float64)
    ramp = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    return n / C, n / (C - 1) - 0.5, ramp * ramp.abs()


def _layer_values(model: RWKV7, layer: int) -> dict[str, Tensor]:
    """The vectors of one layer (lerps, w0, a0, v0, k_k, k_a, r_k, ln_x), keyed by parameter name."""
    cfg = model.cfg
    C, N, L = cfg.n_embd, cfg.head_size, cfg.n_layer
    r01 = layer / (L - 1) if L > 1 else 0.0
    r10 = 1.0 - layer / L
    ddd, lin, zz = _channel_curves(C, N)
    n = torch.arange(C, dtype=torch.float64)
    p = f"blocks.{layer}."
    out = {p + f"att.{name}": 1.0 - ddd.pow(power * r10) for name, power in LERP_POWERS.items()}
    out[p + "att.w0"] = -6 + 6 * (n / (C - 1)) ** (1 + r01**0.3) + 0.5 + 2.5 * zz
    out[p + "att.a0"] = -0.19 + 0.3 * zz + 0.4 * lin
    out[p + "att.v0"] = 0.73 - 0.4 * lin
    out[p + "att.k_k"] = 0.71 - 0.1 * lin
    out[p + "att.k_a"] = torch.full((C,), 1.02, dtype=torch.float64)
    out[p + "att.r_k"] = torch.full((cfg.n_head, N), -0.04, dtype=torch.float64)
    out[p + "att.ln_x.weight"] = torch.full((C,), ((layer + 1) / L) ** 0.7, dtype=torch.float64)
    out[p + "ffn.x_k"] = 1.0 - ddd.pow(r10**4)
    return out


def _orthogonal(shape: torch.Size, gain: float, gen: torch.Generator) -> Tensor:
    return nn.init.orthogonal_(torch.empty(shape), gain=gain, generator=gen)


def _matrix_value(name: str, shape: torch.Size, vocab: int, n_embd: int, gen: torch.Generator) -> Tensor:
    """A 2-D weight: embedding, head, a LoRA factor or a projection."""
    if name == "emb.weight":
        return torch.empty(shape).uniform_(-EMBEDDING_RANGE, EMBEDDING_RANGE, generator=gen)
    if name == "head.weight":
        return _orthogonal(shape, 0.5 * math.sqrt(vocab / n_embd) if vocab > n_embd else 0.5, gen)
    leaf = name.rsplit(".", 1)[-1]
    if leaf in LORA_SECOND_FACTORS:
        rows, cols = shape
        return _orthogonal(shape, 0.1 * (math.sqrt(rows / cols) if rows > cols else 1.0), gen)
    if leaf in ("w1", "a1", "v1", "g1"):
        return torch.zeros(shape)
    gain = next((g for key, g in MATRIX_GAINS.items() if key in name), 1.0)
    return torch.zeros(shape) if gain == 0 else _orthogonal(shape, gain, gen)


@torch.no_grad()
def init_weights(model: RWKV7, seed: int = 0) -> RWKV7:
    """Overwrite every parameter (and layer 0's unused v0/v1/v2) with train_temp's init, in place."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    vectors: dict[str, Tensor] = {}
    for layer in range(cfg.n_layer):
        vectors.update(_layer_values(model, layer))
    for name, t in model.state_dict(keep_vars=True).items():
        if name in vectors:
            value = vectors[name].reshape(t.shape)
        elif ".ln" in name or name.startswith("ln_"):
            value = torch.ones(t.shape) if name.endswith("weight") else torch.zeros(t.shape)
        elif t.dim() == 2:
            value = _matrix_value(name, t.shape, cfg.vocab_size, cfg.n_embd, gen)
        else:
            raise AssertionError(f"init: no rule for {name} {tuple(t.shape)}")
        t.copy_(value.to(t.dtype))
    return model
