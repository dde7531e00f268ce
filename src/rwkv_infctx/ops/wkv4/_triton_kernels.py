"""Triton kernels for chunked WKV-4 with state (imported lazily: this module imports triton).

See `bench/wkv4_kernel.md` for the algorithm and `triton_kernel.py` for the host side. Every kernel
works on one (batch row, block of BC channels); the chunked ones also on one chunk of L steps.
Layouts (all contiguous, fp32 unless said):

    k, v, y, gy, gk, gv      (B, T, C)   input dtype (k's dtype for y)
    logden                   (B, T, C)   log of the true denominator D_t = B_{t-1} + e^{u + k_t}
    loc, sin, gout           (3, B, NC, C)  per-chunk (aa, bb, pp) or adjoint (ga, gb, q)
    locidx                   (B, NC, C)  int32 arg-max time of a chunk's running max (-1: none)
    state vectors            (B, C)

Exponents are kept log-stable everywhere: a pair of values with a shared log-scale, combined by a
running max, so no exp() argument is positive beyond rounding.

Loops: the in-chunk walks run a constexpr trip count L (steps past T in the last chunk are masked
no-ops); the passes over chunks are `while` loops over a runtime count. Both forms also run under
the Triton interpreter with NumPy >= 2.4, where `range()` of a runtime kernel argument fails.
"""

from __future__ import annotations

import triton
import triton.language as tl

FRESH: tl.constexpr = tl.constexpr(-1e38)  # running max of an empty state (reference.FRESH_MAX)


@triton.jit
def wkv4_fwd_local(k_ptr, v_ptr, td_ptr, loc_ptr, locidx_ptr, B, T, C, NC, L: tl.constexpr, BC: tl.constexpr):
    """Pass 1: the state each chunk alone produces from an empty state, and its arg-max time."""
    ic = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = cs < C
    w = -tl.exp(tl.load(td_ptr + cs, mask=cm, other=0.0))
    t0 = ic * L
    base = (b * T + t0) * C + cs
    aa = tl.full([BC], 0.0, dtype=tl.float32)
    bb = tl.full([BC], 0.0, dtype=tl.float32)
    pp = tl.full([BC], FRESH, dtype=tl.float32)
    idx = tl.full([BC], -1, dtype=tl.int32)
    for i in range(L):  # a fixed trip count; steps past T (last chunk) are masked no-ops
        ok = (t0 + i + cs * 0) < T  # a tensor compare: a bool mask on every triton version
        m = cm & ok
        off = base + i * C
        kt = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        ww = w + pp
        p = tl.maximum(ww, kt)
        e1 = tl.exp(ww - p)
        e2 = tl.exp(kt - p)
        aa = tl.where(ok, e1 * aa + e2 * vt, aa)
        bb = tl.where(ok, e1 * bb + e2, bb)
        idx = tl.where(ok & (kt > ww), t0 + i, idx)
        pp = tl.where(ok, p, pp)
    so = (b * NC + ic) * C + cs
    plane = B * NC * C
    tl.store(loc_ptr + so, aa, mask=cm)
    tl.store(loc_ptr + plane + so, bb, mask=cm)
    tl.store(loc_ptr + 2 * plane + so, pp, mask=cm)
    tl.store(locidx_ptr + so, idx, mask=cm)


