/* Kernels of the native backend: int8 row dot products, int8 value axpy (the predictor: nk_pred.c).
 *
 * Math of the dots (as rwkv_edge/backends/numba_i8dot.py, so both paths agree): a weight row w (I,)
 * int8 and an activation x (I,) float32 rounded once per call in groups of NK_GS = 32 values:
 * xs_g = max|x_g| / 127, xq = rint(x * (127 / max|x_g|)) in [-127, 127]; then
 *     w . x ~= sum_g xs_g (w_g . xq_g)       (w_g . xq_g exact in int32)
 * The per-row weight scale is applied by the caller.
 *
 * Three versions of each kernel; nk_kern_get picks one at run time (cpuid), so the library is built
 * for the baseline target and runs on any CPU of its architecture:
 * - generic: plain C, any compiler and CPU (aarch64 too); the same integer math.
 * - avx2: vpmaddubsw on |xq| (u8) x sign(w, xq) (s8) (pairs <= 2 * 127 * 127: never saturates),
 *   vpmaddwd with ones to i32, then per group i32 -> float and one FMA with xs_g.
 * - vnni (AVX-512 VNNI + VL, 256-bit vpdpbusd): u8 x s8 with the weight made unsigned by flipping
 *   its sign bit (w + 128); sum (w + 128) xq = w . xq + 128 sum xq, and the second term, the same
 *   for every row, starts each lane's accumulator negated (integer: bit-identical to avx2).
 */
#include <math.h>
#include <string.h>

#include "nk.h"

#include "nk_simd.h"

float nk_h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {                      /* zero or subnormal: m * 2^-24 */
        float v = (float)m * 5.9604644775390625e-8f;
        return s ? -v : v;
    }
    f = e == 31 ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112) << 23) | (m << 13));
    float out;
    memcpy(&out, &f, 4);
    return out;
}

void nk_quantize(const float *x, int64_t I, int8_t *X, float *xs) {
    for (int64_t g = 0; g < I / NK_GS; g++) {
        const float *xg = x + g * NK_GS;
        float mx = 0.0f;
        for (int i = 0; i < NK_GS; i++) {  /* not fmaxf: a libm call at the baseline target (~1% of a step) */
            float a = fabsf(xg[i]);
            mx = a > mx ? a : mx;           /* the same max (a NaN is skipped as fmaxf skips it) */
        }
        float inv = mx > 0 ? 127.0f / mx : 0.0f;
        xs[g] = mx / 127.0f;
        for (int i = 0; i < NK_GS; i++)
            X[g * NK_GS + i] = (int8_t)lrintf(xg[i] * inv);      /* round half to even, as np.rint */
    }
}

/* ---- generic C -------------------------------------------------------------------------------- */
static void dots_generic(const int8_t *base, int64_t stride, const int32_t *idx, int64_t n, int64_t I,
                         const int8_t *X, const float *xs, int64_t T, float *y, int64_t ldy) {
    int64_t G = I / NK_GS;
    for (int64_t p = 0; p < n; p++) {
        const int8_t *w = base + stride * (idx ? idx[p] : p);
        for (int64_t t = 0; t < T; t++) {
            const int8_t *xq = X + t * I;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                int32_t s = 0;
                for (int i = 0; i < NK_GS; i++)
                    s += (int32_t)w[g * NK_GS + i] * (int32_t)xq[g * NK_GS + i];
                acc += (float)s * xs[t * G + g];
            }
            y[t * ldy + p] = acc;
        }
    }
}

static void axpy4_generic(float *out, int64_t D, const int8_t *const *v, const float *h) {
    for (int64_t d = 0; d < D; d++)
        out[d] += (h[0] * v[0][d] + h[1] * v[1][d]) + (h[2] * v[2][d] + h[3] * v[3][d]);
}

static void wkv_generic(float *S, const float *S0, int64_t N, const float *r, const float *w, const float *k,
                        const float *v, const float *a, const float *b, float *y) {
    for (int64_t i = 0; i < N; i++) {
        float *s = S + i * N, sa = 0.0f, acc = 0.0f;
        const float *s0 = S0 + i * N;
        for (int64_t j = 0; j < N; j++)
            sa += s0[j] * a[j];
        for (int64_t j = 0; j < N; j++) {
            s[j] = s0[j] * w[j] + sa * b[j] + v[i] * k[j];
            acc += s[j] * r[j];
        }
        y[i] = acc;
    }
}

