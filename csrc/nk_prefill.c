/* The time-mix of a prefill chunk (T > 1 tokens) after its r/k/v mat-vecs (nk_rwkv7.c time_mix):
 * the same math as the decode step's per-token loop, reorganised for a chunk:
 * - the LoRAs (M (I, O) int8 (in, out) + column scale cs (O,)) for all T tokens at once: each int8
 *   row of M is converted to float once per block of up to 6 tokens and FMA'd into all of them
 *   (decode: once per token), 6 tokens x 16 outputs of accumulators in registers;
 * - the elementwise part token by token with the steps' scalar code (libm expf: an 8-wide polynomial
 *   exp differs from it by ~1 ulp, enough to flip an int8 rounding of a later activation, which the
 *   prefill-vs-steps tests see as a 2e-2 jump in one token's logits);
 * - the wkv recurrence head by head over all T tokens (the head's (N, N) state, 16 KiB at N 64,
 *   stays in L1 across the chunk; decode walks all heads per token).
 * The LoRA sums keep the order of the steps' vecmat, so on the same inputs the prefill's time-mix
 * gives the steps' floats (the 6-token tile only reuses each converted row; it does not reorder sums).
 * Threads split the tokens (LoRAs, elementwise), then the heads (wkv, group norm; one head per item).
 * Also here: the layer norm + token shift of a chunk by token over threads (nk_shift_prefill).
 * Scratch: m->pre[0..5], (TB, max(D, LoRA dims)) floats each (nk_model_new).
 * Also here: the vectorised activation rounding of a chunk and wkv on 512-bit registers; the other
 * 512-bit prefill kernels (dots, value axpy, active neurons) are in nk_prefill_kernels.c.
 */
#include <math.h>
#include <string.h>

#include "nk_model.h"

#include "nk_simd.h"

/* ---- Y (T, O) = X (T, I) @ (M (I, O) int8 * cs) ------------------------------------------------- */
static void lora_rows_generic(const float *X, int64_t ldx, int64_t T, const int8_t *M, const float *cs, int64_t I,
                              int64_t O, float *Y, int64_t ldy) {
    for (int64_t t = 0; t < T; t++) {
        float *y = Y + t * ldy;
        const float *x = X + t * ldx;
        memset(y, 0, O * sizeof(float));
        for (int64_t i = 0; i < I; i++)                /* vecmat_generic's loop (the steps' lora()) */
            for (int64_t o = 0; o < O; o++)
                y[o] += x[i] * M[i * O + o];
        for (int64_t o = 0; o < O; o++)
            y[o] *= cs[o];
    }
}

#ifdef NK_X86
/* NT (<= 6) tokens x 16 outputs: 12 accumulators; each row of M converted once for the NT tokens,
 * then per token acc = fma(x_i, M_i, acc) over i in order: the sums of vecmat_avx2 in the steps'
 * lora() (nk_rwkv7.c), so the prefill's LoRAs equal the steps' bit for bit */
