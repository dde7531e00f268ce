/* WKV-7 on the CPU in float32: the per-token recurrence of reference.py, forward and backward.
 *
 * Built at first use by cpu_kernel.py (cc -O3 -march=native -fopenmp) and called through ctypes.
 * Shapes: r, d, k, v, a, b, y and their gradients (B, T, H, N) contiguous; states (B, H, N, N) with
 * rows indexed by value (i) and columns by key (j), as everywhere in the project.
 *
 * Per head the state is held transposed, key-major (ST[j][i] = S[i][j]), so that every step is a
 * run of axpys over i, contiguous and vectorised, with no reduction across lanes in the forward:
 *     sa  = sum_j a_j ST[j]                 what the state holds at the removal key (S a)
 *     ST[j] = ST[j] d_j + b_j sa + k_j v    d = exp(-exp(w)), computed by the caller
 *     y  += r_j ST[j]                       y = S r
 * The backward returns the gradient of d where the others return theirs; the caller turns it into
 * the gradient of w (dw = dd·d·(-exp(w))).
 * The forward writes the state at the start of every CK-token chunk to `ckpt` when asked (training);
 * the backward rebuilds a chunk's CK states from its checkpoint into a per-thread buffer, then
 * walks the chunk's tokens in reverse. Heads (b, h) run in parallel on n_threads OpenMP threads.
 */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

static void transpose(const float *src, float *dst, int N) {
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) dst[(size_t)j * N + i] = src[(size_t)i * N + j];
}

#define INLINE static inline __attribute__((always_inline))

/* One token: ST (key-major) advances in place; sa is filled; y (may be NULL, then r too) gets S r. */
INLINE void step(float *restrict ST, const float *restrict r, const float *restrict d,
                 const float *restrict k, const float *restrict v, const float *restrict a,
                 const float *restrict b, float *restrict sa, float *restrict y, int N) {
    memset(sa, 0, sizeof(float) * N);
    for (int j = 0; j < N; j++) {
        const float aj = a[j];
        const float *row = ST + (size_t)j * N;
#pragma omp simd
        for (int i = 0; i < N; i++) sa[i] += aj * row[i];
    }
    if (y) memset(y, 0, sizeof(float) * N);
    for (int j = 0; j < N; j++) {
        const float dj = d[j], bj = b[j], kj = k[j], rj = r ? r[j] : 0.0f;
        float *row = ST + (size_t)j * N;
#pragma omp simd
        for (int i = 0; i < N; i++) row[i] = row[i] * dj + bj * sa[i] + kj * v[i];
        if (y) {
#pragma omp simd
            for (int i = 0; i < N; i++) y[i] += rj * row[i];
        }
    }
}

INLINE void forward_head(int g, int T, int H, int N, int CK, const float *r, const float *d, const float *k,
                         const float *v, const float *a, const float *b, const float *s0, float *y,
                         float *s_out, float *ckpt, float *ST) {
    const int bi = g / H, h = g % H, n_ck = (T + CK - 1) / CK;
    float *sa = ST + (size_t)N * N;
    transpose(s0 + (size_t)g * N * N, ST, N);
    for (int t = 0; t < T; t++) {
        if (ckpt && t % CK == 0) memcpy(ckpt + ((size_t)g * n_ck + t / CK) * N * N, ST, sizeof(float) * N * N);
        const size_t o = (((size_t)bi * T + t) * H + h) * N;
        step(ST, r + o, d + o, k + o, v + o, a + o, b + o, sa, y + o, N);
    }
    transpose(ST, s_out + (size_t)g * N * N, N);
}

int wkv7_cpu_forward(int B, int T, int H, int N, int CK, int n_threads, const float *r, const float *d,
                     const float *k, const float *v, const float *a, const float *b, const float *s0,
                     float *y, float *s_out, float *ckpt) {
    int failed = 0;
#pragma omp parallel for num_threads(n_threads) reduction(| : failed)
    for (int g = 0; g < B * H; g++) {
        float *ST = malloc(sizeof(float) * ((size_t)N * N + N));
        if (!ST) { failed = 1; continue; }
        if (N == 64)  /* every released model: the compiler unrolls the rows into registers */
            forward_head(g, T, H, 64, CK, r, d, k, v, a, b, s0, y, s_out, ckpt, ST);
        else
            forward_head(g, T, H, N, CK, r, d, k, v, a, b, s0, y, s_out, ckpt, ST);
        free(ST);
    }
    return failed;
}

