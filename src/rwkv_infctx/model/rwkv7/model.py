"""The RWKV-7 ("x070", Goose) language model with an explicit recurrent state.

Shape legend: B batch, T time, C n_embd, H heads, N head size, F dim_ffn, V vocab_size, L n_layer.
Module and parameter names match RWKV-LM's (`train_temp`), so `state_dict()` keys are RWKV-LM's
x070 `.pth` keys (RWKV-LM `RWKV-v7/train_temp/src/model.py`).

Per token and layer (x = ln1(h), Δ = x_{t-1} − x_t, μ = 1 means the previous token):
    x_* = x + Δ·μ_*                              six lerps, * ∈ r, w, k, v, a, g
    r, k, v = receptance(x_r), key(x_k), value(x_v)
    w = −softplus(−(w0 + tanh(x_w W1) W2)) − 0.5  decay d = exp(−exp(w)) ∈ (0.545, 1), float32
    a = σ(a0 + x_a A1 A2)                         in-context learning rate
    v ← v + (v_first − v)·σ(v0 + x_v V1 V2)       value residual (layer 0 defines v_first := v)
    g = σ(x_g G1) G2                              output gate
    κ̂ = normalize_per_head(k ⊙ k_k);  k ← k ⊙ (1 + (a − 1) ⊙ k_a)
    y = WKV-7(r, w, k, v, −κ̂, κ̂ ⊙ a)              ops/wkv7: S ← S(diag(d) − κ̂(a⊙κ̂)ᵀ) + v kᵀ
    o = GroupNorm_H(y) + (Σ_head r ⊙ k ⊙ r_k)·v     per-head bonus
    h ← h + output(o ⊙ g);  h ← h + value(relu(key(z + Δ'·μ'))²) with z = ln2(h)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from rwkv_infctx.model.rwkv4 import token_shift
from rwkv_infctx.model.rwkv7.config import RWKV7Config
from rwkv_infctx.model.rwkv7.initial_state import InitialState
from rwkv_infctx.model.rwkv7.state import RWKV7State
from rwkv_infctx.ops.wkv7 import wkv7

GROUP_NORM_EPS = 64e-5
"""ln_x's epsilon: RWKV-LM's 1e-5 · head_size_divisor² with divisor 8."""
LERPS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
VALUE_RESIDUAL = ("v0", "v1", "v2")


def lerp_vector(C: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, 1, C))


def lora_factors(C: int, D: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(C, D) and (D, C) factors, applied as x @ W1 @ W2 (RWKV-LM stores them that way round)."""
    return nn.Parameter(torch.zeros(C, D)), nn.Parameter(torch.zeros(D, C))