AVX2 static inline __attribute__((always_inline)) void lora_tile(const float *X, int64_t ldx, const int8_t *M,
                                                                 const float *cs, int64_t I, int64_t O, float *Y,
                                                                 int64_t ldy, const int NT) {
    __m256 acc[6][2];
    for (int t = 0; t < NT; t++)
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();
#define CV(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
    for (int64_t i = 0; i < I; i++) {
        const int8_t *r = M + i * O;
        __m256 w0 = CV(r), w1 = CV(r + 8);
        for (int t = 0; t < NT; t++) {
            __m256 x = _mm256_set1_ps(X[t * ldx + i]);
            acc[t][0] = _mm256_fmadd_ps(x, w0, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(x, w1, acc[t][1]);
        }
    }
#undef CV
    __m256 c0 = _mm256_loadu_ps(cs), c1 = _mm256_loadu_ps(cs + 8);
    for (int t = 0; t < NT; t++) {
        _mm256_storeu_ps(Y + t * ldy, _mm256_mul_ps(acc[t][0], c0));
        _mm256_storeu_ps(Y + t * ldy + 8, _mm256_mul_ps(acc[t][1], c1));
    }
}

/* the same tile on 512-bit registers (VNNI level): NT tokens x 32 outputs; every lane does the
 * operations of the 256-bit tile's lane in the same order: the same floats */
VNNI static inline __attribute__((always_inline)) void lora_tile512(const float *X, int64_t ldx, const int8_t *M,
                                                                    const float *cs, int64_t I, int64_t O, float *Y,
                                                                    int64_t ldy, const int NT) {
    __m512 acc[6][2];
    for (int t = 0; t < NT; t++)
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
#define CV(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
    for (int64_t i = 0; i < I; i++) {
        const int8_t *r = M + i * O;
        __m512 w0 = CV(r), w1 = CV(r + 16);
        for (int t = 0; t < NT; t++) {
            __m512 x = _mm512_set1_ps(X[t * ldx + i]);
            acc[t][0] = _mm512_fmadd_ps(x, w0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(x, w1, acc[t][1]);
        }
    }
#undef CV
    __m512 c0 = _mm512_loadu_ps(cs), c1 = _mm512_loadu_ps(cs + 16);
    for (int t = 0; t < NT; t++) {
        _mm512_storeu_ps(Y + t * ldy, _mm512_mul_ps(acc[t][0], c0));
        _mm512_storeu_ps(Y + t * ldy + 16, _mm512_mul_ps(acc[t][1], c1));
    }
}

/* O % 32 == 0 */
VNNI static void lora_rows_512(const float *X, int64_t ldx, int64_t T, const int8_t *M, const float *cs, int64_t I,
                               int64_t O, float *Y, int64_t ldy) {
    for (int64_t o0 = 0; o0 < O; o0 += 32)
        for (int64_t t0 = 0; t0 < T; t0 += 6) {
            const float *x = X + t0 * ldx;
            float *y = Y + t0 * ldy + o0;
            switch (T - t0 < 6 ? T - t0 : 6) {
            case 6: lora_tile512(x, ldx, M + o0, cs + o0, I, O, y, ldy, 6); break;
            case 5: lora_tile512(x, ldx, M + o0, cs + o0, I, O, y, ldy, 5); break;
            case 4: lora_tile512(x, ldx, M + o0, cs + o0, I, O, y, ldy, 4); break;
            case 3: lora_tile512(x, ldx, M + o0, cs + o0, I, O, y, ldy, 3); break;
            case 2: lora_tile512(x, ldx, M + o0, cs + o0, I, O, y, ldy, 2); break;
            default: lora_tile512(x, ldx, M + o0, cs + o0, I, O, y, ldy, 1); break;
            }
        }
}

/* O % 16 == 0; a 16-column stripe of M (16 I bytes) stays in L1 while every token block reads it */
AVX2 static void lora_rows_avx2(const float *X, int64_t ldx, int64_t T, const int8_t *M, const float *cs, int64_t I,
                                int64_t O, float *Y, int64_t ldy) {
    for (int64_t o0 = 0; o0 < O; o0 += 16)
        for (int64_t t0 = 0; t0 < T; t0 += 6) {
            const float *x = X + t0 * ldx;
            float *y = Y + t0 * ldy + o0;
            switch (T - t0 < 6 ? T - t0 : 6) {
            case 6: lora_tile(x, ldx, M + o0, cs + o0, I, O, y, ldy, 6); break;
            case 5: lora_tile(x, ldx, M + o0, cs + o0, I, O, y, ldy, 5); break;
            case 4: lora_tile(x, ldx, M + o0, cs + o0, I, O, y, ldy, 4); break;
            case 3: lora_tile(x, ldx, M + o0, cs + o0, I, O, y, ldy, 3); break;
            case 2: lora_tile(x, ldx, M + o0, cs + o0, I, O, y, ldy, 2); break;
            default: lora_tile(x, ldx, M + o0, cs + o0, I, O, y, ldy, 1); break;
            }
        }
}

#endif

#ifdef NK_X86
/* one group of 32: xs = max|x| / 127 and xq = rint(x * (127 / max)) in natural order, as nk_quantize
 * (the same max, the same 127 / max and x * inv; cvtps2dq rounds half to even as lrintf does in the
 * default rounding mode: bit-identical); *sum (if not NULL) = sum xq */
AVX2 static inline __m256i quantize32_avx2(const float *xg, float *xs, int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256 v[4], mx = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(xg + 8 * k);
        mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
    float inv = m > 0 ? 127.0f / m : 0.0f;
    *xs = m / 127.0f;
    __m256 iv = _mm256_set1_ps(inv);
    __m256i q[4];
    for (int k = 0; k < 4; k++)
        q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], iv));
    if (sum) {
        __m256i a = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i b = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        b = _mm_add_epi32(b, _mm_shuffle_epi32(b, 0x4e));
        *sum = _mm_cvtsi128_si32(_mm_add_epi32(b, _mm_shuffle_epi32(b, 0xb1)));
    }
    /* packs work per 128-bit lane: bytes come out as (0-3, 8-11, 16-19, 24-27, 4-7, ...) in i32 units */
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    return _mm256_permutevar8x32_epi32(p, order);
}

