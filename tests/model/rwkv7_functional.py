"""An independent float64 RWKV-7 forward, written from the spec sheet's block math (§1) as plain
functions of a state dict: no code shared with `rwkv_infctx.model.rwkv7` or `ops/wkv7`.

The WKV state is updated in matrix form, S ← S·diag(d) − (S κ̂)(a ⊙ κ̂)ᵀ + v kᵀ, one token at a time;
autograd through it gives the reference gradients. One sequence (no batch), from a fresh state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _ln(x: Tensor, sd: dict[str, Tensor], name: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _previous(x: Tensor) -> Tensor:
    """Each row's predecessor (zeros before the first)."""
    return torch.cat([torch.zeros_like(x[:1]), x[:-1]])


def _wkv(r, w, k, v, kk, a, H: int) -> Tensor:
    T, C = r.shape
    N = C // H
    S = torch.zeros(H, N, N, dtype=r.dtype)
    ys = []
    for t in range(T):
        d = torch.exp(-torch.exp(w[t])).view(H, 1, N)
        kh, vh, rh = k[t].view(H, N, 1), v[t].view(H, N, 1), r[t].view(H, N, 1)
        kkh, ah = kk[t].view(H, N, 1), a[t].view(H, N, 1)
        S = S * d - (S @ kkh) @ (ah * kkh).transpose(1, 2) + vh @ kh.transpose(1, 2)
        ys.append((S @ rh).view(C))
    return torch.stack(ys)


def _time_mix(x: Tensor, sd: dict[str, Tensor], p: str, H: int, v_first: Tensor | None):
    T, C = x.shape
    N = C // H
    delta = _previous(x) - x
    xr, xw, xk, xv, xa, xg = (
        x + delta * sd[p + n].view(C) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
    )
    r = xr @ sd[p + "receptance.weight"].T
    k = xk @ sd[p + "key.weight"].T
    v = xv @ sd[p + "value.weight"].T
    w = -F.softplus(-(sd[p + "w0"].view(C) + torch.tanh(xw @ sd[p + "w1"]) @ sd[p + "w2"])) - 0.5
    a = torch.sigmoid(sd[p + "a0"].view(C) + xa @ sd[p + "a1"] @ sd[p + "a2"])
    if v_first is None:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(sd[p + "v0"].view(C) + xv @ sd[p + "v1"] @ sd[p + "v2"])
    g = torch.sigmoid(xg @ sd[p + "g1"]) @ sd[p + "g2"]
    kk = (k * sd[p + "k_k"].view(C)).view(T, H, N)
    kk = (kk / kk.norm(dim=-1, keepdim=True).clamp_min(1e-12)).view(T, C)
    k = k * (1 + (a - 1) * sd[p + "k_a"].view(C))
    y = _wkv(r, w, k, v, kk, a, H).view(T, H, N)
    y = (y - y.mean(-1, keepdim=True)) / torch.sqrt(y.var(-1, unbiased=False, keepdim=True) + 64e-5)
    y = y.reshape(T, C) * sd[p + "ln_x.weight"] + sd[p + "ln_x.bias"]
    bonus = ((r * k).view(T, H, N) * sd[p + "r_k"]).sum(-1, keepdim=True) * v.view(T, H, N)
    return ((y + bonus.view(T, C)) * g) @ sd[p + "output.weight"].T, v_first


def logits(sd: dict[str, Tensor], tokens: list[int], n_head: int) -> Tensor:
    """(T, V) logits of one sequence from a fresh state."""
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    x = _ln(sd["emb.weight"][torch.tensor(tokens)], sd, "blocks.0.ln0")
    v_first = None
    for layer in range(n_layer):
        p = f"blocks.{layer}."
        out, v_first = _time_mix(_ln(x, sd, p + "ln1"), sd, p + "att.", n_head, v_first)
        x = x + out
        z = _ln(x, sd, p + "ln2")
        zk = z + (_previous(z) - z) * sd[p + "ffn.x_k"].view(-1)
        x = x + torch.relu(zk @ sd[p + "ffn.key.weight"].T) ** 2 @ sd[p + "ffn.value.weight"].T
    return _ln(x, sd, "ln_out") @ sd["head.weight"].T
