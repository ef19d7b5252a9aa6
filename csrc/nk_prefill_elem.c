/* The elementwise parts of the native prefill (csrc/nk_prefill.c runs them), each giving the floats of the
 * steps' scalar code (nk_rwkv7.c), so a prefill equals its steps:
 * - the time-mix's per-token elementwise part (value residual, in-context rate, decay, kk normalised per
 *   head): plain C, or at the VNNI level on 16 lanes with an expf bit-identical to glibc's (below);
 * - the output gate's sigmoid of a chunk;
 * - layer norms and group norms four tokens at a time (interleaved sums, each token's own order);
 * - the layer norm + token shift (+ rounding, predictor prep) of a chunk split over threads by token.
 */
#include <math.h>
#include <string.h>

#include "nk_model.h"

#include "nk_simd.h"

static inline float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

/* per head: KN (= k * k_k) L2-normalised, A (the in-context rate) times it, k's update, KN = -kk
 * (the steps' operations and sum order; both mix_token versions end with it) */
static void kk_heads(const nk_layer *b, int64_t h0, int64_t h1, int64_t N, float *k, float *A, float *KN) {
    for (int64_t h = h0; h < h1; h++) {
        float ss = 0.0f, *kh = KN + h * N;
        for (int64_t j = 0; j < N; j++)
            ss += kh[j] * kh[j];
        float inv = 1.0f / fmaxf(sqrtf(ss), 1e-12f);
        for (int64_t j = 0; j < N; j++) {
            int64_t d = h * N + j;
            float kn = kh[j] * inv, a = A[d];
            A[d] = kn * a;
            k[d] = k[d] * (1.0f + (a - 1.0f) * b->k_a[d]);
            kh[j] = -kn;
        }
    }
}

static void mix_token_generic(const nk_layer *b, int64_t h0, int64_t h1, int64_t N, int first, float *k, float *v,
                              const float *vf, float *W, float *A, const float *GV, float *KN) {
    for (int64_t d = h0 * N; d < h1 * N; d++) {
        if (!first)
            v[d] += (vf[d] - v[d]) * sigmoidf_(b->v0[d] + GV[d]);
        A[d] = sigmoidf_(b->a0[d] + A[d]);
        KN[d] = k[d] * b->k_k[d];
        W[d] = expf(-0.606531f * sigmoidf_(b->w0[d] + W[d]));
    }
    kk_heads(b, h0, h1, N, k, A, KN);
}

#ifdef NK_X86
/* ---- expf on 16 lanes, bit-identical to glibc's (2.27+) x86-64 expf on every float ---------------- *
 * glibc's algorithm (sysdeps/ieee754/flt-32/e_expf.c, the FMA build its ifunc picks on any CPU with
 * AVX-512): x * 32 / ln 2 = k + r in double, 2^(k / 32) from a 32-entry table plus k's exponent bits,
 * a cubic in r, rounded once to float; in its FMA build the compiler fuses both uses of x * 32 / ln 2
 * (the rounding add and r) and the polynomial. Checked against this machine's libm expf on all 2^32
 * floats: 0 differences (NaN in, NaN out), while the unfused form differs on 2; tests/test_native.py
 * compares it with libm's expf where the platform is glibc on x86-64. Only the prefill's VNNI level
 * uses it, so everywhere its time-mix gives the steps' floats where libm is glibc's. fp-contract=off:
 * GCC must not fuse the intrinsics' plain mul + add (neither here nor in mix_token_512). */
#define VNNIX __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni"), optimize("fp-contract=off")))
static const uint64_t exp2f_tab[32] = {   /* bits of 2^(i / 32) - (i << 47) (glibc __exp2f_data.tab) */
    0x3ff0000000000000ull, 0x3fefd9b0d3158574ull, 0x3fefb5586cf9890full, 0x3fef9301d0125b51ull,
    0x3fef72b83c7d517bull, 0x3fef54873168b9aaull, 0x3fef387a6e756238ull, 0x3fef1e9df51fdee1ull,
    0x3fef06fe0a31b715ull, 0x3feef1a7373aa9cbull, 0x3feedea64c123422ull, 0x3feece086061892dull,
    0x3feebfdad5362a27ull, 0x3feeb42b569d4f82ull, 0x3feeab07dd485429ull, 0x3feea47eb03a5585ull,
    0x3feea09e667f3bcdull, 0x3fee9f75e8ec5f74ull, 0x3feea11473eb0187ull, 0x3feea589994cce13ull,
    0x3feeace5422aa0dbull, 0x3feeb737b0cdc5e5ull, 0x3feec49182a3f090ull, 0x3feed503b23e255dull,
    0x3feee89f995ad3adull, 0x3feeff76f2fb5e47ull, 0x3fef199bdd85529cull, 0x3fef3720dcef9069ull,
    0x3fef5818dcfba487ull, 0x3fef7c97337b9b5full, 0x3fefa4afa2a490daull, 0x3fefd0765b6e4540ull};

