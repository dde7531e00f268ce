"""WKV-7 chunked over T: one autograd node, exact forward and hand-written backward, no token loop.

Same op and conventions as `reference.py` (read its docstring first); only the way it is computed
changes. Shape legend: B batch, T time, H heads, N head size, L chunk length, n = ceil(T/L) chunks,
G = B·H heads batched together. Chunks are processed in groups of up to GROUP_TOKENS tokens, each
group's inputs copied to (G, g, L, N) in the compute dtype; the last chunk is padded with identity
steps (log-decay 0, a = b = k = v = r = 0), which leave S unchanged.

Forward, per head and chunk, from the chunk's start state S0 (N×N, rows value, columns key). With
the log-decay λ_t = -exp(w_t) and its cumulative sum g_t = λ_1 + … + λ_t (g_0 = 0), the state
before token t is S0·e^{g_{t-1}} plus every earlier token's rank-one writes decayed by
e^{g_{t-1} - g_s}. Write u_t = S_{t-1} a_t (what the state holds at the removal key); then

    U = A_ab U + Ã S0ᵀ + A_ak V        so  U = (I - A_ab)⁻¹ (Ã S0ᵀ + A_ak V) = W̃ S0ᵀ + U0
    Y = R̃ S0ᵀ + A_rb U + A_rk V
    S_L = S0 (e^{g_L} + W̃ᵀ B̂) + U0ᵀ B̂ + Vᵀ K̂ = S0 M + H

with the factors Ã_t = a_t e^{g_{t-1}}, R̃_t = r_t e^{g_t}, B̃_s = b_s e^{-g_s}, K̃_s = k_s e^{-g_s},
B̂_s = b_s e^{g_L - g_s}, K̂_s = k_s e^{g_L - g_s}, and the L×L matrices A_ab = Ã B̃ᵀ, A_ak = Ã K̃ᵀ
(strictly lower), A_rb = R̃ B̃ᵀ, A_rk = R̃ K̃ᵀ (lower, their diagonals r_t·b_t and r_t·k_t formed
directly). (I - A_ab)⁻¹ is formed by doubling, (I + A)(I + A²)(I + A⁴)…, in batched GEMMs (LAPACK's
batched triangular solve, one small system at a time, was several times slower); the backward's
transposed system reuses it. Everything but S_{c+1} = S_c M_c + H_c is parallel over chunks; that
scan is one N×N GEMM per chunk. Inputs are laid out so that [Ã; R̃], [B̃; K̃], [B̂; K̂] and [U; V]
are formed in place, (G, g, 2L, N) each, without concatenation.

Exactness: the factored products e^{g_{t-1}}·e^{-g_s} equal e^{g_{t-1} - g_s} to rounding as long
as neither factor leaves the normal range. With the model's w ≤ -0.5 (|λ| < 0.61) a chunk spans at
most 0.61·L nats; inputs with faster decays get a shorter chunk for that call (L·max|λ| ≤ 60 in
fp32, 600 in fp64; one token per chunk at worst), so any finite input is computed to rounding.

Backward: the chunks' M_c (kept from the forward or formed again) and their own-output terms
Q_c = dYᵀ(R̃ + A_rb W̃) are computed and the state gradient is carried in reverse,
dS_{c} = dS_{c+1} M_cᵀ + Q_c (the gradient on the end state, dS_T, enters at the last chunk; the one
on S0 leaves from the first). Given each chunk's start state and end-state gradient, the gradients
of all its tokens follow in parallel from the formulas above by hand (in `_chunk_grads`); the
log-decay gradient is a reverse cumulative sum of the per-position terms, and dw = dλ·λ.

Memory: saved for backward are the six inputs (as given, no copies) and the state at each chunk
start, n·G·N² numbers (T·C·N/L). A call of one group whose chunk terms take at most
KEEP_TERMS_BYTES also keeps those terms (~23 numbers per input number), so that its backward does
not form them again (at the demo's segment, 512 tokens of 2 heads, that makes forward+backward
~1.2× faster: `bench/wkv7_cpu.py --against`); longer calls recompute them group by group. Besides y
and the gradients it returns, the op's temporaries hold one group's chunk terms, whatever T is.

CHUNK_LEN = 32, chosen with `bench/wkv7_cpu.py --against` (this file with CHUNK_LEN 16, 32 and 64
against each other, fp32, B=1, N=64, T×H = 512×2 (the demo's segment) and 1024×4, one thread of a
shared 2-core machine): 16 and 32 were within noise of each other for forward+backward and 32 the
faster forward, both ~1.3× faster than 64 (the doubling's log2 L GEMM pairs grow as L³ per chunk).
Per token, the chunk products cost ~O(L·N) and the N×N terms and the state scan O(N² + N³/L), so
the optimum is flat between L = N/4 and N/2. Its fp32 error is ≤ 5e-7 (T ≤ 1000, tests' inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from rwkv_infctx.ops.wkv4.chunked import _without_autocast
from rwkv_infctx.ops.wkv7.reference import compute_dtype, wkv7_reference

CHUNK_LEN = 32
"""Tokens per chunk (see the module docstring for how it was chosen)."""

GROUP_TOKENS = 2048
"""Tokens whose chunk terms are formed at once: bounds the temporaries for any T."""

SHORT_T = 16
"""Calls of at most this many tokens without gradients run the per-token recurrence (`wkv7_chunked`):
on one CPU thread, at B=1, H=2, N=64, the chunked op costs ~0.9 ms at any T <= 16, the recurrence
~60 µs per token (`bench/wkv7_cpu.py --short`)."""

KEEP_TERMS_BYTES = 32 << 20
"""A call with gradients keeps its chunk terms for the backward (instead of recomputing them there)
when it is one group and they take at most this many bytes (~23 numbers per number of one input at
CHUNK_LEN 32, N = 64; 6.3 MB for the demo's 512 tokens of 2 heads)."""


def _terms_bytes(G: int, T: int, L: int, N: int, dt: torch.dtype) -> int:
    """Bytes of one group's `_Terms` (G heads, T tokens): per chunk, 19 (L, N) blocks (the three pairs
    and X1, X2, BK of 2 each, five decay factors, W and U0), 5 L×L (P and the inverse), M's N×N and
    the diagonals rb, rk."""
    n = -(-T // L)
    per_chunk = 19 * L * N + 5 * L * L + N * N + 2 * L
    return G * n * per_chunk * torch.finfo(dt).bits // 8


def _keeps_terms(n_groups: int, G: int, T: int, L: int, N: int, dt: torch.dtype) -> bool:
    """Whether a call with gradients keeps its terms for the backward (see KEEP_TERMS_BYTES)."""
    return n_groups == 1 and _terms_bytes(G, T, L, N, dt) <= KEEP_TERMS_BYTES


_RANGE_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}
"""Largest log-decay range (nats) inside one chunk: e^{±limit} stays normal in the dtype."""


def chunk_len_for(lam_min: float, dt: torch.dtype, chunk_len: int) -> int:
    """The chunk length for a call whose fastest log-decay is lam_min (<= 0): chunk_len unless the
    chunk would span more than the dtype's exponent range, then the longest length that does not."""
    rate, limit = -lam_min, _RANGE_LIMIT[dt]
    if math.isnan(rate) or rate * chunk_len <= limit:
        return chunk_len
    return max(1, int(limit // rate))


def _to_chunks(x: Tensor, dt: torch.dtype, L: int, t0: int, t1: int, fill: float = 0.0) -> Tensor:
    """Tokens t0:t1 of (B, T, H, N) -> (B·H, g, L, N) in dt, g = ceil((t1 - t0) / L), padded with fill."""
    B, _, H, N = x.shape
    g = -(-(t1 - t0) // L)
    out = x.new_full((B, H, g * L, N), fill, dtype=dt)
    out[:, :, : t1 - t0] = x[:, t0:t1].permute(0, 2, 1, 3)
    return out.view(B * H, g, L, N)


def _pair_chunks(x: Tensor | None, y: Tensor, dt: torch.dtype, L: int, t0: int, t1: int) -> Tensor:
    """Tokens t0:t1 of two (B, T, H, N) inputs -> (B·H, g, 2L, N): each chunk's L rows of x, then its L
    rows of y, padded with zeros (x None: its rows left unset, for the caller to fill)."""
    B, _, H, N = y.shape
    g = -(-(t1 - t0) // L)
    out = y.new_empty((B, H, g, 2, L, N), dtype=dt)
    full, rest = divmod(t1 - t0, L)
    for i, z in enumerate((x, y)):
        if z is not None:
            src, dst = z[:, t0:t1].permute(0, 2, 1, 3), out[:, :, :, i]  # (B, H, t, N), (B, H, g, L, N)
            dst[:, :, :full] = src[:, :, : full * L].unflatten(2, (full, L))
            if rest:
                dst[:, :, full, :rest] = src[:, :, full * L :]
                dst[:, :, full, rest:] = 0.0
    return out.view(B * H, g, 2 * L, N)


def _store(out: Tensor, x: Tensor, t0: int, t1: int) -> None:
    """Write chunks (B·H, g, L, N) into tokens t0:t1 of out (B, T, H, N), padding dropped."""
    B, _, H, N = out.shape
    out[:, t0:t1] = x.reshape(B, H, -1, N)[:, :, : t1 - t0].permute(0, 2, 1, 3)


def _groups(T: int, L: int) -> list[tuple[int, int, slice]]:
    """(first token, end token, chunk slice) of each group of at most GROUP_TOKENS tokens."""
    step = max(1, GROUP_TOKENS // L)
    n = -(-T // L)
    return [(c * L, min((c + step) * L, T), slice(c, min(c + step, n))) for c in range(0, n, step)]


def _block_mask(L: int, device) -> Tensor:
    """(2L, 2L) bool: each of the four L×L blocks strictly lower triangular."""
    lower = torch.ones(L, L, dtype=torch.bool, device=device).tril(-1)
    return lower.repeat(2, 2)


def _unit_lower_inverse(A: Tensor) -> Tensor:
    """(I - A)⁻¹ for strictly lower triangular A (..., L, L), by doubling: A is nilpotent, so
    (I - A)⁻¹ = I + A + … + A^{L-1} = (I + A)(I + A²)(I + A⁴)…, 2·ceil(log2 L) - 1 batched GEMMs
    (LAPACK's batched triangular solve runs one small system at a time, several times slower)."""
    inv = A.clone()
    inv.diagonal(dim1=-2, dim2=-1).add_(1.0)
    power, reach = A, 2  # inv = I + A + … + A^{reach-1}
    while reach < A.shape[-1]:
        power = power @ power
        inv = inv + power @ inv
        reach *= 2
    return inv


def _times_both(pair: Tensor, f: Tensor) -> Tensor:
    """(..., 2L, N) pair of L-row blocks, each times f (..., L, N)."""
    return (pair.unflatten(-2, (2, -1)) * f.unsqueeze(-3)).flatten(-3, -2)


class _Terms:
    """One group of chunks' factors and matrices; inputs (G, g, L, N) in the compute dtype."""

    SAVED = ("lam", "r", "k", "v", "a", "b", "eg", "egp", "einv", "eL", "egL", "X1", "X2", "BK", "P",
             "rb", "rk", "inv", "W", "U0", "M", "uv")  # fmt: skip

    def __init__(self, inputs: list[Tensor], dt: torch.dtype, L: int, t0: int, t1: int, mask: Tensor):
        r, w, k, v, a, b = inputs
        ar, bk = _pair_chunks(a, r, dt, L, t0, t1), _pair_chunks(b, k, dt, L, t0, t1)
        self.uv = _pair_chunks(None, v, dt, L, t0, t1)  # [U; V], U filled in once S0 is known
        a, r, b, k, v = ar[..., :L, :], ar[..., L:, :], bk[..., :L, :], bk[..., L:, :], self.uv[..., L:, :]
        lam = _to_chunks(w, dt, L, t0, t1, fill=-math.inf).exp_().neg_()  # λ = -e^w; 0 when padded
        self.L, self.lam, self.r, self.k, self.v, self.a, self.b = L, lam, r, k, v, a, b
        g = lam.cumsum(-2)  # g_t, t = 1..L
        self.eg = g.exp()
        self.egp = F.pad(self.eg[..., :-1, :], (0, 0, 1, 0), value=1.0)  # e^{g_{t-1}}
        # Clamped only where a one-token chunk decays past the range; such factors meet no kept entry.
        self.einv = (-g).clamp_(max=_RANGE_LIMIT[g.dtype]).exp_()
        self.eL = (g[..., -1:, :] - g).exp_()
        self.egL = self.eg[..., -1, :]
        self.X1 = torch.empty_like(ar)  # [Ã; R̃] (G, g, 2L, N)
        torch.mul(a, self.egp, out=self.X1[..., :L, :])
        torch.mul(r, self.eg, out=self.X1[..., L:, :])
        self.X2 = _times_both(bk, self.einv)  # [B̃; K̃]
        self.BK = _times_both(bk, self.eL)  # [B̂; K̂]
        self.P = (self.X1 @ self.X2.mT).masked_fill_(~mask, 0.0)  # [[A_ab, A_ak], [A_rb, A_rk]]
        self.rb = (r * b).sum(-1, keepdim=True)  # diagonals of A_rb, A_rk (G, g, L, 1)
        self.rk = (r * k).sum(-1, keepdim=True)
        self.inv = _unit_lower_inverse(self.P[..., :L, :L])  # (I - A_ab)⁻¹
        Z = self.inv @ torch.cat([self.X1[..., :L, :], self.P[..., :L, L:] @ v], -1)
        N = r.shape[-1]
        self.W, self.U0 = Z[..., :N], Z[..., N:]
        self.M = self.W.mT @ self.BK[..., :L, :]  # (G, g, N, N) [key, key]
        self.M.diagonal(dim1=-2, dim2=-1).add_(self.egL)

    def tensors(self) -> list[Tensor]:
        """What the backward reads, in `_Terms.restore`'s order (for `save_for_backward`)."""
        return [getattr(self, name) for name in _Terms.SAVED]

    @classmethod
    def restore(cls, L: int, tensors: list[Tensor]) -> _Terms:
        """The terms `tensors()` returned, without recomputing them."""
        t = cls.__new__(cls)
        t.L = L
        for name, x in zip(cls.SAVED, tensors, strict=True):
            setattr(t, name, x)
        return t

    def outputs(self, S0: Tensor) -> Tensor:
        """Y (G, g, L, N) from each chunk's start state S0 (G, g, N, N)."""
        L = self.L
        U = torch.add(self.W @ S0.mT, self.U0, out=self.uv[..., :L, :])
        Y = self.X1[..., L:, :] @ S0.mT + self.P[..., L:, :] @ self.uv
        return Y.addcmul_(self.rb, U).addcmul_(self.rk, self.v)


def _scan_forward(S: Tensor, M: Tensor, H: Tensor, starts: Tensor) -> Tensor:
    """S_{c+1} = S_c M_c + H_c over the group's chunks; writes each S_c to starts; returns the last."""
    for c in range(M.shape[1]):
        starts[:, c] = S
        S = torch.bmm(S, M[:, c]).add_(H[:, c])  # (baddbmm takes a slow path on the CPU)
    return S


def _scan_backward(dS: Tensor, M: Tensor, Q: Tensor, dS_end: Tensor) -> Tensor:
    """dS_c = dS_{c+1} M_cᵀ + Q_c in reverse; writes each chunk's end-state gradient to dS_end."""
    for c in range(M.shape[1] - 1, -1, -1):
        dS_end[:, c] = dS
        dS = torch.bmm(dS, M[:, c].mT).add_(Q[:, c])
    return dS


def _chunk_grads(t: _Terms, S0: Tensor, dY: Tensor, dSL: Tensor, mask: Tensor, kept: bool) -> list[Tensor]:
    """Gradients (r, w, k, v, a, b) of one group, (G, g, L, N) each, from the chunks' start states
    S0, output gradients dY and end-state gradients dSL. kept: t is the forward's (saved) terms,
    which must stay unchanged (a second backward reads them again)."""
    L = t.L
    UV = t.uv
    # kept: the forward's `outputs` left U there, from these same start states
    U = UV[..., :L, :] if kept else torch.add(t.W @ S0.mT, t.U0, out=UV[..., :L, :])
    BKd = t.BK @ dSL.mT  # [B̂; K̂] dS_Lᵀ: the end state's share of dU and dv
    dU = BKd[..., :L, :].add_(t.P[..., L:, :L].mT @ dY).addcmul_(t.rb, dY)
    dX = t.inv.mT @ dU
    dXY = torch.cat([dX, dY], -2)
    dv = BKd[..., L:, :].add_(t.P[..., :, L:].mT @ dXY).addcmul_(t.rk, dY)
    dP = (dXY @ UV.mT).masked_fill_(~mask, 0.0)
    dX1 = (dXY @ S0).add_(dP @ t.X2)  # [dÃ; dR̃]
    dX2 = dP.mT @ t.X1  # [dB̃; dK̃]
    dBK = UV @ dSL  # [dB̂; dK̂]
    drb, drk = (dY * U).sum(-1, keepdim=True), (dY * t.v).sum(-1, keepdim=True)

    da = dX1[..., :L, :] * t.egp
    dr = (dX1[..., L:, :] * t.eg).addcmul_(drb, t.b).addcmul_(drk, t.k)
    dbk = _times_both(dX2, t.einv).add_(_times_both(dBK, t.eL))  # [db; dk] less the diagonals' terms
    db, dk = dbk[..., :L, :].addcmul_(drb, t.r), dbk[..., L:, :].addcmul_(drk, t.r)

    # Gradient on g_t from each factor; g_{t-1} of Ã shifts one place, g_L also scales B̂, K̂ and S0.
    dX1X1, dBKBK = dX1 * t.X1, dBK * t.BK
    dX2X2 = dX2.mul_(t.X2).add_(dBKBK).unflatten(-2, (2, L)).sum(-3)  # [B̃; K̃] and [B̂; K̂] terms
    dg = dX1X1[..., L:, :] - dX2X2
    dg[..., :-1, :] += dX1X1[..., 1:L, :]
    dg[..., -1, :] += dBKBK.sum(-2) + t.egL * (S0 * dSL).sum(-2)
    dlam = dg.flip(-2).cumsum(-2).flip(-2)  # λ_t enters every g_τ with τ >= t
    return [dr, dlam * t.lam, dk, dv, da, db]  # dw = dλ·λ since λ = -e^w


class WKV7Chunked(torch.autograd.Function):
    """Autograd node for WKV-7 with state in and out, computed chunk by chunk (exact gradients).

    apply(r, w, k, v, a, b, state[, chunk_len]) -> (y, S_T), exactly as `wkv7_reference`.
    """

    @staticmethod
    @_without_autocast
    def forward(ctx, r, w, k, v, a, b, state, chunk_len=None):
        _check_shapes(r, w, k, v, a, b, state)
        dt = compute_dtype(r, w, k, v, a, b, state)
        B, T, H, N = r.shape
        ctx.shape, ctx.device = r.shape, r.device
        ctx.dtypes = [x.dtype for x in (r, w, k, v, a, b, state)]
        S = state.detach().to(dt).reshape(B * H, N, N).clone()
        if T == 0:
            ctx.L = 0
            return r.new_empty(r.shape), S.view(B, H, N, N)
        lam_min = -w.detach().max().to(dt).exp().item()
        L = chunk_len_for(lam_min, dt, int(chunk_len or CHUNK_LEN))
        inputs = [x.detach() for x in (r, w, k, v, a, b)]
        mask = _block_mask(L, r.device)
        starts = S.new_empty(B * H, -(-T // L), N, N)
        y = torch.empty(r.shape, dtype=r.dtype, device=r.device)
        groups = _groups(T, L)
        keep = any(ctx.needs_input_grad) and _keeps_terms(len(groups), B * H, T, L, N, dt)
        for t0, t1, cs in groups:
            t = _Terms(inputs, dt, L, t0, t1, mask)
            H_ = torch.cat([t.U0, t.v], -2).mT @ t.BK  # (G, g, N, N)
            S = _scan_forward(S, t.M, H_, starts[:, cs])
            _store(y, t.outputs(starts[:, cs]), t0, t1)
        ctx.L, ctx.kept = L, keep
        ctx.save_for_backward(r, w, k, v, a, b, starts, *(t.tensors() if keep else []))
        return y, S.view(B, H, N, N)

    @staticmethod
    @once_differentiable  # the saved chunk states are constants: no second derivatives
    @_without_autocast
    def backward(ctx, dy, dS_T):
        B, _, H, N = ctx.shape
        if ctx.L == 0:
            dS0 = torch.zeros(B, H, N, N, device=ctx.device) if dS_T is None else dS_T
            zero = torch.zeros(ctx.shape, device=ctx.device)
            return (*(zero.to(d) for d in ctx.dtypes[:6]), dS0.to(ctx.dtypes[6], copy=True), None)
        saved = ctx.saved_tensors
        inputs, starts, kept = list(saved[:6]), saved[6], list(saved[7:])
        dt, L, T = starts.dtype, ctx.L, ctx.shape[1]
        dS = starts.new_zeros(B * H, N, N) if dS_T is None else dS_T.to(dt).reshape(B * H, N, N).clone()
        mask = _block_mask(L, starts.device)
        grads = [torch.empty(ctx.shape, dtype=d, device=starts.device) for d in ctx.dtypes[:6]]
        for t0, t1, cs in reversed(_groups(T, L)):
            t = _Terms.restore(L, kept) if ctx.kept else _Terms(inputs, dt, L, t0, t1, mask)
            dY = torch.zeros_like(t.r) if dy is None else _to_chunks(dy, dt, L, t0, t1)
            Q = dY.mT @ (t.X1[..., L:, :] + (t.P[..., L:, :L] @ t.W).addcmul_(t.rb, t.W))
            dSL = torch.empty_like(starts[:, cs])
            dS = _scan_backward(dS, t.M, Q, dSL)
            for out, g in zip(grads, _chunk_grads(t, starts[:, cs], dY, dSL, mask, ctx.kept), strict=True):
                _store(out, g, t0, t1)
        return (*grads, dS.view(B, H, N, N).to(ctx.dtypes[6], copy=True), None)


def _check_shapes(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor) -> None:
    """Equal (B, T, H, N) inputs and a (B, H, N, N) state, or ValueError."""
    if r.dim() != 4 or any(x.shape != r.shape for x in (w, k, v, a, b)):
        shapes = ", ".join(str(tuple(x.shape)) for x in (r, w, k, v, a, b))
        raise ValueError(f"wkv7: r, w, k, v, a, b must share one (B, T, H, N) shape, got {shapes}")
    B, _, H, N = r.shape
    if state.shape != (B, H, N, N):
        raise ValueError(
            f"wkv7: state must be {(B, H, N, N)} for inputs {tuple(r.shape)}, got {tuple(state.shape)}"
        )


@torch.compiler.disable  # model.compile: the op stays eager (a graph break), its own backward kept
def wkv7_chunked(
    r: Tensor,
    w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor,
    chunk_len: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `wkv7_reference`: y (B, T, H, N) in r's dtype and the final state
    (B, H, N, N) in the compute dtype. chunk_len: tokens per chunk (default CHUNK_LEN); any value
    gives the same result up to rounding. Calls of 1..SHORT_T tokens that need no gradient (token
    by token generation) run the per-token recurrence: the chunk terms cost more than they save."""
    xs = (r, w, k, v, a, b, state)
    if 0 < r.shape[1] <= SHORT_T and not (torch.is_grad_enabled() and any(x.requires_grad for x in xs)):
        _check_shapes(*xs)
        return wkv7_reference(*xs)
    return WKV7Chunked.apply(*xs, chunk_len)