static void vecmat_generic(const float *x, const int8_t *M, int64_t I, int64_t O, float *y) {
    memset(y, 0, O * sizeof(float));
    for (int64_t i = 0; i < I; i++)
        for (int64_t o = 0; o < O; o++)
            y[o] += x[i] * M[i * O + o];
}

static const nk_kern K_GENERIC = {"generic", 0, dots_generic, axpy4_generic, nk_pred_generic, wkv_generic, nk_dots4_generic,
                                  nk_axpy4q_generic, vecmat_generic, NULL};

#ifdef NK_X86
/* ---- AVX2 (and the VNNI variant of the dots) ----------------------------------------------------- */
/* Four rows x T tokens per pass: the four rows (4 I bytes) stay in L1 while every token reads them;
 * the integer product of one group is DOT(w, xv) (8 x i32), then facc += float(i32) * xs_g. */
#define DOTS_BODY(DOT)                                                                                 \
    int64_t G = I / NK_GS;                                                                             \
    for (int64_t p = 0; p < n; p += 4) {                                                               \
        const int8_t *w[4];                                                                            \
        for (int k = 0; k < 4; k++) {                                                                  \
            int64_t q = p + k < n ? p + k : p;                                                         \
            w[k] = base + stride * (idx ? idx[q] : q);                                                 \
        }                                                                                              \
        if (p + 12 < n)              /* fetch the rows two passes ahead (scattered or strided) */     \
            for (int k = 8; k < 12; k++)                                                               \
                for (int64_t l = 0; l < I; l += 64)                                                    \
                    _mm_prefetch((const char *)(base + stride * (idx ? idx[p + k] : p + k) + l), _MM_HINT_T0); \
        for (int64_t t = 0; t < T; t++) {                                                              \
            const int8_t *xq = X + t * I;                                                              \
            __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;                                \
            for (int64_t g = 0; g < G; g++) {                                                          \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + g * NK_GS));                    \
                __m256 xsv = _mm256_set1_ps(xs[t * G + g]);                                            \
                PREP;                                                                                  \
                f0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w[0] + g * NK_GS)), xsv, f0);              \
                f1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w[1] + g * NK_GS)), xsv, f1);              \
                f2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w[2] + g * NK_GS)), xsv, f2);              \
                f3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w[3] + g * NK_GS)), xsv, f3);              \
            }                                                                                          \
            float r[4] = {hsum8(f0), hsum8(f1), hsum8(f2), hsum8(f3)};                                 \
            for (int k = 0; k < 4 && p + k < n; k++)                                                   \
                y[t * ldy + p + k] = r[k];                                                             \
        }                                                                                              \
    }

/* One token (decode): one row at a time, its groups split over four accumulators. The row is one
 * sequential stream and the next rows are fetched ~8 KiB ahead; from DRAM this reads 30-34 GB/s on
 * this machine's cores against 16-18 GB/s for four interleaved rows (a 128 MiB mat-vec, I = 2048;
 * 34 vs 29 GB/s at I = 512). Float order differs from the T > 1 path (sums of the same integers). */
/* acc + float(DOT of row w's group gg) * xs_gg; PREP (per group: |xq| or the VNNI offset) from xv, gi */
#define GROUP(gg, acc) ({                                                                              \
        const int64_t gi = (gg);                                                                       \
        __m256i xv = _mm256_loadu_si256((const __m256i *)(X + gi * NK_GS));                            \
        PREP;                                                                                          \
        _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w + gi * NK_GS)), _mm256_set1_ps(xs[gi]), acc);         \
    })
