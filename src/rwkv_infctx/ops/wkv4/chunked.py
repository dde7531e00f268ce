"""WKV-4 chunked over T: the reference op's exact forward and backward with tensor ops per chunk.

Same op, interface and conventions as `reference.py` (read its docstring first); only the way it is
computed changes. Shape legend: B batch, T time, C channels, L chunk length, n = ceil(T/L) chunks.
Internally tensors are laid out (C, B, T): elementwise work is contiguous and the chunk products are
one GEMM per channel over all (batch, chunk) rows.

Forward. Inside a chunk (local index i, Lc tokens), from the carried state (aa0, bb0, pp0),

    y_i = num_i / den_i,  num_i = sum_{j<i} e^{(i-1-j)w + k_j} v_j + e^{u + k_i} v_i + e^{pp0 + i w} aa0

and den_i the same with v -> 1 and aa0 -> bb0.

Every exponent of row i is stabilised by m_i = max(pp_{t-1}, u + k_t), the reference's own per-step
max (pp_t is the reference's running max, so m_i bounds the row and is attained up to rounding). Row
Lc of the same lower-triangular (Lc+1, Lc) matrix, stabilised by pp at the chunk's end, is the state
the chunk hands on. Entry (r, j) is e^{D_rj + k_j - m_r} with D_rj = (r-1-j)·w, computed factored as
E_rj · b_j · a_r with E = e^D (per channel, shared by all rows), b_j = e^{k_j - K}, a_r = e^{K - m_r}
and K the chunk's largest key, so each chunk sum is a GEMM. The factors stay in range unless keys
inside one chunk spread by tens of nats; such groups of chunks fall back to forming every entry
e^{D + k - m} directly (clamped at the underflow threshold, since exp is slow on underflowing
inputs), like a masked softmax. The intra-chunk sums do not depend on the carried state: they are
computed first, then the state is carried across chunks (n multiply-adds), then the state and
own-token terms of every output are added in one vectorized pass.

pp_t = max(w + pp_{t-1}, k_t) is scanned sequentially with the reference's floating-point
operations (on the CPU through NumPy, whose per-call cost is lowest), so pp_T is bit-for-bit the
reference's and states are interchangeable between the two ops.

Backward: analytic, one autograd node. With g_num = gy/den and g_den = -g_num·y per output row
(the incoming gradient on the chunk's end state for row Lc, carried backwards across chunks), entry
(r, j) has exponent gradient dE_rj = P_rj (g_num_r v_j + g_den_r) and w-coefficient r-1-j. Column
sums give dk and dv, and sum_rj (r-1-j) dE_rj gives dw, each as one GEMM per channel against E or
(r-1-j)·E (never as a difference of large row and column moments, which loses digits). The
stabilisers m and the intermediate pp are constants: the outputs do not depend on them. The
residual gradient on pp_T, gpp - gaa·aa_T - gbb·bb_T, follows the reference's arg-max routing
(ties split in halves) as a reverse cumulative product of the per-step routing factors.

Memory: O(B·T·C) saved for backward and O(B·T·C + C·L²) temporaries in the factored form;
the direct form works in groups of chunks with O(B·C·L² + B·T·C) temporaries. No per-step graph.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor

from rwkv_infctx.ops.wkv4.reference import WKV4State

CHUNK_LEN = 16
"""Default tokens per chunk; chosen with bench/wkv4_cpu.py on 2 CPU cores (see bench/wkv4_cpu.md)."""

_EXP_FLOOR = {torch.float32: -87.0, torch.float64: -700.0}
"""Smallest exponent whose exp is still a normal number (fp32 min normal 1.2e-38, fp64 2.2e-308)."""

_FACTOR_LIMIT = {torch.float32: 40.0, torch.float64: 600.0}
"""Largest log of a row factor a_r = e^{K - m_r} for which a chunk is computed in factored form.