AVX2 static void quantize_rows_avx2(const float *x, int64_t T, int64_t I, int8_t *X, float *xs) {
    for (int64_t g = 0; g < T * (I / NK_GS); g++)
        _mm256_storeu_si256((__m256i *)(X + g * NK_GS), quantize32_avx2(x + g * NK_GS, xs + g, NULL));
}

/* nk_quantize4 of T rows (nk_q4.c's pair layout and -8 sum xq terms), bit-identical to it */
AVX2 static void quantize4_rows_avx2(const float *x, int64_t T, int64_t I, int8_t *X, float *xs, int32_t *init) {
    int64_t G = I / NK_GS, NI = NK_INIT(G);
    for (int64_t t = 0; t < T; t++) {
        int8_t *Xt = X + t * I;
        int32_t *it = init + t * NI, sq;
        memset(it, 0, NI * sizeof(int32_t));
        for (int64_t g = 0; g < G; g++) {
            __m256i q = quantize32_avx2(x + t * I + g * NK_GS, xs + t * G + g, &sq);
            if ((G & 1) && g == G - 1) {           /* the odd last group: natural order, term in lane 0 */
                _mm256_storeu_si256((__m256i *)(Xt + g * NK_GS), q);
                it[4 * g] = -8 * sq;
            } else {                               /* xq[0:16] at 64p + 16 (g & 1), xq[16:32] 32 further */
                int8_t *o = Xt + (g >> 1) * 64 + (g & 1) * 16;
                _mm_storeu_si128((__m128i *)o, _mm256_castsi256_si128(q));
                _mm_storeu_si128((__m128i *)(o + 32), _mm256_extracti128_si256(q, 1));
                it[(g >> 1) * 8 + (g & 1) * 4] = -8 * sq;
            }
        }
    }
}
#endif

/* X (T, I), xs (T, I / NK_GS), init (T, NK_INIT(I / NK_GS)) of x (T, I) as nk_quantize4 row by row */
void nk_quantize4_many(const nk_model *m, const float *x, int64_t T, int64_t I, int8_t *X, float *xs, int32_t *init) {
#ifdef NK_X86
    if (m->k != nk_kern_get(0)) {
        quantize4_rows_avx2(x, T, I, X, xs, init);
        return;
    }
#endif
    int64_t G = I / NK_GS;
    for (int64_t t = 0; t < T; t++)
        nk_quantize4(x + t * I, I, X + t * I, xs + t * G, init + t * NK_INIT(G));
}

/* X (T, I) int8 and xs (T, I / NK_GS) of x (T, I) as nk_quantize row by row */
void nk_quantize_many(const nk_model *m, const float *x, int64_t T, int64_t I, int8_t *X, float *xs) {
#ifdef NK_X86
    if (m->k != nk_kern_get(0)) {
        quantize_rows_avx2(x, T, I, X, xs);
        return;
    }
#endif
    for (int64_t t = 0; t < T; t++)
        nk_quantize(x + t * I, I, X + t * I, xs + t * (I / NK_GS));
}

static inline float sigmoidf_(float z) { return 1.0f / (1.0f + expf(-z)); }

