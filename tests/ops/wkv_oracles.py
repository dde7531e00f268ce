"""Independent WKV-4 oracles for tests: the naive definition and autograd of the log-stable loop."""

from __future__ import annotations

import torch
from torch import Tensor


def wkv4_naive(time_decay: Tensor, time_first: Tensor, k: Tensor, v: Tensor, A0: Tensor, B0: Tensor):
    """The textbook recurrence over true numerator/denominator (no log-stable trick). fp64 only."""
    w = -torch.exp(time_decay)
    A, B = A0, B0
    ys = []
    for t in range(k.shape[1]):
        ek = torch.exp(k[:, t])
        euk = torch.exp(time_first + k[:, t])
        ys.append((A + euk * v[:, t]) / (B + euk))
        A = torch.exp(w) * A + ek * v[:, t]
        B = torch.exp(w) * B + ek
    return torch.stack(ys, 1), A, B


def wkv4_logstable_autograd(time_decay, time_first, k, v, aa, bb, pp):
    """The log-stable loop written as plain tensor ops, differentiated by autograd."""
    w = -torch.exp(time_decay)
    ys = []
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = time_first + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        ys.append((e1 * aa + e2 * vt) / (e1 * bb + e2))
        ww = w + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa, bb, pp = e1 * aa + e2 * vt, e1 * bb + e2, p
    return torch.stack(ys, 1), aa, bb, pp


def random_wkv_inputs(B: int, T: int, C: int, dtype=torch.float64, seed: int = 0):
    """Realistic inputs: k, v ~ N(0,1), time_decay ~ U(-5,3), time_first ~ U(-2,1), a carried state."""
    g = torch.Generator().manual_seed(seed)
    time_decay = torch.rand(C, generator=g, dtype=dtype) * 8 - 5
    time_first = torch.rand(C, generator=g, dtype=dtype) * 3 - 2
    k = torch.randn(B, T, C, generator=g, dtype=dtype)
    v = torch.randn(B, T, C, generator=g, dtype=dtype)
    # a state as a previous segment would leave it: aa signed, bb > 0, pp a recent key-sized max
    pp = torch.randn(B, C, generator=g, dtype=dtype) + 1.0
    bb = torch.rand(B, C, generator=g, dtype=dtype) * 3 + 0.5
    aa = torch.randn(B, C, generator=g, dtype=dtype) * bb
    return time_decay, time_first, k, v, aa, bb, pp