A factor that underflows (or an entry of E set to 0 below e^_EXP_FLOOR) then drops at most
e^(_EXP_FLOOR + limit) of a row whose largest entry is 1: < 5e-21 in fp32, < 1e-43 in fp64.
"""


def _without_autocast(fn):
    """Run an autograd.Function's forward/backward with autocast off on the tensors' device.

    Under autocast (trainer.precision: bf16-mixed) the chunk GEMMs would otherwise run in bf16 and
    the op would lose the digits its fp32 compute dtype keeps; the reference op uses no autocast ops.
    """

    @functools.wraps(fn)
    def wrapper(ctx, *args):
        device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(ctx, *args)

    return wrapper


def _compute_dtype(k: Tensor) -> torch.dtype:
    return torch.float64 if k.dtype == torch.float64 else torch.float32


def _running_max(pp0: Tensor, w: Tensor, k_tcb: Tensor) -> Tensor:
    """pp_t = max(w + pp_{t-1}, k_t) for t < T, (T, C, B), with the reference's operations."""
    T = k_tcb.shape[0]
    out = torch.empty_like(k_tcb)
    w = w[:, None].expand_as(pp0).contiguous()
    if k_tcb.device.type == "cpu":
        o, x, kn, wn = out.numpy(), pp0.contiguous().numpy(), k_tcb.numpy(), w.numpy()
        add, maximum = np.add, np.maximum
    else:
        o, x, kn, wn = out, pp0, k_tcb, w
        add, maximum = torch.add, torch.maximum
    for t in range(T):
        ot = o[t]
        add(wn, x, out=ot)  # the reference's `w + pp`
        maximum(ot, kn[t], out=ot)
        x = ot
    return out


def _exp(x: Tensor) -> Tensor:
    """exp(x) for exponents <= ~0 relative to a row maximum, in place: inputs below the underflow
    threshold are clamped (weight < 2e-38 against 1, far below rounding), which keeps exp off its slow
    path and the results out of the slow denormal range."""
    return x.clamp_(min=_EXP_FLOOR[x.dtype]).exp_()


def _to_cbt(x: Tensor, dt: torch.dtype) -> Tensor:
    """(B, T, C) -> a contiguous (C, B, T) copy in dt."""
    return torch.empty(x.shape[2], x.shape[0], x.shape[1], device=x.device, dtype=dt).copy_(
        x.permute(2, 0, 1)
    )


def _to_btc(x: Tensor, dt: torch.dtype) -> Tensor:
    """(C, B, T) -> a fresh contiguous (B, T, C) copy in dt."""
    return torch.empty(x.shape[1], x.shape[2], x.shape[0], device=x.device, dtype=dt).copy_(
        x.permute(1, 2, 0)
    )