static void mix_token_generic(const nk_layer *b, int64_t D, int64_t N, int first, float *k, float *v, const float *vf,
                              float *W, float *A, const float *GV, float *KN) {
    for (int64_t d = 0; d < D; d++) {
        if (!first)
            v[d] += (vf[d] - v[d]) * sigmoidf_(b->v0[d] + GV[d]);
        A[d] = sigmoidf_(b->a0[d] + A[d]);
        KN[d] = k[d] * b->k_k[d];
        W[d] = expf(-0.606531f * sigmoidf_(b->w0[d] + W[d]));
    }
    for (int64_t h = 0; h < D / N; h++) {
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
 * within a sum (fp-contract off): the same floats as mix_token_generic where libm is glibc's. D % 16. */
VNNIX static void mix_token_512(const nk_layer *b, int64_t D, int64_t N, int first, float *k, float *v,
                                const float *vf, float *W, float *A, const float *GV, float *KN) {
    for (int64_t d = 0; d < D; d += 16) {
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
    for (int64_t h = 0; h < D / N; h++) {
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

/* the SIMD paths need O % 16 (LoRA), D % 8 and N % 8 */
static void lora_rows(int simd, const float *X, int64_t ldx, int64_t T, const int8_t *M, const float *cs, int64_t I,
                      int64_t O, float *Y, int64_t ldy) {
#ifdef NK_X86
    if (simd == 2 && O % 32 == 0) {
        lora_rows_512(X, ldx, T, M, cs, I, O, Y, ldy);
        return;
    }
    if (simd && O % 16 == 0) {
        lora_rows_avx2(X, ldx, T, M, cs, I, O, Y, ldy);
        return;
    }
#endif
    lora_rows_generic(X, ldx, T, M, cs, I, O, Y, ldy);
}

/* x (T, n) (row stride ld) = tanh (kind 0) or sigmoid (kind 1) of itself */
static void act_rows(float *x, int64_t T, int64_t n, int64_t ld, int kind) {
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < n; j++)
            x[t * ld + j] = kind ? sigmoidf_(x[t * ld + j]) : tanhf(x[t * ld + j]);
    }
}

#ifdef NK_X86
/* wkv_avx2 (nk_kernels.c) on 512-bit registers, two state rows per register (lanes 0-7 row i,
 * 8-15 row i + 1, the vectors a, b, k, r, w broadcast to both halves): every lane does the 256-bit
 * kernel's operations in its order, each half ends in the same hsum8: the same floats. N % 16 == 0. */
VNNI static inline __m512 rows2(const float *p, int64_t N) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_loadu_ps(p))),
                                               _mm256_castps_pd(_mm256_loadu_ps(p + N)), 1));
}

VNNI static inline __m512 bcast8(const float *p) {
    return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

VNNI static inline __m256 hi8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }

/* two passes over the rows: first every row's s0 . a (32 short FMA chains that do not wait on each
 * other), then the update and s . r (a row pair's chain of the first pass had stalled its second) */
VNNI static void wkv_512(float *S, const float *S0, int64_t N, const float *r, const float *w, const float *k,
                         const float *v, const float *a, const float *b, float *y) {
    float sav_[256];                      /* N <= 256 (else the 256-bit kernel) */
    for (int64_t i = 0; i < N; i += 2) {
        const float *s0 = S0 + i * N;
        __m512 sa = _mm512_setzero_ps();
        for (int64_t j = 0; j < N; j += 8)
            sa = _mm512_fmadd_ps(rows2(s0 + j, N), bcast8(a + j), sa);
        sav_[i] = hsum8(_mm512_castps512_ps256(sa));
        sav_[i + 1] = hsum8(hi8(sa));
    }
    for (int64_t i = 0; i < N; i += 2) {
        float *s = S + i * N;
        const float *s0 = S0 + i * N;
        __m512 acc = _mm512_setzero_ps();
        __m512 sav = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(sav_[i]))),
            _mm256_castps_pd(_mm256_set1_ps(sav_[i + 1])), 1));
        __m512 vi = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(v[i]))),
                                                        _mm256_castps_pd(_mm256_set1_ps(v[i + 1])), 1));
        for (int64_t j = 0; j < N; j += 8) {
            __m512 x = _mm512_mul_ps(rows2(s0 + j, N), bcast8(w + j));
            x = _mm512_fmadd_ps(sav, bcast8(b + j), x);
            x = _mm512_fmadd_ps(vi, bcast8(k + j), x);
            _mm256_storeu_ps(s + j, _mm512_castps512_ps256(x));
            _mm256_storeu_ps(s + N + j, hi8(x));
            acc = _mm512_fmadd_ps(x, bcast8(r + j), acc);
        }
        y[i] = hsum8(_mm512_castps512_ps256(acc));
        y[i + 1] = hsum8(hi8(acc));
    }
}
#endif

static void head_out4(const nk_layer *b, int64_t N, int64_t h, int64_t D, const float *r, const float *k,
                      const float *v, const float *g, float *y);     /* below, with layer_norm4 */

typedef struct {
    nk_model *m;
    const nk_layer *b;
    float *S;
    const float *S0;           /* the state before the chunk's first token (S itself, or the caller's) */
    int first;
} att_ctx;