@triton.jit
def wkv4_fwd_scan(
    loc_ptr,
    locidx_ptr,
    aa0_ptr,
    bb0_ptr,
    pp0_ptr,
    td_ptr,
    sin_ptr,
    aaT_ptr,
    bbT_ptr,
    ppT_ptr,
    idxT_ptr,
    B,
    T,
    C,
    NC,
    L: tl.constexpr,
    BC: tl.constexpr,
):
    """Pass 2: sequential over chunks; the state entering each chunk, the final state and its arg-max."""
    b = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = cs < C
    w = -tl.exp(tl.load(td_ptr + cs, mask=cm, other=0.0))
    so = b * C + cs
    aa = tl.load(aa0_ptr + so, mask=cm, other=0.0)
    bb = tl.load(bb0_ptr + so, mask=cm, other=0.0)
    pp = tl.load(pp0_ptr + so, mask=cm, other=0.0)
    idx = tl.full([BC], -1, dtype=tl.int32)
    plane = B * NC * C
    ic = 0
    while ic < NC:  # a while loop: NC is a runtime value (see the module docstring)
        co = (b * NC + ic) * C + cs
        tl.store(sin_ptr + co, aa, mask=cm)
        tl.store(sin_ptr + plane + co, bb, mask=cm)
        tl.store(sin_ptr + 2 * plane + co, pp, mask=cm)
        n = tl.minimum(T - ic * L, L).to(tl.float32)
        la = tl.load(loc_ptr + co, mask=cm, other=0.0)
        lb = tl.load(loc_ptr + plane + co, mask=cm, other=0.0)
        lp = tl.load(loc_ptr + 2 * plane + co, mask=cm, other=0.0)
        li = tl.load(locidx_ptr + co, mask=cm, other=-1)
        pd = pp + n * w
        p = tl.maximum(pd, lp)
        e1 = tl.exp(pd - p)
        e2 = tl.exp(lp - p)
        aa = e1 * aa + e2 * la
        bb = e1 * bb + e2 * lb
        idx = tl.where(lp > pd, li, idx)
        pp = p
        ic += 1
    tl.store(aaT_ptr + so, aa, mask=cm)
    tl.store(bbT_ptr + so, bb, mask=cm)
    tl.store(ppT_ptr + so, pp, mask=cm)
    tl.store(idxT_ptr + so, idx, mask=cm)


@triton.jit
def wkv4_fwd_out(
    k_ptr,
    v_ptr,
    td_ptr,
    tf_ptr,
    sin_ptr,
    y_ptr,
    ld_ptr,
    B,
    T,
    C,
    NC,
    L: tl.constexpr,
    BC: tl.constexpr,
    WRITE_Y: tl.constexpr,
):
    """Pass 3: each chunk from its entering state; y and the log-denominator log D_t per step."""
    ic = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = cs < C
    w = -tl.exp(tl.load(td_ptr + cs, mask=cm, other=0.0))
    u = tl.load(tf_ptr + cs, mask=cm, other=0.0)
    co = (b * NC + ic) * C + cs
    plane = B * NC * C
    aa = tl.load(sin_ptr + co, mask=cm, other=0.0)
    bb = tl.load(sin_ptr + plane + co, mask=cm, other=0.0)
    pp = tl.load(sin_ptr + 2 * plane + co, mask=cm, other=0.0)
    t0 = ic * L
    base = (b * T + t0) * C + cs
    for i in range(L):  # steps past T only happen in the last chunk, after which nothing is read
        m = cm & ((t0 + i + cs * 0) < T)
        off = base + i * C
        kt = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        ww = u + kt
        p = tl.maximum(pp, ww)
        e1 = tl.exp(pp - p)
        e2 = tl.exp(ww - p)
        den = e1 * bb + e2
        if WRITE_Y:
            yt = (e1 * aa + e2 * vt) / den
            tl.store(y_ptr + off, yt.to(y_ptr.dtype.element_ty), mask=m)
        tl.store(ld_ptr + off, p + tl.log(den), mask=m)
        ww = w + pp
        p = tl.maximum(ww, kt)
        e1 = tl.exp(ww - p)
        e2 = tl.exp(kt - p)
        aa = e1 * aa + e2 * vt
        bb = e1 * bb + e2
        pp = p


@triton.jit
def wkv4_bwd_local(y_ptr, gy_ptr, ld_ptr, td_ptr, gloc_ptr, B, T, C, NC, L: tl.constexpr, BC: tl.constexpr):
    """Backward pass 1: each chunk's own contribution to the adjoint of the state entering it.

    True-scale adjoint: gA_{t-1} = e^w gA_t + gy_t / D_t, gB_{t-1} = e^w gB_t - gy_t y_t / D_t,
    kept as (ga, gb, q) with gA = ga e^q.
    """
    ic = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = cs < C
    w = -tl.exp(tl.load(td_ptr + cs, mask=cm, other=0.0))
    t_last = ic * L + L - 1
    base = (b * T + t_last) * C + cs
    ga = tl.full([BC], 0.0, dtype=tl.float32)
    gb = tl.full([BC], 0.0, dtype=tl.float32)
    q = tl.full([BC], FRESH, dtype=tl.float32)
    for i in range(L):  # backwards; steps past T (last chunk) are masked no-ops
        ok = (t_last - i + cs * 0) < T  # a tensor compare: a bool mask on every triton version
        m = cm & ok
        off = base - i * C
        yt = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
        gyt = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
        lt = tl.load(ld_ptr + off, mask=m, other=0.0)
        qd = q + w
        qn = tl.maximum(qd, -lt)
        e1 = tl.exp(qd - qn)
        e2 = gyt * tl.exp(-lt - qn)
        ga = tl.where(ok, e1 * ga + e2, ga)
        gb = tl.where(ok, e1 * gb - e2 * yt, gb)
        q = tl.where(ok, qn, q)
    co = (b * NC + ic) * C + cs
    plane = B * NC * C
    tl.store(gloc_ptr + co, ga, mask=cm)
    tl.store(gloc_ptr + plane + co, gb, mask=cm)
    tl.store(gloc_ptr + 2 * plane + co, q, mask=cm)