#ifndef NK_KPF
#define NK_KPF 16384    /* bytes of rows fetched ahead */
#endif
#define DOT1_BODY(DOT)                                                                                 \
    int64_t G = I / NK_GS, pf = NK_KPF / I > 2 ? NK_KPF / I : 2;                                       \
    for (int64_t p = 0; p < pf && p < n; p++) {  /* the first pf rows (the loop fetches from p + pf on): \
                                      * at once, not one demand miss after another (a pool chunk's start) */ \
        const int8_t *wn = base + stride * (idx ? idx[p] : p);                                         \
        for (int64_t l = 0; l < I; l += 64)                                                            \
            _mm_prefetch((const char *)(wn + l), _MM_HINT_T0);                                         \
    }                                                                                                  \
    for (int64_t p = 0; p < n; p++) {                                                                  \
        const int8_t *w = base + stride * (idx ? idx[p] : p);                                          \
        if (p + pf < n) {                                                                              \
            const int8_t *wn = base + stride * (idx ? idx[p + pf] : p + pf);                           \
            for (int64_t l = 0; l < I; l += 64)                                                        \
                _mm_prefetch((const char *)(wn + l), _MM_HINT_T0);                                     \
        }                                                                                              \
        __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;                                    \
        int64_t g = 0;                                                                                 \
        for (; g + 4 <= G; g += 4) {                  /* four independent FMA chains */               \
            f0 = GROUP(g, f0);                                                                         \
            f1 = GROUP(g + 1, f1);                                                                     \
            f2 = GROUP(g + 2, f2);                                                                     \
            f3 = GROUP(g + 3, f3);                                                                     \
        }                                                                                              \
        for (; g < G; g++)                                                                             \
            f0 = GROUP(g, f0);                                                                         \
        y[p] = hsum8(_mm256_add_ps(_mm256_add_ps(f0, f1), _mm256_add_ps(f2, f3)));                     \
    }

AVX2 static void dots_avx2(const int8_t *base, int64_t stride, const int32_t *idx, int64_t n, int64_t I,
                           const int8_t *X, const float *xs, int64_t T, float *y, int64_t ldy) {
    const __m256i ones = _mm256_set1_epi16(1);
#define PREP __m256i ax = _mm256_sign_epi8(xv, xv)      /* |xq| as u8, shared by the four rows */
#define DOT(ptr) _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(                        \
                     _mm256_loadu_si256((const __m256i *)(ptr)), xv)), ones)
    if (T == 1) {
        DOT1_BODY(DOT)
    } else {
        DOTS_BODY(DOT)
    }
#undef PREP
#undef DOT
}

VNNI static void dots_vnni(const int8_t *base, int64_t stride, const int32_t *idx, int64_t n, int64_t I,
                           const int8_t *X, const float *xs, int64_t T, float *y, int64_t ldy) {
    /* (w + 128) . xq - 128 . xq per i32 lane (4 bytes): exact in int32, so the float accumulation
     * sees the same integers as the AVX2 kernel (same lane layout: 4 consecutive bytes per lane) and
     * the results are bit-identical; a float correction taken off after the sum would cancel
     * catastrophically (|sum (w + 128) xq| ~ 1e6 per group against a result of ~1e3). */
    const __m256i flip = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
#define NEG_OFFSET(xv) _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, flip, xv))   /* -128 xq per lane */
#define DOT(ptr) _mm256_dpbusd_epi32(nc, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(ptr)), flip), xv)
    if (T == 1 && I / NK_GS <= 256) {     /* the offsets once per call, not once per row and group */
        __m256i ncs[256];
        for (int64_t g = 0; g < I / NK_GS; g++)
            ncs[g] = NEG_OFFSET(_mm256_loadu_si256((const __m256i *)(X + g * NK_GS)));
#define PREP __m256i nc = ncs[gi]    /* gi: GROUP's group */
        DOT1_BODY(DOT)
#undef PREP
    } else if (T > 1) {                   /* prefill: two tokens per 512-bit register (nk_prefill_kernels.c) */
        nk_dots_vnni512(base, stride, idx, n, I, X, xs, T, y, ldy);
    } else {
#define PREP __m256i nc = NEG_OFFSET(xv)
        DOTS_BODY(DOT)
#undef PREP
    }
#undef NEG_OFFSET
#undef DOT
}

