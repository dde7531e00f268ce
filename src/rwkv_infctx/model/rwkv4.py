"""The RWKV-4 ("v4neo") language model with an explicit recurrent state.

Shape legend: B batch, T time, C n_embd, A dim_att, F dim_ffn, V vocab_size, L n_layer.
Module names match RWKV-LM's, so `state_dict()` keys are RWKV-LM's `.pth` keys.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from rwkv_infctx.model.config import RWKV4Config
from rwkv_infctx.model.state import RWKV4State
from rwkv_infctx.ops.wkv4 import WKV4State, wkv4


def token_shift(x_BTC: Tensor, last_BC: Tensor) -> Tensor:
    """x shifted one step later in time, with `last` (the previous segment's final x) in front."""
    return torch.cat([last_BC.unsqueeze(1).to(x_BTC.dtype), x_BTC[:, :-1]], dim=1)


def mix(x: Tensor, xx: Tensor, ratio: Tensor) -> Tensor:
    """Interpolate between the current token and the previous one, per channel."""
    return x * ratio + xx * (1 - ratio)


class TimeMix(nn.Module):
    """Time-mix: token shift, key/value/receptance projections, WKV recurrence, output projection."""

    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        C, A = cfg.n_embd, cfg.dim_att
        self.time_decay = nn.Parameter(torch.zeros(A))
        self.time_first = nn.Parameter(torch.zeros(A))
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)
        self.wkv_backend, self.wkv_self_check = cfg.wkv_backend, cfg.wkv_self_check

    def forward(
        self, x_BTC: Tensor, shift_BC: Tensor, wkv_state: WKV4State
    ) -> tuple[Tensor, Tensor, WKV4State]:
        xx = token_shift(x_BTC, shift_BC)
        k_BTA = self.key(mix(x_BTC, xx, self.time_mix_k))
        v_BTA = self.value(mix(x_BTC, xx, self.time_mix_v))
        r_BTA = torch.sigmoid(self.receptance(mix(x_BTC, xx, self.time_mix_r)))
        y_BTA, wkv_state = wkv4(
            self.time_decay, self.time_first, k_BTA, v_BTA, wkv_state, self.wkv_backend, self.wkv_self_check
        )
        return self.output(r_BTA * y_BTA), x_BTC[:, -1].clone(), wkv_state


class ChannelMix(nn.Module):
    """Channel-mix: token shift, squared-ReLU key, value, sigmoid receptance gate."""

    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        C, Fd = cfg.n_embd, cfg.dim_ffn
        self.time_mix_k = nn.Parameter(torch.ones(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.ones(1, 1, C))
        self.key = nn.Linear(C, Fd, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(Fd, C, bias=False)

    def forward(self, x_BTC: Tensor, shift_BC: Tensor) -> tuple[Tensor, Tensor]:
        xx = token_shift(x_BTC, shift_BC)
        k_BTF = torch.square(torch.relu(self.key(mix(x_BTC, xx, self.time_mix_k))))
        r_BTC = torch.sigmoid(self.receptance(mix(x_BTC, xx, self.time_mix_r)))
        return r_BTC * self.value(k_BTF), x_BTC[:, -1].clone()


class Block(nn.Module):
    """One residual block: ln1 → time-mix, ln2 → channel-mix (ln0 on the embedding in block 0)."""

    def __init__(self, cfg: RWKV4Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg)
        self.ffn = ChannelMix(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(
        self, x: Tensor, att_shift: Tensor, ffn_shift: Tensor, wkv_state: WKV4State, need_output: bool = True
    ) -> tuple[Tensor | None, Tensor, Tensor, WKV4State]:
        """Returns (x, new_att_shift, new_ffn_shift, new_wkv_state).

        With need_output=False (the last block of a state-only pass) the channel-mix matmuls are
        skipped: the next state needs only ln2's last row.
        """
        if self.layer_id == 0:
            x = self.ln0(x)
        att_out, att_shift, wkv_state = self.att(self.ln1(x), att_shift, wkv_state)
        x = x + self.drop(att_out)
        x_ln2 = self.ln2(x)
        if not need_output:
            return None, att_shift, x_ln2[:, -1].clone(), wkv_state
        ffn_out, ffn_shift = self.ffn(x_ln2, ffn_shift)
        return x + self.drop(ffn_out), att_shift, ffn_shift, wkv_state


class RWKV4(nn.Module):
    """RWKV-4 language model: `forward(tokens, state) -> (logits, new_state)`.

    Training (`training.segments`) uses `hidden(tokens, state) -> (h, new_state)` and `head`
    separately, so that the logits of a long segment never exist all at once.
    """

    def __init__(self, cfg: RWKV4Config):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def fresh_state(self, batch_size: int, device=None) -> RWKV4State:
        """The state before the first token: zero shifts, empty WKV (pp = -1e38)."""
        p = self.emb.weight
        return RWKV4State.fresh_for(
            self.cfg.n_layer, batch_size, self.cfg.n_embd, self.cfg.dim_att,
            device=device or p.device, dtype=p.dtype,
        )  # fmt: skip

    def forward(
        self, tokens_BT: Tensor, state: RWKV4State | None = None, compute_logits: bool = True
    ) -> tuple[Tensor | None, RWKV4State]:
        """Logits (B, T, V) for every position and the state after the last token.

        Any split of a sequence, passing the returned state to the next call, gives the same
        logits and final state as one call. With compute_logits=False only the new state is
        computed (no head, no last channel-mix matmuls) and the logits are None.
        """
        h_BTC, new_state = self.hidden(tokens_BT, state, state_only=not compute_logits)
        return (None if h_BTC is None else self.head(h_BTC)), new_state

    def hidden(
        self,
        tokens_BT: Tensor,
        state: RWKV4State | None = None,
        state_only: bool = False,
        grad_cp: bool = False,
    ) -> tuple[Tensor | None, RWKV4State]:
        """The final hidden states (B, T, C) after ln_out (what `self.head` reads) and the new state.

        `self.head(h)` of any rows and columns of h gives their logits, so a caller may compute the
        logits in pieces. state_only=True skips ln_out and the last block's channel-mix matmuls
        (the new state does not need them) and returns None for h. grad_cp=True, when grad is
        enabled, checkpoints each block: its activations are recomputed in backward (with the
        forward's RNG state, so dropout draws the same masks).
        """
        B, T = tokens_BT.shape
        if T == 0:
            raise ValueError("forward needs at least one token per row (T = 0)")
        if state is None:
            state = self.fresh_state(B, tokens_BT.device)
        checkpoint = grad_cp and torch.is_grad_enabled()
        x = self.emb(tokens_BT)
        att_shifts, ffn_shifts, wkv_states = [], [], []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            args = (x, state.att_shift[i], state.ffn_shift[i], state.wkv(i), not state_only or i < last)
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
            x, att_shift, ffn_shift, wkv_state = out
            att_shifts.append(att_shift)
            ffn_shifts.append(ffn_shift)
            wkv_states.append(wkv_state)
        new_state = RWKV4State(
            torch.stack(att_shifts),
            torch.stack(ffn_shifts),
            *(torch.stack(ts) for ts in zip(*wkv_states, strict=True)),
        )
        return (None if state_only else self.ln_out(x)), new_state

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