@triton.jit
def wkv4_bwd_scan(
    gloc_ptr,
    gaaT_ptr,
    gbbT_ptr,
    gppT_ptr,
    aaT_ptr,
    bbT_ptr,
    ppT_ptr,
    idxT_ptr,
    aa0_ptr,
    bb0_ptr,
    pp0_ptr,
    td_ptr,
    gout_ptr,
    gmax_ptr,
    gaa0_ptr,
    gbb0_ptr,
    gpp0_ptr,
    B,
    T,
    C,
    NC,
    L: tl.constexpr,
    BC: tl.constexpr,
):
    """Backward pass 2: sequential over chunks from the last; the adjoint after each chunk's last step,
    the gradient of the incoming state, and g_max: the part of the pp_T gradient that does not flow
    through A_T = aa_T e^{pp_T}, B_T = bb_T e^{pp_T}; it goes to the arg-max of
    pp_T = max(pp_0 + T w, max_s k_s + (T-1-s) w)."""
    b = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = cs < C
    w = -tl.exp(tl.load(td_ptr + cs, mask=cm, other=0.0))
    so = b * C + cs
    # gradient on the true final state: gA_T = gaa_T e^{-pp_T}
    ga = tl.load(gaaT_ptr + so, mask=cm, other=0.0)
    gb = tl.load(gbbT_ptr + so, mask=cm, other=0.0)
    q = -tl.load(ppT_ptr + so, mask=cm, other=0.0)
    gmax = tl.load(gppT_ptr + so, mask=cm, other=0.0)
    gmax -= ga * tl.load(aaT_ptr + so, mask=cm, other=0.0) + gb * tl.load(bbT_ptr + so, mask=cm, other=0.0)
    tl.store(gmax_ptr + so, gmax, mask=cm)
    plane = B * NC * C
    ic = NC - 1
    while ic >= 0:
        co = (b * NC + ic) * C + cs
        tl.store(gout_ptr + co, ga, mask=cm)
        tl.store(gout_ptr + plane + co, gb, mask=cm)
        tl.store(gout_ptr + 2 * plane + co, q, mask=cm)
        n = tl.minimum(T - ic * L, L).to(tl.float32)
        la = tl.load(gloc_ptr + co, mask=cm, other=0.0)
        lb = tl.load(gloc_ptr + plane + co, mask=cm, other=0.0)
        lq = tl.load(gloc_ptr + 2 * plane + co, mask=cm, other=0.0)
        qd = q + n * w
        qn = tl.maximum(qd, lq)
        e1 = tl.exp(qd - qn)
        e2 = tl.exp(lq - qn)
        ga = e1 * ga + e2 * la
        gb = e1 * gb + e2 * lb
        q = qn
        ic -= 1
    # (ga, gb, q) is now the true-scale adjoint of the incoming state; to the log-stable (aa, bb, pp):
    aa0 = tl.load(aa0_ptr + so, mask=cm, other=0.0)
    bb0 = tl.load(bb0_ptr + so, mask=cm, other=0.0)
    scale = tl.exp(q + tl.load(pp0_ptr + so, mask=cm, other=0.0))
    gaa0 = ga * scale
    gbb0 = gb * scale
    at_init = tl.load(idxT_ptr + so, mask=cm, other=0) < 0
    tl.store(gaa0_ptr + so, gaa0, mask=cm)
    tl.store(gbb0_ptr + so, gbb0, mask=cm)
    tl.store(gpp0_ptr + so, gaa0 * aa0 + gbb0 * bb0 + tl.where(at_init, gmax, 0.0), mask=cm)