/* tokens [lo, hi) of the chunk: their LoRAs and elementwise part (tokens are independent here) */
static void att_tokens_task(void *c, int tid, int64_t lo, int64_t hi) {
    att_ctx *a = (att_ctx *)c;
    nk_model *m = a->m;
    const nk_layer *b = a->b;
    (void)tid;
    int64_t D = m->D, N = m->N, lt = m->lora_max, T = hi - lo;
    int simd = m->k == nk_kern_get(2) ? 2 : m->k != nk_kern_get(0);  /* 2: 512-bit LoRA tile, 1: 256-bit */
    float *W = m->pre[0] + lo * D, *A = m->pre[1] + lo * D, *Gt = m->pre[2] + lo * D, *GV = m->pre[3] + lo * D;
    float *t1 = m->pre[5] + lo * lt;
    NK_BUSY0();
    lora_rows(simd, m->mix[1] + lo * D, D, T, b->w1, b->w1s, D, m->dw, t1, lt);          /* decay */
    act_rows(t1, T, m->dw, lt, 0);
    lora_rows(simd, t1, lt, T, b->w2, b->w2s, m->dw, D, W, D);
    lora_rows(simd, m->mix[4] + lo * D, D, T, b->a1, b->a1s, D, m->da, t1, lt);          /* in-context rate */
    lora_rows(simd, t1, lt, T, b->a2, b->a2s, m->da, D, A, D);
    lora_rows(simd, m->mix[5] + lo * D, D, T, b->g1, b->g1s, D, m->dg, t1, lt);          /* output gate */
#ifdef NK_X86
    if (simd == 2 && m->dg % 16 == 0)
        sigmoid_rows_512(t1, T, m->dg, lt);
    else
#endif
        act_rows(t1, T, m->dg, lt, 1);
    lora_rows(simd, t1, lt, T, b->g2, b->g2s, m->dg, D, Gt, D);
    if (a->first) {
        memcpy(m->vf + lo * D, m->v + lo * D, T * D * sizeof(float));
    } else {                                                                              /* value residual */
        lora_rows(simd, m->mix[3] + lo * D, D, T, b->v1, b->v1s, D, m->dv, t1, lt);
        lora_rows(simd, t1, lt, T, b->v2, b->v2s, m->dv, D, GV, D);
    }
    NK_BUSY(17, tid);
    for (int64_t t = lo; t < hi; t++) {
        int64_t o = t * D;
#ifdef NK_X86
        if (simd == 2 && D % 16 == 0) {
            mix_token_512(b, D, N, a->first, m->kk + o, m->v + o, m->vf + o, m->pre[0] + o, m->pre[1] + o,
                          m->pre[3] + o, m->pre[4] + o);
            continue;
        }
#endif
        mix_token_generic(b, D, N, a->first, m->kk + o, m->v + o, m->vf + o, m->pre[0] + o, m->pre[1] + o,
                          m->pre[3] + o, m->pre[4] + o);
    }
    NK_BUSY(18, tid);
}

/* heads [lo, hi): the wkv over all T tokens (the head's state stays in L1 for the chunk), then the
 * group norm (eps 64e-5), bonus and gate of those heads */
static void att_heads_task(void *c, int tid, int64_t lo, int64_t hi) {
    att_ctx *a = (att_ctx *)c;
    nk_model *m = a->m;
    const nk_layer *b = a->b;
    (void)tid;
    int64_t D = m->D, N = m->N, T = m->pre_T;
    float *W = m->pre[0], *A = m->pre[1], *Gt = m->pre[2], *KN = m->pre[4];
    void (*wkv)(float *, const float *, int64_t, const float *, const float *, const float *, const float *,
                const float *, const float *, float *) = m->k->wkv;
#ifdef NK_X86
    if (m->k == nk_kern_get(2) && N % 16 == 0 && N <= 256)
        wkv = wkv_512;
#endif
    for (int64_t h = lo; h < hi; h++)
        for (int64_t t = 0; t < T; t++) {
            int64_t o = t * D + h * N;
            wkv(a->S + h * N * N, (t ? a->S : a->S0) + h * N * N, N, m->r + o, W + o, m->kk + o, m->v + o, KN + o,
                A + o, m->y + o);
        }
    for (int64_t h = lo; h < hi; h++) {
        int64_t t = 0;
        for (; t + 4 <= T; t += 4)
            head_out4(b, N, h, D, m->r + t * D, m->kk + t * D, m->v + t * D, Gt + t * D, m->y + t * D);
        for (; t < T; t++)
            nk_head_out(b, N, h, m->r + t * D, m->kk + t * D, m->v + t * D, Gt + t * D, m->y + t * D + h * N);
    }
}