/* The decode's sparse FFN of one piece in one pass over its neurons' bundles (int8 kv (F, 2, D), scales
 * kv_scale (F, 2)): for each neuron idx[p] its key dot (dots_vnni's T = 1 sum, bit for bit), a = dot * ks;
 * if a > 0 it joins the active list (j, a^2 vs) and its value column is fetched at once; the value
 * columns go through nk_axpy4_512 in groups of four consecutive active neurons, as nk_ffn.c's
 * value_columns does after a separate key pass: the same groups in the same order, so the same floats.
 * Why: the two passes read scattered 2 KB rows at ~11-12 GB/s on one thread at 1.5B shapes (plain
 * streams: 31-35). One thread keeps only so many misses in flight, so the rows are fetched at two
 * distances: NK_FPF rows ahead into L1 (T0) and NK_FPF2 rows ahead with PREFETCHNTA (a read-only
 * microbench of the sets' key rows: ~17 GB/s against ~14 with T0 at 8 rows alone; T1 or T2 as the far
 * hint gained less), and each value column from its key dot on, NK_FPV active neurons before its axpy.
 * No branch on a key's sign (a mispredict per other neuron; paired microbench of the sets' FFN, 4 KB
 * pages: 0.88-0.905x the two passes' time branchless, 1.00-1.02x with the branch).
 * out (D,) +=; returns the active count (the columns read), their list in pj / ph. */
#ifndef NK_FPF
#define NK_FPF 4       /* key rows fetched ahead into L1 */
#endif
#ifndef NK_FPF2
#define NK_FPF2 12     /* key rows fetched ahead with NK_FPH2 */
#endif
#ifndef NK_FPH2
#define NK_FPH2 _MM_HINT_NTA
#endif
#ifndef NK_FPHV
#define NK_FPHV _MM_HINT_T0
#endif
#ifndef NK_FPV
#define NK_FPV 8       /* active neurons between a value column's fetch and its axpy (beyond the group of four) */
#endif
#define FETCH_ROW(r, hint)                                                                             \
    for (int64_t l = 0; l < I; l += 64)                                                                \
        _mm_prefetch((const char *)(kv + 2 * I * idx[r] + l), hint)
VNNI int64_t nk_ffn_set_vnni(const int8_t *kv, const float *sc, const int32_t *idx, int64_t n, int64_t I,
                             const int8_t *X, const float *xs, float *out, int32_t *pj, float *ph) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    __m256i ncs[256];                    /* -128 xq per lane, once per call (I / NK_GS <= 256: the caller's test) */
    for (int64_t g = 0; g < I / NK_GS; g++)
        ncs[g] = _mm256_sub_epi32(zero, _mm256_dpbusd_epi32(zero, flip, _mm256_loadu_si256((const __m256i *)(X + g * NK_GS))));
#define PREP __m256i nc = ncs[gi]
#define DOT(ptr) _mm256_dpbusd_epi32(nc, _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(ptr)), flip), xv)
    int64_t G = I / NK_GS, na = 0, done = 0;
    for (int64_t p = 0; p < NK_FPF && p < n; p++)
        FETCH_ROW(p, _MM_HINT_T0);
    for (int64_t p = NK_FPF; p < NK_FPF2 && p < n; p++)
        FETCH_ROW(p, NK_FPH2);
    for (int64_t p = 0; p < n; p++) {
        const int64_t j = idx[p];
        const int8_t *w = kv + 2 * I * j;
        if (p + NK_FPF < n)
            FETCH_ROW(p + NK_FPF, _MM_HINT_T0);
        if (p + NK_FPF2 < n)
            FETCH_ROW(p + NK_FPF2, NK_FPH2);
        __m256 f0 = _mm256_setzero_ps(), f1 = f0, f2 = f0, f3 = f0;
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) {
            f0 = GROUP(g, f0);
            f1 = GROUP(g + 1, f1);
            f2 = GROUP(g + 2, f2);
            f3 = GROUP(g + 3, f3);
        }
        for (; g < G; g++)
            f0 = GROUP(g, f0);
        float a = hsum8(_mm256_add_ps(_mm256_add_ps(f0, f1), _mm256_add_ps(f2, f3))) * sc[2 * j];
        /* no branch on the sign (random: a mispredict per other neuron stalled the next rows' dots):
         * the slot is written always and kept when a > 0; an inactive neuron's fetch goes to its key row */
        int on = a > 0;
        pj[na] = (int32_t)j;
        ph[na] = a * a * sc[2 * j + 1];
        na += on;
        const char *c = (const char *)(w + (on ? I : 0));
        for (int64_t l = 0; l < I; l += 64)
            _mm_prefetch(c + l, NK_FPHV);
        if (na - done >= 4 + NK_FPV) {
            const int8_t *v[4] = {kv + 2 * I * pj[done] + I, kv + 2 * I * pj[done + 1] + I,
                                  kv + 2 * I * pj[done + 2] + I, kv + 2 * I * pj[done + 3] + I};
            nk_axpy4_512(out, I, v, ph + done);
            done += 4;
        }
    }
    for (; done < na; done += 4) {       /* the rest, the last group padded as value_columns pads it */
        const int8_t *v[4];
        float h[4];
        for (int k = 0; k < 4; k++) {
            v[k] = kv + 2 * I * pj[done + k < na ? done + k : done] + I;
            h[k] = done + k < na ? ph[done + k] : 0.0f;
        }
        nk_axpy4_512(out, I, v, h);
    }