VNNIX static inline __m256 expf8_512(__m256 x) {
    const __m512d inv = _mm512_set1_pd(0x1.71547652b82fep+0 * 32), sh = _mm512_set1_pd(0x1.8p+52);
    const __m512d c0 = _mm512_set1_pd(0x1.c6af84b912394p-5 / 32 / 32 / 32);
    const __m512d c1 = _mm512_set1_pd(0x1.ebfce50fac4f3p-3 / 32 / 32), c2 = _mm512_set1_pd(0x1.62e42ff0c52d6p-1 / 32);
    const __m512i t0 = _mm512_loadu_si512(exp2f_tab), t1 = _mm512_loadu_si512(exp2f_tab + 8);
    const __m512i t2 = _mm512_loadu_si512(exp2f_tab + 16), t3 = _mm512_loadu_si512(exp2f_tab + 24);
    __m512d xd = _mm512_cvtps_pd(x);
    __m512d kd = _mm512_fmadd_pd(inv, xd, sh);                   /* k in the low mantissa bits */
    __m512i ki = _mm512_castpd_si512(kd);
    kd = _mm512_sub_pd(kd, sh);
    __m512d r = _mm512_fmsub_pd(inv, xd, kd);
    __m512i t = _mm512_mask_blend_epi64(_mm512_test_epi64_mask(ki, _mm512_set1_epi64(16)),
                                        _mm512_permutex2var_epi64(t0, ki, t1), _mm512_permutex2var_epi64(t2, ki, t3));
    __m512d sc = _mm512_castsi512_pd(_mm512_add_epi64(t, _mm512_slli_epi64(ki, 47)));
    __m512d z = _mm512_fmadd_pd(c0, r, c1), r2 = _mm512_mul_pd(r, r);
    __m512d y = _mm512_fmadd_pd(z, r2, _mm512_fmadd_pd(c2, r, _mm512_set1_pd(1.0)));
    __m256 out = _mm512_cvtpd_ps(_mm512_mul_pd(y, sc));
    /* glibc's special cases: overflow to inf above 0x1.62e42ep6, underflow to 0 below -0x1.9fe368p6 */
    out = _mm256_blendv_ps(out, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(0x1.62e42ep6f), _CMP_GT_OQ));
    return _mm256_blendv_ps(out, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-0x1.9fe368p6f), _CMP_LT_OQ));
}

VNNIX static inline __m512 expf16_512(__m512 x) {
    __m256 lo = expf8_512(_mm512_castps512_ps256(x));
    __m256 hi = expf8_512(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

/* 1 / (1 + expf(-z)): sigmoidf_'s operations */
VNNIX static inline __m512 sigmoid16_512(__m512 z) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, expf16_512(_mm512_sub_ps(_mm512_setzero_ps(), z))));
}

/* mix_token_generic with the first loop on 16 lanes (each lane: its operations, unfused, with the
 * expf above) and the per-head rest in C, which GCC may vectorise across j or heads but not reorder
 * within a sum (fp-contract off): the same floats as mix_token_generic where libm is glibc's. N % 16. */
VNNIX static void mix_token_512(const nk_layer *b, int64_t h0, int64_t h1, int64_t N, int first, float *k, float *v,
                                const float *vf, float *W, float *A, const float *GV, float *KN) {
    for (int64_t d = h0 * N; d < h1 * N; d += 16) {
        if (!first) {
            __m512 vv = _mm512_loadu_ps(v + d);
            __m512 sg = sigmoid16_512(_mm512_add_ps(_mm512_loadu_ps(b->v0 + d), _mm512_loadu_ps(GV + d)));
            _mm512_storeu_ps(v + d, _mm512_add_ps(vv, _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(vf + d), vv), sg)));
        }
        _mm512_storeu_ps(A + d, sigmoid16_512(_mm512_add_ps(_mm512_loadu_ps(b->a0 + d), _mm512_loadu_ps(A + d))));
        _mm512_storeu_ps(KN + d, _mm512_mul_ps(_mm512_loadu_ps(k + d), _mm512_loadu_ps(b->k_k + d)));
        __m512 sw = sigmoid16_512(_mm512_add_ps(_mm512_loadu_ps(b->w0 + d), _mm512_loadu_ps(W + d)));
        _mm512_storeu_ps(W + d, expf16_512(_mm512_mul_ps(_mm512_set1_ps(-0.606531f), sw)));
    }
    kk_heads(b, h0, h1, N, k, A, KN);
}