@triton.jit
def wkv4_bwd_out(
    k_ptr,
    v_ptr,
    y_ptr,
    gy_ptr,
    ld_ptr,
    td_ptr,
    tf_ptr,
    gout_ptr,
    idxT_ptr,
    gmax_ptr,
    gk_ptr,
    gv_ptr,
    gpart_ptr,
    B,
    T,
    C,
    NC,
    L: tl.constexpr,
    BC: tl.constexpr,
):
    """Backward pass 3: each chunk backwards from the adjoint after it; gk, gv, and per-chunk partial
    sums of the time_decay and time_first gradients (gpart: (2, B, NC, C))."""
    ic = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    cs = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = cs < C
    w = -tl.exp(tl.load(td_ptr + cs, mask=cm, other=0.0))
    u = tl.load(tf_ptr + cs, mask=cm, other=0.0)
    ewu = tl.exp(w + u)
    co = (b * NC + ic) * C + cs
    plane = B * NC * C
    ga = tl.load(gout_ptr + co, mask=cm, other=0.0)
    gb = tl.load(gout_ptr + plane + co, mask=cm, other=0.0)
    q = tl.load(gout_ptr + 2 * plane + co, mask=cm, other=0.0)
    so = b * C + cs
    sidx = tl.load(idxT_ptr + so, mask=cm, other=-1)
    gmax = tl.load(gmax_ptr + so, mask=cm, other=0.0)
    gw = tl.full([BC], 0.0, dtype=tl.float32)
    gu = tl.full([BC], 0.0, dtype=tl.float32)
    t_last = ic * L + L - 1
    base = (b * T + t_last) * C + cs
    for i in range(L):  # backwards; steps past T (last chunk) are masked no-ops
        ok = (t_last - i + cs * 0) < T  # a tensor compare: a bool mask on every triton version
        m = cm & ok
        off = base - i * C
        kt = tl.load(k_ptr + off, mask=m, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off, mask=m, other=0.0).to(tl.float32)
        yt = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
        gyt = tl.load(gy_ptr + off, mask=m, other=0.0).to(tl.float32)
        lt = tl.load(ld_ptr + off, mask=m, other=0.0)
        # (ga, gb, q): adjoint of the true state after step t
        ek = tl.exp(kt + q)  # e^{k_t} gA_t = ga * ek
        eo = tl.exp(u + kt - lt)  # e^{u + k_t} / D_t
        g_first = gyt * eo * (vt - yt)
        gav = ga * vt + gb
        gvt = ga * ek + gyt * eo
        gkt = ek * gav + g_first + tl.where(t_last - i == sidx, gmax, 0.0)
        gu += tl.where(ok, g_first, 0.0)
        # e^w (gA_t A_{t-1} + gB_t B_{t-1}), A_{t-1} = y_t D_t - e^{u+k_t} v_t, B_{t-1} = D_t - e^{u+k_t}
        gw += tl.where(ok, tl.exp(w + q + lt) * (ga * yt + gb) - ek * ewu * gav, 0.0)
        tl.store(gk_ptr + off, gkt.to(gk_ptr.dtype.element_ty), mask=m)
        tl.store(gv_ptr + off, gvt.to(gv_ptr.dtype.element_ty), mask=m)
        qd = q + w
        qn = tl.maximum(qd, -lt)
        e1 = tl.exp(qd - qn)
        e2 = gyt * tl.exp(-lt - qn)
        ga = tl.where(ok, e1 * ga + e2, ga)
        gb = tl.where(ok, e1 * gb - e2 * yt, gb)
        q = tl.where(ok, qn, q)
    # the running-max route adds one w per decay step from the arg-max to the end
    steps = tl.where(sidx < 0, T, T - 1 - sidx).to(tl.float32)
    gw += tl.where(ic == 0, gmax * steps, 0.0)
    tl.store(gpart_ptr + co, gw * w, mask=cm)  # d/d time_decay = d/dw * w
    tl.store(gpart_ptr + plane + co, gu, mask=cm)