#undef PREP
#undef DOT
    return na;
}
#undef FETCH_ROW

AVX2 static void axpy4_avx2(float *out, int64_t D, const int8_t *const *v, const float *h) {
    __m256 h0 = _mm256_set1_ps(h[0]), h1 = _mm256_set1_ps(h[1]), h2 = _mm256_set1_ps(h[2]), h3 = _mm256_set1_ps(h[3]);
#define CV(k) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(v[k] + d))))
    for (int64_t d = 0; d < D; d += 8) {
        __m256 a = _mm256_fmadd_ps(h0, CV(0), _mm256_mul_ps(h1, CV(1)));
        __m256 b = _mm256_fmadd_ps(h2, CV(2), _mm256_mul_ps(h3, CV(3)));
        _mm256_storeu_ps(out + d, _mm256_add_ps(_mm256_loadu_ps(out + d), _mm256_add_ps(a, b)));
    }
#undef CV
}

AVX2 static void wkv_avx2(float *S, const float *S0, int64_t N, const float *r, const float *w, const float *k,
                         const float *v, const float *a, const float *b, float *y) {
    for (int64_t i = 0; i < N; i++) {
        float *s = S + i * N;
        const float *s0 = S0 + i * N;
        __m256 sa = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < N; j += 8)
            sa = _mm256_fmadd_ps(_mm256_loadu_ps(s0 + j), _mm256_loadu_ps(a + j), sa);
        __m256 sav = _mm256_set1_ps(hsum8(sa)), vi = _mm256_set1_ps(v[i]);
        for (int64_t j = 0; j < N; j += 8) {
            __m256 x = _mm256_mul_ps(_mm256_loadu_ps(s0 + j), _mm256_loadu_ps(w + j));
            x = _mm256_fmadd_ps(sav, _mm256_loadu_ps(b + j), x);
            x = _mm256_fmadd_ps(vi, _mm256_loadu_ps(k + j), x);
            _mm256_storeu_ps(s + j, x);
            acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(r + j), acc);
        }
        y[i] = hsum8(acc);
    }
}

/* y = x @ M for a LoRA's (I, O) int8 matrix, O small (32-512): column blocks of up to 64 held in
 * eight accumulators while every row i adds x_i * M[i, block] (one 64-byte line per row and block),
 * so y is not reloaded per row (axpy4 per four rows did, and was ~15% of a decode step).
 * The matrices (32-128 KiB each, 8 per layer) come from DRAM in a decode step and the hardware
 * prefetcher did not keep up (perf: ~60% of the kernel's time at the first load of a row): each row
 * prefetches the line VM_PD rows ahead in this block, or, past the block's last row, the line of the
 * next block's row (a block of O = 512 has 32-128 rows); the call starts by fetching block 0's first
 * VM_PD rows. Prefetches do not change the sums (same order as before). */
#define VM_PD 48
#define VECMAT_BLOCK(NV)                                                                               \
    {                                                                                                  \
        __m256 acc[NV];                                                                                \
        for (int v = 0; v < NV; v++)                                                                   \
            acc[v] = _mm256_setzero_ps();                                                              \
        int64_t cn = c0 + 8 * NV;                                                                      \
        for (int64_t i = 0; i < I; i++) {                                                              \
            int64_t j = i + VM_PD;                                                                     \
            if (j < I)                                                                                 \
                _mm_prefetch((const char *)(M + j * O + c0), _MM_HINT_T0);                             \
            else if (cn < O && j - I < I)                                                              \
                _mm_prefetch((const char *)(M + (j - I) * O + cn), _MM_HINT_T0);                      \
            __m256 xb = _mm256_set1_ps(x[i]);                                                          \
            const int8_t *row = M + i * O + c0;                                                        \
            for (int v = 0; v < NV; v++)                                                               \
                acc[v] = _mm256_fmadd_ps(xb, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(                  \
                                                 _mm_loadl_epi64((const __m128i *)(row + 8 * v)))), acc[v]); \
        }                                                                                              \
        for (int v = 0; v < NV; v++)                                                                   \
            _mm256_storeu_ps(y + c0 + 8 * v, acc[v]);                                                  \
        c0 = cn;                                                                                       \
    }