class _Chunks:
    """Chunk boundaries and per-token bookkeeping for T tokens in chunks of L.

    Equal-length chunks are processed as groups (first chunk, number of chunks g, length Lc): all
    full chunks, then the shorter last one if T is not a multiple of L.
    """

    def __init__(self, T: int, L: int, device, dt):
        self.T, self.L = T, L
        self.starts = list(range(0, T, L))
        self.ends = [min(s + L, T) for s in self.starts]
        self.n = len(self.starts)
        pos = torch.arange(T, device=device)
        self.chunk_id = torch.div(pos, L, rounding_mode="floor")
        self.local = (pos - self.chunk_id * L).to(dt)  # index inside its chunk
        lens = [e - s for s, e in zip(self.starts, self.ends, strict=True)]
        self.lens = torch.tensor(lens, device=device).to(dt)  # (n,)
        self.last = torch.tensor([e - 1 for e in self.ends], device=device)
        full, rest = divmod(T, L)
        self.groups = [(0, full, L)] if full else []
        if rest:
            self.groups.append((full, 1, rest))

    def split(self, group: tuple[int, int, int]) -> list[tuple[int, int, int]]:
        """Sub-groups whose (C, B, g, Lc+1, Lc) temporaries hold at most max(B·C·L², 4·B·T·C) entries."""
        c0, g, Lc = group
        step = max(1, (4 * self.T) // (Lc * (Lc + 1)))
        return [(c, min(step, c0 + g - c), Lc) for c in range(c0, c0 + g, step)]


def _decay_exponents(w: Tensor, L: int) -> Tensor:
    """D (C, L+1, L): (r-1-j)·w below the diagonal (j < r), -inf elsewhere."""
    r = torch.arange(L + 1, device=w.device)[:, None]
    j = torch.arange(L, device=w.device)[None, :]
    D = (r - 1 - j).to(w.dtype)[None] * w[:, None, None]
    return D.masked_fill_((j >= r)[None], float("-inf"))


def _w_coef(L: int, device, dt) -> Tensor:
    """(L+1, L): the coefficient r-1-j of w in the exponent of entry (r, j) (0 where masked)."""
    r = torch.arange(L + 1, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return (r - 1 - j).clamp_min(0).to(dt)


class _Group:
    """g chunks of Lc tokens: their token slice, keys, values and per-row stabilisers."""

    def __init__(self, group: tuple[int, int, int], ch: _Chunks, k: Tensor, v: Tensor, m: Tensor, pp_end):
        self.c0, self.g, self.Lc = group
        t0 = self.c0 * ch.L
        self.ts = slice(t0, t0 + self.g * self.Lc)
        self.ends = slice(self.c0, self.c0 + self.g)
        self.k = self.chunks(k)  # (C, B, g, Lc)
        self.v = self.chunks(v)
        # Row r < Lc is stabilised by m of token r; row Lc (the chunk's end state) by pp at its end.
        self.m = self.ext(m, pp_end)  # (C, B, g, Lc+1)

    def chunks(self, x: Tensor) -> Tensor:
        """(..., T) -> (..., g, Lc) for this group's tokens."""
        return x[..., self.ts].unflatten(-1, (self.g, self.Lc))

    def ext(self, x: Tensor, end: Tensor) -> Tensor:
        """Per-token rows (..., T) and per-chunk end rows (..., n) -> (..., g, Lc+1)."""
        return torch.cat([self.chunks(x), end[..., self.ends, None]], -1)

    def factors(self, E: Tensor) -> bool:
        """Set up E_rj · b_j · a_r = e^{D_rj + k_j - m_r}; False where a_r would be too large."""
        K = self.k.amax(-1, keepdim=True)
        log_a = K - self.m
        if log_a.max().item() > _FACTOR_LIMIT[log_a.dtype]:
            return False
        self.a = _exp(log_a)  # (C, B, g, Lc+1)
        self.b = _exp(self.k - K)  # (C, B, g, Lc)
        self.E = E[:, : self.Lc + 1, : self.Lc]  # (C, Lc+1, Lc)
        return True

    def rows(self, x: Tensor, y: Tensor) -> Tensor:
        """Two (C, B, g, J) tensors -> (C, 2·B·g, J): the rows of one GEMM per channel."""
        return torch.stack([x, y], 1).flatten(1, 3)

    def unrows(self, x: Tensor) -> Tensor:
        """(C, 2·B·g, J) -> (C, 2, B, g, J)."""
        return x.unflatten(1, (2, -1, self.g))

    def entries(self, D: Tensor) -> Tensor:
        """P (C, B, g, Lc+1, Lc) = e^{D_rj + k_j - m_r} entry by entry (any spread of keys)."""
        P = torch.add(D[:, None, None, : self.Lc + 1, : self.Lc], self.k[..., None, :])
        return _exp(P.sub_(self.m[..., None]))  # -inf (masked) and underflowing entries clamped


def _intra_forward(ch: _Chunks, k, v, m, pp_end, D, E, intra, intra_end) -> None:
    """Each row's sums over its chunk's earlier tokens, (v-weighted, plain): intra (C, 2, B, T) for
    the outputs, intra_end (C, 2, B, n) for the chunks' end states."""
    for group in ch.groups:
        grp = _Group(group, ch, k, v, m, pp_end)
        if grp.factors(E):
            R = grp.unrows(torch.matmul(grp.rows(grp.b * grp.v, grp.b), grp.E.transpose(1, 2)))
            R.mul_(grp.a[:, None])  # (C, 2, B, g, Lc+1)
            intra[..., grp.ts] = R[..., : grp.Lc].flatten(-2)
            intra_end[..., grp.ends] = R[..., grp.Lc]
            continue
        for sub in ch.split(group):
            grp = _Group(sub, ch, k, v, m, pp_end)
            P = grp.entries(D)
            R = torch.stack([(P * grp.v[..., None, :]).sum(-1), P.sum(-1)], 1)  # (C, 2, B, g, Lc+1)
            intra[..., grp.ts] = R[..., : grp.Lc].flatten(-2)
            intra_end[..., grp.ends] = R[..., grp.Lc]


def _intra_backward(ch: _Chunks, k, v, m, pp_end, D, E, g_num, g_den, G_end, gk, gv, gw) -> None:
    """Add the intra-chunk terms to gk, gv (C, B, T) and gw (C, B).

    Entry (r, j) has exponent gradient dE_rj = P_rj (g_num_r v_j + g_den_r) and w-coefficient r-1-j;
    rows Lc take the gradient on the chunk's end state, G_end (C, 2, B, n).
    """
    coef = _w_coef(ch.L, k.device, k.dtype)
    for group in ch.groups:
        grp = _Group(group, ch, k, v, m, pp_end)
        if grp.factors(E):
            gn, gd = grp.ext(g_num, G_end[:, 0]), grp.ext(g_den, G_end[:, 1])  # (C, B, g, Lc+1)
            ab = grp.rows(grp.a * gn, grp.a * gd)  # (C, 2Bg, Lc+1)
            Y = grp.unrows(torch.matmul(ab, grp.E))  # (C, 2, B, g, Lc): sums over rows
            gv_ = grp.b * Y[:, 0]
            gv[..., grp.ts] += gv_.flatten(-2)
            gk[..., grp.ts] += torch.addcmul(gv_ * grp.v, grp.b, Y[:, 1]).flatten(-2)
            CE = coef[: grp.Lc + 1, : grp.Lc] * grp.E
            Z = torch.matmul(grp.rows(grp.b * grp.v, grp.b), CE.transpose(1, 2))  # (C, 2Bg, Lc+1)
            gw += grp.unrows(Z.mul_(ab)).sum((1, 3, 4))
            continue
        cf = coef[: grp.Lc + 1, : grp.Lc].flatten()
        for sub in ch.split(group):
            grp = _Group(sub, ch, k, v, m, pp_end)
            gn, gd = grp.ext(g_num, G_end[:, 0]), grp.ext(g_den, G_end[:, 1])
            P = grp.entries(D)
            gv[..., grp.ts] += (P * gn[..., None]).sum(-2).flatten(-2)
            dE = torch.addcmul(gd[..., None], gn[..., None], grp.v[..., None, :]).mul_(P)
            gk[..., grp.ts] += dE.sum(-2).flatten(-2)
            gw += torch.matmul(dE.flatten(-2), cf).sum(-1)


class WKV4Chunked(torch.autograd.Function):
    """Autograd node for WKV-4 with state in and out, computed chunk by chunk (exact gradients).

    apply(time_decay, time_first, k, v, aa, bb, pp[, chunk_len]) -> (y, aa_T, bb_T, pp_T), exactly as
    `WKV4Reference.apply`; chunk_len defaults to CHUNK_LEN.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, time_decay, time_first, k, v, aa, bb, pp, chunk_len=None):
        L = int(chunk_len or CHUNK_LEN)
        dt = _compute_dtype(k)
        B, T, C = k.shape
        ctx.in_dtypes = (time_decay.dtype, time_first.dtype, k.dtype, v.dtype, aa.dtype, bb.dtype, pp.dtype)
        ctx.T = T
        w = -torch.exp(time_decay.detach().to(dt))
        u = time_first.detach().to(dt)
        aa0, bb0, pp0 = (x.detach().to(dt).t().contiguous() for x in (aa, bb, pp))  # (C, B)
        if T == 0:  # outputs must not alias inputs
            ctx.save_for_backward(aa0)
            return k.new_empty(B, 0, C), aa0.t().clone(), bb0.t().clone(), pp0.t().clone()

        kc, vc = _to_cbt(k.detach(), dt), _to_cbt(v.detach(), dt)  # (C, B, T)
        pps = _running_max(pp0, w, kc.permute(2, 0, 1).contiguous())  # (T, C, B)
        pp_T = pps[-1].t().clone()
        pps = pps.permute(1, 2, 0).contiguous()  # (C, B, T)
        ch = _Chunks(T, L, k.device, dt)
        w3, u3 = w[:, None, None], u[:, None, None]

        pp_prev = torch.cat([pp0[..., None], pps[..., :-1]], -1)
        uk = kc + u3
        m = torch.maximum(pp_prev, uk)  # the reference's per-step max: stabiliser of row t
        pp_end = pps[..., ch.last]  # (C, B, n): pp at each chunk's end
        pp_start = torch.cat([pp0[..., None], pp_end[..., :-1]], -1)
        del pps

        # Intra-chunk sums: rows < Lc feed the outputs, row Lc the chunk's end state.
        D = _decay_exponents(w, L)
        E = _exp(D.clone()).masked_fill_(D.lt(_EXP_FLOOR[dt]), 0.0)  # exactly 0 where masked
        intra = kc.new_empty(C, 2, B, T)
        intra_end = kc.new_empty(C, 2, B, ch.n)
        _intra_forward(ch, kc, vc, m, pp_end, D, E, intra, intra_end)

        # Carry the state across chunks: state_{c+1} = intra_end_c + q_c · state_c.
        q = _exp(pp_start + ch.lens * w3 - pp_end)  # (C, B, n)
        states = kc.new_empty(ch.n + 1, 2, C, B)  # (aa, bb) at each chunk's start, then the final
        states[0, 0], states[0, 1] = aa0, bb0
        ends_, q_ = intra_end.permute(3, 1, 0, 2), q.permute(2, 0, 1)[:, None]
        for c in range(ch.n):
            torch.addcmul(ends_[c], q_[c], states[c], out=states[c + 1])

        # Outputs: intra sums + own token (bonus u) + carried state, all tokens at once.
        st = states[:-1].permute(1, 2, 3, 0)[..., ch.chunk_id]  # (2, C, B, T)
        s = _exp(pp_start[..., ch.chunk_id] + ch.local * w3 - m)
        dg = _exp(uk - m)
        num = intra[:, 0] + dg * vc + s * st[0]
        den = intra[:, 1] + dg + s * st[1]
        y = num / den

        ctx.save_for_backward(kc, vc, y, den, m, pp_prev)
        ctx.extra = (w, u, states, q, pp_start, pp_end, ch, D, E)
        return _to_btc(y, k.dtype), states[-1, 0].t().clone(), states[-1, 1].t().clone(), pp_T

    @staticmethod
    @_without_autocast
    def backward(ctx, gy, gaa, gbb, gpp):
        td_dt, tf_dt, k_dt, v_dt, aa_dt, bb_dt, pp_dt = ctx.in_dtypes
        if ctx.T == 0:
            (aa0,) = ctx.saved_tensors
            C, B = aa0.shape
            z = aa0.new_zeros(B, C)
            return (
                aa0.new_zeros(C).to(td_dt),
                aa0.new_zeros(C).to(tf_dt),
                aa0.new_zeros(B, 0, C).to(k_dt),
                aa0.new_zeros(B, 0, C).to(v_dt),
                (z if gaa is None else gaa).to(aa_dt, copy=True),
                (z if gbb is None else gbb).to(bb_dt, copy=True),
                (z if gpp is None else gpp).to(pp_dt, copy=True),
                None,
            )
        kc, vc, y, den, m, pp_prev = ctx.saved_tensors
        w, u, states, q, pp_start, pp_end, ch, D, E = ctx.extra
        dt = kc.dtype
        C, B, _ = kc.shape
        w3, u3 = w[:, None, None], u[:, None, None]
        z = kc.new_zeros(C, B)
        gy = torch.zeros_like(y) if gy is None else _to_cbt(gy, dt)
        gaa = z if gaa is None else gaa.to(dt).t()
        gbb = z if gbb is None else gbb.to(dt).t()
        gpp = z if gpp is None else gpp.to(dt).t()

        g_num = gy / den  # gradient on each output's numerator; on its denominator: -g_num·y
        g_den = -g_num * y
        # Own-token (bonus) term e^{u + k_t - m_t}.
        dg = _exp(kc + u3 - m)
        gk = dg * (g_num * vc + g_den)
        gu = gk.sum((1, 2))
        gv = g_num * dg
        # Carried-state term e^{pp_start + i·w - m_t} of each output.
        st = states[:-1].permute(1, 2, 3, 0)[..., ch.chunk_id]  # (2, C, B, T)
        s = _exp(pp_start[..., ch.chunk_id] + ch.local * w3 - m)
        e_state = s * (g_num * st[0] + g_den * st[1])
        gw = (e_state * ch.local).sum(-1)  # (C, B), gradient on w
        gpp0 = e_state[..., : ch.ends[0]].sum(-1)
        seg = kc.new_zeros(2, C, B, ch.n)  # per chunk, the gradient on its starting (aa, bb) via outputs
        seg.index_add_(3, ch.chunk_id, torch.stack([g_num * s, g_den * s]))

        # Gradient on each chunk's end state, carried in reverse: G_{c-1} = seg_c + q_c · G_c.
        G = kc.new_empty(ch.n + 1, 2, C, B)  # G[c + 1]: on the state after chunk c; G[0]: on the input
        G[ch.n, 0], G[ch.n, 1] = gaa, gbb
        seg_, q_ = seg.permute(3, 0, 1, 2), q.permute(2, 0, 1)[:, None]
        for c in range(ch.n - 1, -1, -1):
            torch.addcmul(seg_[c], q_[c], G[c + 1], out=G[c])
        G_end = G[1:].permute(2, 1, 3, 0)  # (C, 2, B, n)
        start = states[:-1].permute(2, 1, 3, 0)  # (C, 2, B, n)
        e_q = q * (G_end[:, 0] * start[:, 0] + G_end[:, 1] * start[:, 1])
        gw += (e_q * ch.lens).sum(-1)
        gpp0 += e_q[..., 0]

        _intra_backward(ch, kc, vc, m, pp_end, D, E, g_num, g_den, G_end, gk, gv, gw)

        # Residual gradient on pp_T, routed to the arg-max of the running max as the reference does.
        g_max = gpp - gaa * states[-1, 0] - gbb * states[-1, 1]
        ww = w3 + pp_prev
        to_prev = (ww > kc).to(dt) + 0.5 * (ww == kc).to(dt)
        through = to_prev.flip(-1).cumprod(-1).flip(-1)  # prod_{t' >= t} to_prev_t'
        after = torch.cat([through[..., 1:], torch.ones_like(through[..., :1])], -1)  # prod_{t' > t}
        gk += g_max[..., None] * after * (1 - to_prev)
        gw += g_max * (after * to_prev).sum(-1)
        gpp0 += g_max * through[..., 0]

        return (
            (gw.sum(1) * w).to(td_dt),  # dw/dtime_decay = w
            gu.to(tf_dt),
            _to_btc(gk, k_dt),
            _to_btc(gv, v_dt),
            G[0, 0].t().to(aa_dt, copy=True),
            G[0, 1].t().to(bb_dt, copy=True),
            gpp0.t().to(pp_dt, copy=True),
            None,
        )


@torch.compiler.disable  # model.compile: the op stays eager (a graph break), its own backward kept
def wkv4_chunked(
    time_decay: Tensor,
    time_first: Tensor,
    k: Tensor,
    v: Tensor,
    state: WKV4State,
    chunk_len: int | None = None,
) -> tuple[Tensor, WKV4State]:
    """Same contract as `wkv4_reference`: y (B, T, C) in k's dtype and the state after the last step.

    chunk_len: tokens per chunk (default CHUNK_LEN); any value gives the same result up to rounding.
    """
    y, aa, bb, pp = WKV4Chunked.apply(time_decay, time_first, k, v, *state, chunk_len)
    return y, WKV4State(aa, bb, pp)