VNNIX static void expf_many_512(const float *x, int64_t n, float *y) {
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(y + i, expf16_512(_mm512_loadu_ps(x + i)));
}

/* act_rows' sigmoid (kind 1) on 16 lanes: x (T, n), n % 16 == 0 */
VNNIX static void sigmoid_rows_512(float *x, int64_t T, int64_t n, int64_t ld) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < n; j += 16)
            _mm512_storeu_ps(x + t * ld + j, sigmoid16_512(_mm512_loadu_ps(x + t * ld + j)));
}
#endif


/* one token's elementwise time-mix (its (D,) rows), heads [h0, h1), at the level of m->k: v += value
 * residual (unless first), A = sigmoid(a0 + A), W = the decay; then per head KN = k * k_k normalised,
 * A = KN * A (the wkv's b), k's update, KN = -KN (the wkv's a). The prefill calls it per token (all
 * heads), the decode step per head range of a thread (nk_rwkv7.c heads_task): the same floats. */
void nk_mix_heads(const nk_model *m, const nk_layer *b, int first, int64_t h0, int64_t h1, float *k, float *v,
                  const float *vf, float *W, float *A, const float *GV, float *KN) {
#ifdef NK_X86
    if (m->k->level == 2 && m->N % 16 == 0) {
        mix_token_512(b, h0, h1, m->N, first, k, v, vf, W, A, GV, KN);
        return;
    }
#endif
    mix_token_generic(b, h0, h1, m->N, first, k, v, vf, W, A, GV, KN);
}

void nk_mix_token(const nk_model *m, const nk_layer *b, int first, float *k, float *v, const float *vf, float *W,
                  float *A, const float *GV, float *KN) {
    nk_mix_heads(m, b, first, 0, m->D / m->N, k, v, vf, W, A, GV, KN);
}

/* x (T, n) (row stride ld) = sigmoid of itself (the output gate's hidden LoRA layer), at the level of m->k */
void nk_sigmoid_rows(const nk_model *m, float *x, int64_t T, int64_t n, int64_t ld) {
#ifdef NK_X86
    if (m->k->level == 2 && n % 16 == 0) {
        sigmoid_rows_512(x, T, n, ld);
        return;
    }
#endif
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = 0; j < n; j++)
            x[t * ld + j] = sigmoidf_(x[t * ld + j]);
}

/* ---- four tokens at a time: nk_head_out with the four tokens' sums interleaved ------------------ *
 * Each token's sums run in its own order (column by column, as the one-token function), so the
 * results are its bit for bit; four independent chains instead of one (a float add waits ~3 cycles
 * on the one before). Plain C of the baseline target: no FMA to contract into, as in nk_rwkv7.c.
 * (The layer norm sums in 8 lanes itself: nk_layer_norm, one row at a time.) */
/* x (T, D) rows -> out (T, D) by nk_layer_norm */
static void layer_norm_rows(const float *x, int64_t T, const float *w, const float *b, float eps, int64_t D,
                            float *out) {
    for (int64_t t = 0; t < T; t++)
        nk_layer_norm(x + t * D, w, b, eps, D, out + t * D);
}

/* nk_head_out of head h for tokens t .. t + 3 (their (D,) rows r, k, v, g, y at stride D) */
static void head_out4(const nk_layer *b, int64_t N, int64_t h, int64_t D, const float *r, const float *k,
                      const float *v, const float *g, float *y) {
    float mu[4] = {0, 0, 0, 0}, var[4] = {0, 0, 0, 0}, bonus[4] = {0, 0, 0, 0}, inv[4];
    int64_t o = h * N;
    for (int64_t j = 0; j < N; j++)
        for (int q = 0; q < 4; q++)
            mu[q] += y[q * D + o + j];
    for (int q = 0; q < 4; q++)
        mu[q] /= (float)N;
    for (int64_t j = 0; j < N; j++)
        for (int q = 0; q < 4; q++)
            var[q] += (y[q * D + o + j] - mu[q]) * (y[q * D + o + j] - mu[q]);
    for (int q = 0; q < 4; q++)
        inv[q] = 1.0f / sqrtf(var[q] / (float)N + 64e-5f);
    for (int64_t j = 0; j < N; j++)
        for (int q = 0; q < 4; q++)
            bonus[q] += r[q * D + o + j] * k[q * D + o + j] * b->r_k[o + j];
    for (int q = 0; q < 4; q++)
        for (int64_t j = 0; j < N; j++) {
            int64_t d = o + j, e = q * D + d;
            y[e] = ((y[e] - mu[q]) * inv[q] * b->lnx_w[d] + b->lnx_b[d] + bonus[q] * v[e]) * g[e];
        }
}