AVX2 static void vecmat_avx2(const float *x, const int8_t *M, int64_t I, int64_t O, float *y) {
    int64_t c0 = 0;
    for (int64_t i = 0; i < I && i < VM_PD; i++)
        _mm_prefetch((const char *)(M + i * O), _MM_HINT_T0);
    while (O - c0 >= 64)
        VECMAT_BLOCK(8)
    while (O - c0 >= 32)
        VECMAT_BLOCK(4)
    while (O - c0 >= 8)
        VECMAT_BLOCK(1)
}

/* vecmat_avx2 on 512-bit registers (VNNI level): each output column keeps its own lane and gets the
 * same fma per row in the same order, so the floats are vecmat_avx2's; half the convert/fma
 * instructions per byte (the decode's LoRAs ran at ~12 GB/s on one thread at 1.5B shapes, bound by
 * them). Blocks of 16 NV columns; a 128-column block spans two lines per row, both prefetched. */
#define VECMAT512_BLOCK(NV)                                                                            \
    {                                                                                                  \
        __m512 acc[NV];                                                                                \
        for (int v = 0; v < NV; v++)                                                                   \
            acc[v] = _mm512_setzero_ps();                                                              \
        int64_t cn = c0 + 16 * NV;                                                                     \
        for (int64_t i = 0; i < I; i++) {                                                              \
            int64_t j = i + VM_PD;                                                                     \
            const int8_t *pf = j < I ? M + j * O + c0 : (cn < O && j - I < I ? M + (j - I) * O + cn : NULL); \
            if (pf) {                                                                                  \
                _mm_prefetch((const char *)pf, _MM_HINT_T0);                                           \
                if (NV > 4)                                                                            \
                    _mm_prefetch((const char *)pf + 64, _MM_HINT_T0);                                  \
            }                                                                                          \
            __m512 xb = _mm512_set1_ps(x[i]);                                                          \
            const int8_t *row = M + i * O + c0;                                                        \
            for (int v = 0; v < NV; v++)                                                               \
                acc[v] = _mm512_fmadd_ps(xb, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(                  \
                                                 _mm_loadu_si128((const __m128i *)(row + 16 * v)))), acc[v]); \
        }                                                                                              \
        for (int v = 0; v < NV; v++)                                                                   \
            _mm512_storeu_ps(y + c0 + 16 * v, acc[v]);                                                 \
        c0 = cn;                                                                                       \
    }

VNNI static void vecmat_512(const float *x, const int8_t *M, int64_t I, int64_t O, float *y) {
    int64_t c0 = 0;
    for (int64_t i = 0; i < I && i < VM_PD; i++)
        _mm_prefetch((const char *)(M + i * O), _MM_HINT_T0);
    while (O - c0 >= 128)
        VECMAT512_BLOCK(8)
    while (O - c0 >= 64)
        VECMAT512_BLOCK(4)
    while (O - c0 >= 16)
        VECMAT512_BLOCK(1)
    while (O - c0 >= 8)
        VECMAT_BLOCK(1)
}

static const nk_kern K_AVX2 = {"avx2", 1, dots_avx2, axpy4_avx2, nk_pred_avx2, wkv_avx2, nk_dots4_avx2, nk_axpy4q_avx2,
                               vecmat_avx2, NULL};
static const nk_kern K_VNNI = {"vnni", 2, dots_vnni, axpy4_avx2, nk_pred_avx2, wkv_avx2, nk_dots4_vnni, nk_axpy4q_avx2,
                               vecmat_512, nk_vecmatp_512};
#endif

int nk_cpu_level(void) {
#ifdef NK_X86
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")))
        return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
        && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
#else
    return 0;
#endif
}

const nk_kern *nk_kern_get(int level) {
    if (level < 0 || level > nk_cpu_level())
        return NULL;
#ifdef NK_X86
    if (level == 2)
        return &K_VNNI;
    if (level == 1)
        return &K_AVX2;
#endif
    return &K_GENERIC;
}