INLINE void backward_head(int g, int T, int H, int N, int CK, const float *r, const float *d, const float *k,
                          const float *v, const float *a, const float *b, const float *ckpt, const float *dy,
                          const float *ds_out, float *dr, float *dd, float *dk, float *dv, float *da, float *db,
                          float *ds0, float *buf) {
    const int n_ck = (T + CK - 1) / CK;
    const int bi = g / H, h = g % H;
    const size_t NN = (size_t)N * N;
    float *dST = buf, *states = buf + NN, *sas = states + NN * (CK + 1), *dsa = sas + (size_t)N * CK;
    transpose(ds_out + (size_t)g * NN, dST, N);
    for (int c = n_ck - 1; c >= 0; c--) {
        const int t0 = c * CK, t1 = t0 + CK < T ? t0 + CK : T;
        memcpy(states, ckpt + ((size_t)g * n_ck + c) * NN, sizeof(float) * NN);
        for (int t = t0; t < t1; t++) {  /* rebuild S_t for the chunk: states[t - t0 + 1] */
            const size_t o = (((size_t)bi * T + t) * H + h) * N;
            float *next = states + NN * (t - t0 + 1);
            memcpy(next, next - NN, sizeof(float) * NN);
            step(next, NULL, d + o, k + o, v + o, a + o, b + o, sas + (size_t)N * (t - t0), NULL, N);
        }
        for (int t = t1 - 1; t >= t0; t--) {
            const size_t o = (((size_t)bi * T + t) * H + h) * N;
            const float *St = states + NN * (t - t0 + 1), *Sp = states + NN * (t - t0);
            const float *sa = sas + (size_t)N * (t - t0), *dt = d + o;
            const float *rt = r + o, *kt = k + o, *vt = v + o, *at = a + o, *bt = b + o, *dyt = dy + o;
            float *dvt = dv + o;
            memset(dvt, 0, sizeof(float) * N);
            memset(dsa, 0, sizeof(float) * N);
            for (int j = 0; j < N; j++) {  /* y = S r, then S_t = S_{t-1} diag(d) + sa bᵀ + v kᵀ */
                float *row = dST + (size_t)j * N;
                const float *st = St + (size_t)j * N, *sp = Sp + (size_t)j * N;
                const float rj = rt[j], kj = kt[j], bj = bt[j];
                float acc_r = 0.0f, acc_k = 0.0f, acc_b = 0.0f, acc_d = 0.0f;
#pragma omp simd reduction(+ : acc_r, acc_k, acc_b, acc_d)
                for (int i = 0; i < N; i++) {
                    const float gi = row[i] + rj * dyt[i];
                    row[i] = gi;
                    acc_r += st[i] * dyt[i];
                    acc_k += gi * vt[i];
                    acc_b += gi * sa[i];
                    acc_d += gi * sp[i];
                    dvt[i] += kj * gi;
                    dsa[i] += bj * gi;
                }
                dr[o + j] = acc_r;
                dk[o + j] = acc_k;
                db[o + j] = acc_b;
                dd[o + j] = acc_d;
            }
            for (int j = 0; j < N; j++) {  /* sa = S_{t-1} a: into da and dS_{t-1} */
                float *row = dST + (size_t)j * N;
                const float *sp = Sp + (size_t)j * N;
                const float dj = dt[j], aj = at[j];
                float acc_a = 0.0f;
#pragma omp simd reduction(+ : acc_a)
                for (int i = 0; i < N; i++) {
                    acc_a += sp[i] * dsa[i];
                    row[i] = row[i] * dj + aj * dsa[i];
                }
                da[o + j] = acc_a;
            }
        }
    }
    transpose(dST, ds0 + (size_t)g * NN, N);
}

int wkv7_cpu_backward(int B, int T, int H, int N, int CK, int n_threads, const float *r, const float *d,
                      const float *k, const float *v, const float *a, const float *b, const float *ckpt,
                      const float *dy, const float *ds_out, float *dr, float *dd, float *dk, float *dv,
                      float *da, float *db, float *ds0) {
    int failed = 0;
#pragma omp parallel for num_threads(n_threads) reduction(| : failed)
    for (int g = 0; g < B * H; g++) {
        /* dST, the chunk's CK + 1 states, their sa, and dsa */
        float *buf = malloc(sizeof(float) * ((size_t)N * N * (CK + 2) + (size_t)N * (CK + 1)));
        if (!buf) { failed = 1; continue; }
        if (N == 64)
            backward_head(g, T, H, 64, CK, r, d, k, v, a, b, ckpt, dy, ds_out, dr, dd, dk, dv, da, db, ds0, buf);
        else
            backward_head(g, T, H, N, CK, r, d, k, v, a, b, ckpt, dy, ds_out, dr, dd, dk, dv, da, db, ds0, buf);
        free(buf);
    }
    return failed;
}