/* the prefill counterpart of time_mix's per-token loop (nk_rwkv7.c): from m->r, m->kk, m->v (T, D) and
 * the token-shifted inputs m->mix[1, 3, 4, 5] to m->y (T, D) (before the output mat-vec); S (H, N, N)
 * written, its first token reading S0 (S itself or the caller's input state, as the steps' wkv).
 * Threads split the tokens (LoRAs, elementwise), then the heads (wkv, group norm). */
void nk_att_prefill(nk_model *m, const nk_layer *b, int64_t T, float *S, const float *S0, int first) {
    att_ctx c = {m, b, S, S0, first};
    m->pre_T = T;
    NK_TAG(8);
    nk_pool_run(m->pool, att_tokens_task, &c, T);
    NK_TAG(9);
    nk_pool_run_items(m->pool, att_heads_task, &c, m->H);    /* a head per item: H is 8 at D 512 (pool_run
                                                                * runs < 16 rows on one thread) */
}

/* ---- four tokens at a time: nk_layer_norm and nk_head_out with the four tokens' sums interleaved ---- *
 * Each token's sums run in its own order (column by column, as the one-token functions), so the
 * results are theirs bit for bit; four independent chains instead of one (a float add waits ~3
 * cycles on the one before: one token's 512-column layer norm was ~3000 cycles of waiting). Plain C
 * of the baseline target: no FMA to contract into, as in nk_rwkv7.c. */
static void layer_norm4(const float *x, int64_t ldx, const float *w, const float *b, float eps, int64_t D, float *out,
                        int64_t ldo) {
    float mu[4] = {0, 0, 0, 0}, var[4] = {0, 0, 0, 0}, inv[4];
    for (int64_t d = 0; d < D; d++)
        for (int q = 0; q < 4; q++)
            mu[q] += x[q * ldx + d];
    for (int q = 0; q < 4; q++)
        mu[q] /= (float)D;
    for (int64_t d = 0; d < D; d++)
        for (int q = 0; q < 4; q++)
            var[q] += (x[q * ldx + d] - mu[q]) * (x[q * ldx + d] - mu[q]);
    for (int q = 0; q < 4; q++)
        inv[q] = 1.0f / sqrtf(var[q] / (float)D + eps);
    for (int q = 0; q < 4; q++)
        for (int64_t d = 0; d < D; d++)
            out[q * ldo + d] = (x[q * ldx + d] - mu[q]) * inv[q] * w[d] + b[d];
}

/* x (T, D) rows -> out (T, D) by nk_layer_norm, four rows at a time */
static void layer_norm_rows(const float *x, int64_t T, const float *w, const float *b, float eps, int64_t D,
                            float *out) {
    int64_t t = 0;
    for (; t + 4 <= T; t += 4)
        layer_norm4(x + t * D, D, w, b, eps, D, out + t * D, D);
    for (; t < T; t++)
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
            nk_pred_prep(a->p, a->out[0] + t * D, &m->pxt[t]);
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
    if (!nk_kern_get(2) || n % 16)
        return -1;
    expf_many_512(x, n, y);
    return 0;
#else
    (void)x, (void)n, (void)y;
    return -1;
#endif
}

/* ---- for the tests (tests/test_native.py): the prefill's activation rounding at a level ---------- */
/* x (T, I) rounded as the prefill rounds it: bits 8 into X (T, I), xs (T, I / NK_GS) (nk_quantize's
 * layout); bits 4 into X in the int4 pair layout, xs, init (T, NK_INIT(I / NK_GS)) (nk_quantize4's) */
int nk_test_quantize_rows(int level, int64_t bits, const float *x, int64_t T, int64_t I, int8_t *X, float *xs,
                          int32_t *init) {
    static nk_model m;                 /* only m.k is read */
    const nk_kern *k = nk_kern_get(level);
    if (!k || I % NK_GS || I <= 0 || (bits != 8 && bits != 4))
        return -1;
    m.k = k;
    if (bits == 4)
        nk_quantize4_many(&m, x, T, I, X, xs, init);
    else
        nk_quantize_many(&m, x, T, I, X, xs);
    return 0;
}