class TimeMix(nn.Module):
    """Time-mix: six lerps, projections, decay/ICLR/value/gate LoRAs, WKV-7, GroupNorm, bonus, output."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id, self.n_head, self.wkv_backend = layer_id, H, cfg.wkv_backend
        self.wkv_self_check = cfg.wkv_self_check
        for name in LERPS:
            setattr(self, name, lerp_vector(C))
        self.w0 = lerp_vector(C)
        self.w1, self.w2 = lora_factors(C, cfg.d_decay_lora)
        self.a0 = lerp_vector(C)
        self.a1, self.a2 = lora_factors(C, cfg.d_aaa_lora)
        v0 = lerp_vector(C)
        v1, v2 = lora_factors(C, cfg.d_mv_lora)
        for name, p in zip(VALUE_RESIDUAL, (v0, v1, v2), strict=True):
            if layer_id == 0:  # kept for RWKV-LM's key set, never read: layer 0 defines v_first
                self.register_buffer(name, p.data)
            else:
                setattr(self, name, p)
        self.g1, self.g2 = lora_factors(C, cfg.d_gate_lora)
        self.k_k = lerp_vector(C)
        self.k_a = lerp_vector(C)
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=GROUP_NORM_EPS)

    def forward(
        self, x_BTC: Tensor, shift_BC: Tensor, wkv_BHNN: Tensor, v_first_BTC: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (output, new att shift, new WKV state, v_first)."""
        B, T, C = x_BTC.shape
        H = self.n_head
        delta = token_shift(x_BTC, shift_BC) - x_BTC
        xr, xw, xk, xv, xa, xg = (x_BTC + delta * getattr(self, name) for name in LERPS)
        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        fp = torch.promote_types(x_BTC.dtype, torch.float32)  # the decay is never below float32
        w_raw = self.w0.to(fp) + (torch.tanh(xw @ self.w1) @ self.w2).to(fp)
        w = -F.softplus(-w_raw) - 0.5
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        if self.layer_id == 0:
            v_first_BTC = v
        else:
            v = v + (v_first_BTC - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        kk = F.normalize((k * self.k_k).view(B, T, H, -1), dim=-1, p=2.0)
        k = k * (1 + (a - 1) * self.k_a)
        heads = (B, T, H, -1)
        a_BTHN = a.view(heads)
        y, wkv_BHNN = wkv7(
            r.view(heads), w.view(heads), k.view(heads), v.view(heads), -kk, kk * a_BTHN, wkv_BHNN,
            self.wkv_backend, self.wkv_self_check,
        )  # fmt: skip
        y = self.ln_x(y.reshape(B * T, C)).view(B, T, C)
        bonus = (r.view(heads) * k.view(heads) * self.r_k).sum(dim=-1, keepdim=True) * v.view(heads)
        out = self.output((y + bonus.view(B, T, C)) * g)
        return out, x_BTC[:, -1].clone(), wkv_BHNN, v_first_BTC


class ChannelMix(nn.Module):
    """Channel-mix: token shift, one lerp, squared-ReLU key, value (no receptance gate)."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        C = cfg.n_embd
        self.x_k = lerp_vector(C)
        self.key = nn.Linear(C, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, C, bias=False)

    def forward(self, x_BTC: Tensor, shift_BC: Tensor) -> tuple[Tensor, Tensor]:
        xk = x_BTC + (token_shift(x_BTC, shift_BC) - x_BTC) * self.x_k
        return self.value(torch.relu(self.key(xk)) ** 2), x_BTC[:, -1].clone()


class Block(nn.Module):
    """One residual block: ln1 → time-mix, ln2 → channel-mix (ln0 on the embedding in block 0)."""

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(
        self,
        x: Tensor,
        att_shift: Tensor,
        ffn_shift: Tensor,
        wkv: Tensor,
        v_first: Tensor | None,
        need_output: bool = True,
    ) -> tuple[Tensor | None, Tensor, Tensor, Tensor, Tensor]:
        """Returns (x, att_shift, ffn_shift, wkv, v_first); x is None when need_output is False
        (the last block of a state-only pass skips the channel-mix matmuls)."""
        if self.layer_id == 0:
            x = self.ln0(x)
        att_out, att_shift, wkv, v_first = self.att(self.ln1(x), att_shift, wkv, v_first)
        x = x + self.drop(att_out)
        x_ln2 = self.ln2(x)
        if not need_output:
            return None, att_shift, x_ln2[:, -1].clone(), wkv, v_first
        ffn_out, ffn_shift = self.ffn(x_ln2, ffn_shift)
        return x + self.drop(ffn_out), att_shift, ffn_shift, wkv, v_first


class RWKV7(nn.Module):
    """RWKV-7 language model: `forward(tokens, state) -> (logits, new_state)`.

    The same contract as `RWKV4` (`fresh_state`, `hidden`, `head`; see training/segments.py).
    v_first (layer 0's value) is not state: it is recomputed for every call from the same tokens,
    and reaches earlier segments only through layer 0's carried att_shift.
    `init_state` (state tuning, `training/tuning/state.py`): when set, the learnt WKV state that
    every fresh state starts from; None: zeros.
    """

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.init_state: InitialState | None = None

    def fresh_state(self, batch_size: int, device=None) -> RWKV7State:
        """The state before the first token: zero shifts, and zero WKV matrices or `init_state`'s."""
        p = self.emb.weight
        state = RWKV7State.fresh_for(
            self.cfg.n_layer, batch_size, self.cfg.n_embd, self.cfg.head_size,
            device=device or p.device, dtype=p.dtype,
        )  # fmt: skip
        if self.init_state is None:
            return state
        return RWKV7State(
            state.att_shift, state.ffn_shift, self.init_state.batch(batch_size, state.wkv.device)
        )

    def forward(
        self, tokens_BT: Tensor, state: RWKV7State | None = None, compute_logits: bool = True
    ) -> tuple[Tensor | None, RWKV7State]:
        """Logits (B, T, V) for every position and the state after the last token (see RWKV4)."""
        h_BTC, new_state = self.hidden(tokens_BT, state, state_only=not compute_logits)
        return (None if h_BTC is None else self.head(h_BTC)), new_state

    def hidden(
        self,
        tokens_BT: Tensor,
        state: RWKV7State | None = None,
        state_only: bool = False,
        grad_cp: bool = False,
    ) -> tuple[Tensor | None, RWKV7State]:
        """The hidden states (B, T, C) after ln_out and the new state; see `RWKV4.hidden`."""
        B, T = tokens_BT.shape
        if T == 0:
            raise ValueError("forward needs at least one token per row (T = 0)")
        if state is None:
            state = self.fresh_state(B, tokens_BT.device)
        checkpoint = grad_cp and torch.is_grad_enabled()
        x, v_first = self.emb(tokens_BT), None
        att_shifts, ffn_shifts, wkvs = [], [], []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            need_output = not state_only or i < last
            args = (x, state.att_shift[i], state.ffn_shift[i], state.wkv[i], v_first, need_output)
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, att_shift, ffn_shift, wkv, v_first = out
            att_shifts.append(att_shift)
            ffn_shifts.append(ffn_shift)
            wkvs.append(wkv)
        new_state = RWKV7State(torch.stack(att_shifts), torch.stack(ffn_shifts), torch.stack(wkvs))
        return (None if state_only else self.ln_out(x)), new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