/* nk_head_out of head h for the T tokens of rows r, k, v, g, y (T, D), four tokens at a time */
void nk_head_out_rows(const nk_layer *b, int64_t N, int64_t h, int64_t D, int64_t T, const float *r, const float *k,
                      const float *v, const float *g, float *y) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4)
        head_out4(b, N, h, D, r + t * D, k + t * D, v + t * D, g + t * D, y + t * D);
    for (; t < T; t++)
        nk_head_out(b, N, h, r + t * D, k + t * D, v + t * D, g + t * D, y + t * D + h * N);
}

/* ---- layer norm + token shift of a chunk, split over threads by token ---------------------------- */
typedef struct {
    nk_model *m;
    const float *lnw, *lnb;    /* the norm (D,) */
    const float *prev0;        /* (D,) the normed input of the token before the chunk (the state) */
    const float *const *mw;    /* nmix (D,) shift mixes */
    float *const *out;         /* nmix (T, D) outputs */
    int nmix, bits;            /* bits 8 / 4: out[0] rounded into m->Xq / m->X4 (+ xs, init); 0: not */
    const nk_pred *p;          /* NULL, or each token's predictor prep of out[0] into m->pxt[t] */
} shift_ctx;

/* tokens [lo, hi): xa = LN(x), out[c] = xa + (prev - xa) * mw[c] with prev the previous token's xa: the
 * token before lo is normed again into the thread's scratch (the same function on the same row: the
 * same floats as the steps' serial loop); then the per-token rounding and predictor prep of out[0]. */
static void shift_task(void *c, int tid, int64_t lo, int64_t hi) {
    shift_ctx *a = (shift_ctx *)c;
    nk_model *m = a->m;
    int64_t D = m->D, G = D / NK_GS;
    const float *prev = a->prev0;
    if (lo > 0) {
        nk_layer_norm(m->x + (lo - 1) * D, a->lnw, a->lnb, 1e-5f, D, m->tls[tid].lnprev);
        prev = m->tls[tid].lnprev;
    }
    layer_norm_rows(m->x + lo * D, hi - lo, a->lnw, a->lnb, 1e-5f, D, m->xa + lo * D);
    for (int64_t t = lo; t < hi; t++) {
        float *xa = m->xa + t * D;
        for (int k = 0; k < a->nmix; k++)
            for (int64_t d = 0; d < D; d++)
                a->out[k][t * D + d] = xa[d] + (prev[d] - xa[d]) * a->mw[k][d];
        prev = xa;
    }
    if (a->bits == 8)
        nk_quantize_many(m, a->out[0] + lo * D, hi - lo, D, m->Xq + lo * D, m->xs + lo * G);
    else if (a->bits == 4)
        nk_quantize4_many(m, a->out[0] + lo * D, hi - lo, D, m->X4 + lo * D, m->xs + lo * G,
                          m->init + lo * NK_INIT(G));
    if (a->p)
        for (int64_t t = lo; t < hi; t++)
            nk_pred_prep_k(m->k, a->p, a->out[0] + t * D, &m->pxt[t]);
}

/* m->xa (T, D) = LN(m->x) (lnw, lnb), out[c] (T, D) = the token shift of it by mw[c] from prev0 (D,),
 * over threads by token; then prev0's successor state is the caller's (xa[T - 1]). bits / p: also round
 * out[0] for the int8 (8) or int4 (4) dots, and prep it for predictor p (nk_pred_prep per token). */
void nk_shift_prefill(nk_model *m, int64_t T, const float *lnw, const float *lnb, const float *prev0,
                      const float *const *mw, float *const *out, int nmix, int bits, const nk_pred *p) {
    shift_ctx c = {m, lnw, lnb, prev0, mw, out, nmix, bits, p};
    NK_TAG(11);
    nk_pool_run(m->pool, shift_task, &c, T);
}

/* ---- for the tests (tests/test_native.py): the prefill's 16-lane expf (n % 16; -1 where it is not
 * built or the CPU lacks the VNNI level) ---------------------------------------------------------- */
int nk_test_expf(const float *x, int64_t n, float *y) {
#ifdef NK_X86
    if (nk_cpu_level() < 2 || n % 16)
        return -1;
    expf_many_512(x, n, y);
    return 0;
#else
    (void)x, (void)n, (void)y;
    return -1;
#endif
}
