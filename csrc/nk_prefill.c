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
 * The LoRA sums keep the order of the steps' axpy4: the time-mix of a prefill equals the steps' bit
 * for bit (the 6-token tile only reuses each converted row, it does not reorder the sum).
 * Scratch: m->pre[0..5], (TB, max(D, LoRA dims)) floats each (nk_model_new).
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
        memset(y, 0, O * sizeof(float));
        int64_t i = 0;
        for (; i + 4 <= I; i += 4) {            /* the order of axpy4_generic (the steps' lora()) */
            const float *x = X + t * ldx + i;
            const int8_t *r = M + i * O;
            for (int64_t o = 0; o < O; o++)
                y[o] += (x[0] * r[o] + x[1] * r[O + o]) + (x[2] * r[2 * O + o] + x[3] * r[3 * O + o]);
        }
        for (; i < I; i++)
            for (int64_t o = 0; o < O; o++)
                y[o] += X[t * ldx + i] * (float)M[i * O + o];
        for (int64_t o = 0; o < O; o++)
            y[o] *= cs[o];
    }
}

#ifdef NK_X86
/* NT (<= 6) tokens x 16 outputs: 12 accumulators; four rows of M converted per step, then per token
 * acc += (x0 v0 + x1 v1) + (x2 v2 + x3 v3), the order of axpy4_avx2 in the steps' lora() (nk_rwkv7.c),
 * so the prefill's LoRAs equal the steps' bit for bit */
AVX2 static inline __attribute__((always_inline)) void lora_tile(const float *X, int64_t ldx, const int8_t *M,
                                                                 const float *cs, int64_t I, int64_t O, float *Y,
                                                                 int64_t ldy, const int NT) {
    __m256 acc[6][2];
    for (int t = 0; t < NT; t++)
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();
#define CV(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
    for (int64_t i = 0; i < I; i += 4) {
        const int8_t *r = M + i * O;
        __m256 w[4][2];
        for (int k = 0; k < 4; k++)
            w[k][0] = CV(r + k * O), w[k][1] = CV(r + k * O + 8);
        for (int t = 0; t < NT; t++) {
            const float *x = X + t * ldx + i;
            __m256 x0 = _mm256_broadcast_ss(x), x1 = _mm256_broadcast_ss(x + 1);
            __m256 x2 = _mm256_broadcast_ss(x + 2), x3 = _mm256_broadcast_ss(x + 3);
            for (int h = 0; h < 2; h++) {
                __m256 a = _mm256_fmadd_ps(x0, w[0][h], _mm256_mul_ps(x1, w[1][h]));
                __m256 b = _mm256_fmadd_ps(x2, w[2][h], _mm256_mul_ps(x3, w[3][h]));
                acc[t][h] = _mm256_add_ps(acc[t][h], _mm256_add_ps(a, b));
            }
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
    for (int64_t i = 0; i < I; i += 4) {
        const int8_t *r = M + i * O;
        __m512 w[4][2];
        for (int k = 0; k < 4; k++)
            w[k][0] = CV(r + k * O), w[k][1] = CV(r + k * O + 16);
        for (int t = 0; t < NT; t++) {
            const float *x = X + t * ldx + i;
            __m512 x0 = _mm512_set1_ps(x[0]), x1 = _mm512_set1_ps(x[1]);
            __m512 x2 = _mm512_set1_ps(x[2]), x3 = _mm512_set1_ps(x[3]);
            for (int h = 0; h < 2; h++) {
                __m512 a = _mm512_fmadd_ps(x0, w[0][h], _mm512_mul_ps(x1, w[1][h]));
                __m512 b = _mm512_fmadd_ps(x2, w[2][h], _mm512_mul_ps(x3, w[3][h]));
                acc[t][h] = _mm512_add_ps(acc[t][h], _mm512_add_ps(a, b));
            }
        }
    }
#undef CV
    __m512 c0 = _mm512_loadu_ps(cs), c1 = _mm512_loadu_ps(cs + 16);
    for (int t = 0; t < NT; t++) {
        _mm512_storeu_ps(Y + t * ldy, _mm512_mul_ps(acc[t][0], c0));
        _mm512_storeu_ps(Y + t * ldy + 16, _mm512_mul_ps(acc[t][1], c1));
    }
}

/* O % 32 == 0, I % 4 == 0 */
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

/* O % 16 == 0, I % 4 == 0; a 16-column stripe of M (16 I bytes) stays in L1 while every token block reads it */
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

#ifdef NK_X86
/* ---- int8 row dots of a prefill chunk on 512-bit VNNI ------------------------------------------- *
 * dots_vnni's T > 1 case (nk_kernels.c, same arguments and result): lanes 0-7 of a zmm carry token
 * t, lanes 8-15 token t + 1, the weight group broadcast to both halves, so each lane sees exactly the
 * integers and float operations (in the same order) of the 256-bit kernel's lane for that token, and
 * each half ends in the same hsum8: bit-identical results. Four rows x NP (<= 4) token pairs of
 * accumulators; each weight group is loaded and offset once for all NP pairs. */
VNNI static inline __attribute__((always_inline)) void dots512_tile(const int8_t *const *w, int64_t G, const int8_t *X,
                                                                    int64_t I, const float *xs, int64_t t0, int64_t T,
                                                                    int64_t p, int64_t n, float *y, int64_t ldy,
                                                                    const int NP) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512 f[4][4];
    const int8_t *xa[4], *xb[4];
    const float *sa[4], *sb[4];
    int64_t ta[4], tb[4];
    for (int q = 0; q < NP; q++) {
        ta[q] = t0 + 2 * q, tb[q] = ta[q] + 1 < T ? ta[q] + 1 : ta[q];
        xa[q] = X + ta[q] * I, xb[q] = X + tb[q] * I, sa[q] = xs + ta[q] * G, sb[q] = xs + tb[q] * G;
        for (int k = 0; k < 4; k++)
            f[k][q] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < G; g++) {
        __m512i wv[4];
        for (int k = 0; k < 4; k++)
            wv[k] = _mm512_xor_si512(_mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w[k] + g * NK_GS))), flip);
        for (int q = 0; q < NP; q++) {
            __m512i xv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xa[q] + g * NK_GS))),
                                            _mm256_loadu_si256((const __m256i *)(xb[q] + g * NK_GS)), 1);
            __m512i nc = _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(zero, flip, xv));     /* -128 xq per lane */
            __m512 xsv = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(sa[q][g])),
                                                             _mm256_castps_pd(_mm256_set1_ps(sb[q][g])), 1));
            for (int k = 0; k < 4; k++)
                f[k][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(nc, wv[k], xv)), xsv, f[k][q]);
        }
    }
    for (int q = 0; q < NP; q++)
        for (int k = 0; k < 4 && p + k < n; k++) {
            y[ta[q] * ldy + p + k] = hsum8(_mm512_castps512_ps256(f[k][q]));
            if (tb[q] != ta[q])
                y[tb[q] * ldy + p + k] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f[k][q]), 1)));
        }
}

VNNI void nk_dots_vnni512(const int8_t *base, int64_t stride, const int32_t *idx, int64_t n, int64_t I,
                          const int8_t *X, const float *xs, int64_t T, float *y, int64_t ldy) {
    int64_t G = I / NK_GS;
    for (int64_t p = 0; p < n; p += 4) {
        const int8_t *w[4];
        for (int k = 0; k < 4; k++) {
            int64_t q = p + k < n ? p + k : p;
            w[k] = base + stride * (idx ? idx[q] : q);
        }
        if (p + 12 < n)              /* fetch the rows two passes ahead (scattered or strided) */
            for (int k = 8; k < 12; k++)
                for (int64_t l = 0; l < I; l += 64)
                    _mm_prefetch((const char *)(base + stride * (idx ? idx[p + k] : p + k) + l), _MM_HINT_T0);
        for (int64_t t0 = 0; t0 < T; t0 += 8) {
            switch ((T - t0 + 1) / 2 < 4 ? (T - t0 + 1) / 2 : 4) {
            case 4: dots512_tile(w, G, X, I, xs, t0, T, p, n, y, ldy, 4); break;
            case 3: dots512_tile(w, G, X, I, xs, t0, T, p, n, y, ldy, 3); break;
            case 2: dots512_tile(w, G, X, I, xs, t0, T, p, n, y, ldy, 2); break;
            default: dots512_tile(w, G, X, I, xs, t0, T, p, n, y, ldy, 1); break;
            }
        }
    }
}
#endif

#ifdef NK_X86
/* ---- int4 row dots of a prefill chunk on 512-bit VNNI (nk_q4.c layout) -------------------------- *
 * nk_dots4_vnni's T > 1 case for G % 8 == 0, bit-identical to it as nk_dots_vnni512 is to dots_vnni:
 * lanes 0-7 token t, 8-15 token t + 1; the 32 code bytes of a group pair broadcast to both halves and
 * split into nibbles once for all NP (<= 3) token pairs; per lane the same d_g xs_g product, the same
 * pair permutation, the same dpbusd onto init and FMA, in the same order, then hsum8 per half. */
VNNI static inline __m512 pair512_ps(__m256 a, __m256 b) {
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(b), 1));
}

VNNI static inline __m512i pair512_si(const void *a, const void *b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)a)),
                              _mm256_loadu_si256((const __m256i *)b), 1);
}

VNNI static inline __attribute__((always_inline)) void dots4_512_tile(const uint8_t *const *w, const uint16_t *const *s,
                                                                      int64_t I, const int8_t *X, const float *xs,
                                                                      const int32_t *init, int64_t t0, int64_t T,
                                                                      int64_t p, int64_t n, float *y, int64_t ldy,
                                                                      const int NP) {
    int64_t G = I / NK_GS, NI = NK_INIT(G);
    const __m512i m15 = _mm512_set1_epi8(15);
    __m512 f[4][3];
    int64_t ta[3], tb[3];
    for (int q = 0; q < NP; q++) {
        ta[q] = t0 + 2 * q, tb[q] = ta[q] + 1 < T ? ta[q] + 1 : ta[q];
        for (int k = 0; k < 4; k++)
            f[k][q] = _mm512_setzero_ps();
    }
    for (int64_t q8 = 0; q8 < G; q8 += 8) {
        __m512 cv[4];                  /* the eight group scales of each row, in both halves */
        for (int k = 0; k < 4; k++) {
            __m256 c = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s[k] + q8)));
            cv[k] = pair512_ps(c, c);
        }
        __m512 xs2[3];
        for (int q = 0; q < NP; q++)
            xs2[q] = pair512_ps(_mm256_loadu_ps(xs + ta[q] * G + q8), _mm256_loadu_ps(xs + tb[q] * G + q8));
        for (int pp = 0; pp < 4; pp++) {
            int64_t pr = q8 / 2 + pp;
            const __m512i sel = _mm512_setr_epi32(2 * pp, 2 * pp, 2 * pp, 2 * pp, 2 * pp + 1, 2 * pp + 1, 2 * pp + 1,
                                                  2 * pp + 1, 8 + 2 * pp, 8 + 2 * pp, 8 + 2 * pp, 8 + 2 * pp,
                                                  9 + 2 * pp, 9 + 2 * pp, 9 + 2 * pp, 9 + 2 * pp);
            __m512i lo[4], hi[4];
            for (int k = 0; k < 4; k++) {
                __m512i wb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w[k] + 32 * pr)));
                lo[k] = _mm512_and_si512(wb, m15), hi[k] = _mm512_and_si512(_mm512_srli_epi16(wb, 4), m15);
            }
            for (int q = 0; q < NP; q++) {
                const int8_t *xa = X + ta[q] * I + 64 * pr, *xb = X + tb[q] * I + 64 * pr;
                __m512i xlo = pair512_si(xa, xb), xhi = pair512_si(xa + 32, xb + 32);
                __m512i iv = pair512_si(init + ta[q] * NI + 8 * pr, init + tb[q] * NI + 8 * pr);
                for (int k = 0; k < 4; k++) {
                    __m512 sc = _mm512_permutexvar_ps(sel, _mm512_mul_ps(cv[k], xs2[q]));
                    __m512i d = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iv, lo[k], xlo), hi[k], xhi);
                    f[k][q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, f[k][q]);
                }
            }
        }
    }
    for (int q = 0; q < NP; q++)
        for (int k = 0; k < 4 && p + k < n; k++) {
            y[ta[q] * ldy + p + k] = hsum8(_mm512_castps512_ps256(f[k][q]));
            if (tb[q] != ta[q])
                y[tb[q] * ldy + p + k] = hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f[k][q]), 1)));
        }
}

VNNI void nk_dots4_vnni512(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride,
                           const int32_t *idx, int64_t n, int64_t I, const int8_t *X, const float *xs,
                           const int32_t *init, int64_t T, float *y, int64_t ldy) {
    int64_t H = I / 2;
    for (int64_t p = 0; p < n; p += 4) {
        const uint8_t *w[4];
        const uint16_t *s[4];
        for (int k = 0; k < 4; k++) {
            int64_t r = idx ? idx[p + k < n ? p + k : p] : (p + k < n ? p + k : p);
            w[k] = base + stride * r, s[k] = sbase + sstride * r;
        }
        if (p + 12 < n)              /* fetch the rows two passes ahead (scattered or strided) */
            for (int k = 8; k < 12; k++) {
                int64_t r = idx ? idx[p + k] : p + k;
                for (int64_t l = 0; l < H; l += 64)
                    _mm_prefetch((const char *)(base + stride * r + l), _MM_HINT_T0);
                _mm_prefetch((const char *)(sbase + sstride * r), _MM_HINT_T0);
            }
        for (int64_t t0 = 0; t0 < T; t0 += 6) {
            switch ((T - t0 + 1) / 2 < 3 ? (T - t0 + 1) / 2 : 3) {
            case 3: dots4_512_tile(w, s, I, X, xs, init, t0, T, p, n, y, ldy, 3); break;
            case 2: dots4_512_tile(w, s, I, X, xs, init, t0, T, p, n, y, ldy, 2); break;
            default: dots4_512_tile(w, s, I, X, xs, init, t0, T, p, n, y, ldy, 1); break;
            }
        }
    }
}
#endif

#ifdef NK_X86
/* The active neurons of one token in a key block (nk_ffn.c, VNNI level): for p < nb (nb % 16 == 0)
 * with a = keys[p] * ks_p > 0, appends j0 + p to pj and (a * a) * vs_p to ph; (ks, vs) = sc[2p],
 * sc[2p + 1] (int8 kv_scale), or 1 with sc NULL (int4). The scalar loop's operations, so the same
 * floats; each 16 are compressed in registers and stored whole: pj, ph need 16 entries of slack.
 * Returns how many it appended. */
VNNI int64_t nk_active_512(const float *keys, const float *sc, int64_t j0, int64_t nb, int32_t *pj, float *ph) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t n = 0;
    for (int64_t p = 0; p < nb; p += 16) {
        __m512 ks = _mm512_set1_ps(1.0f), vs = ks;
        if (sc) {
            __m512 s0 = _mm512_loadu_ps(sc + 2 * p), s1 = _mm512_loadu_ps(sc + 2 * p + 16);
            ks = _mm512_permutex2var_ps(s0, even, s1), vs = _mm512_permutex2var_ps(s0, odd, s1);
        }
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(keys + p), ks);
        __mmask16 k = _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ);
        if (!k)
            continue;
        __m512i j = _mm512_add_epi32(iota, _mm512_set1_epi32((int32_t)(j0 + p)));
        _mm512_storeu_si512(pj + n, _mm512_maskz_compress_epi32(k, j));
        _mm512_storeu_ps(ph + n, _mm512_maskz_compress_ps(k, _mm512_mul_ps(_mm512_mul_ps(a, a), vs)));
        n += __builtin_popcount(k);
    }
    return n;
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

/* the SIMD paths need O % 16 (LoRA), D % 8 and N % 8 */
static void lora_rows(int simd, const float *X, int64_t ldx, int64_t T, const int8_t *M, const float *cs, int64_t I,
                      int64_t O, float *Y, int64_t ldy) {
#ifdef NK_X86
    if (simd == 2 && O % 32 == 0 && I % 4 == 0) {
        lora_rows_512(X, ldx, T, M, cs, I, O, Y, ldy);
        return;
    }
    if (simd && O % 16 == 0 && I % 4 == 0) {
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

VNNI static void wkv_512(float *S, int64_t N, const float *r, const float *w, const float *k, const float *v,
                         const float *a, const float *b, float *y) {
    for (int64_t i = 0; i < N; i += 2) {
        float *s = S + i * N;
        __m512 sa = _mm512_setzero_ps(), acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < N; j += 8)
            sa = _mm512_fmadd_ps(rows2(s + j, N), bcast8(a + j), sa);
        __m512 sav = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(hsum8(_mm512_castps512_ps256(sa))))),
            _mm256_castps_pd(_mm256_set1_ps(hsum8(hi8(sa)))), 1));
        __m512 vi = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(_mm256_set1_ps(v[i]))),
                                                        _mm256_castps_pd(_mm256_set1_ps(v[i + 1])), 1));
        for (int64_t j = 0; j < N; j += 8) {
            __m512 x = _mm512_mul_ps(rows2(s + j, N), bcast8(w + j));
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

#ifdef NK_X86
/* axpy4_avx2 and nk_axpy4q_avx2 (four value columns into out (D,)) on 512-bit registers for the
 * prefill's value pass: every output gets the 256-bit kernels' operations in their order (the same
 * h_k d_kg products, the same (h0 c0 + h1 c1) + (h2 c2 + h3 c3) and add): the same floats. D % 32 == 0. */
VNNI void nk_axpy4_512(float *out, int64_t D, const int8_t *const *v, const float *h) {
    __m512 h0 = _mm512_set1_ps(h[0]), h1 = _mm512_set1_ps(h[1]), h2 = _mm512_set1_ps(h[2]), h3 = _mm512_set1_ps(h[3]);
#define CV(k) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(v[k] + d))))
    for (int64_t d = 0; d < D; d += 16) {
        __m512 a = _mm512_fmadd_ps(h0, CV(0), _mm512_mul_ps(h1, CV(1)));
        __m512 b = _mm512_fmadd_ps(h2, CV(2), _mm512_mul_ps(h3, CV(3)));
        _mm512_storeu_ps(out + d, _mm512_add_ps(_mm512_loadu_ps(out + d), _mm512_add_ps(a, b)));
    }
#undef CV
}

VNNI void nk_axpy4q_512(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h) {
    const __m128i m15 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    for (int64_t g = 0; g < D / NK_GS; g++) {
        __m512 hd[4];
        __m128i c[4][2];
        for (int k = 0; k < 4; k++) {
            hd[k] = _mm512_set1_ps(h[k] * _cvtsh_ss(s[k][g]));
            __m128i b = _mm_loadu_si128((const __m128i *)(v[k] + 16 * g));
            c[k][0] = _mm_sub_epi8(_mm_and_si128(b, m15), eight);                 /* outputs 0-15 */
            c[k][1] = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m15), eight);   /* 16-31 */
        }
        for (int q = 0; q < 2; q++) {
#define CV(k) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c[k][q]))
            __m512 a = _mm512_fmadd_ps(hd[0], CV(0), _mm512_mul_ps(hd[1], CV(1)));
            __m512 b = _mm512_fmadd_ps(hd[2], CV(2), _mm512_mul_ps(hd[3], CV(3)));
#undef CV
            float *o = out + g * 32 + 16 * q;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(a, b)));
        }
    }
}
#endif

typedef struct {
    nk_model *m;
    const nk_layer *b;
    float *S;
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
    lora_rows(simd, m->mix[1] + lo * D, D, T, b->w1, b->w1s, D, m->dw, t1, lt);          /* decay */
    act_rows(t1, T, m->dw, lt, 0);
    lora_rows(simd, t1, lt, T, b->w2, b->w2s, m->dw, D, W, D);
    lora_rows(simd, m->mix[4] + lo * D, D, T, b->a1, b->a1s, D, m->da, t1, lt);          /* in-context rate */
    lora_rows(simd, t1, lt, T, b->a2, b->a2s, m->da, D, A, D);
    lora_rows(simd, m->mix[5] + lo * D, D, T, b->g1, b->g1s, D, m->dg, t1, lt);          /* output gate */
    act_rows(t1, T, m->dg, lt, 1);
    lora_rows(simd, t1, lt, T, b->g2, b->g2s, m->dg, D, Gt, D);
    if (a->first) {
        memcpy(m->vf + lo * D, m->v + lo * D, T * D * sizeof(float));
    } else {                                                                              /* value residual */
        lora_rows(simd, m->mix[3] + lo * D, D, T, b->v1, b->v1s, D, m->dv, t1, lt);
        lora_rows(simd, t1, lt, T, b->v2, b->v2s, m->dv, D, GV, D);
    }
    for (int64_t t = lo; t < hi; t++) {
        int64_t o = t * D;
        mix_token_generic(b, D, N, a->first, m->kk + o, m->v + o, m->vf + o, m->pre[0] + o, m->pre[1] + o,
                          m->pre[3] + o, m->pre[4] + o);
    }
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
    void (*wkv)(float *, int64_t, const float *, const float *, const float *, const float *, const float *,
                const float *, float *) = m->k->wkv;
#ifdef NK_X86
    if (m->k == nk_kern_get(2) && N % 16 == 0)
        wkv = wkv_512;
#endif
    for (int64_t h = lo; h < hi; h++)
        for (int64_t t = 0; t < T; t++) {
            int64_t o = t * D + h * N;
            wkv(a->S + h * N * N, N, m->r + o, W + o, m->kk + o, m->v + o, KN + o, A + o, m->y + o);
        }
    for (int64_t t = 0; t < T; t++) {
        const float *r = m->r + t * D, *k = m->kk + t * D, *v = m->v + t * D, *g = Gt + t * D;
        for (int64_t h = lo; h < hi; h++) {
            float *yh = m->y + t * D + h * N, mu = 0.0f, var = 0.0f, bonus = 0.0f;
            for (int64_t j = 0; j < N; j++)
                mu += yh[j];
            mu /= (float)N;
            for (int64_t j = 0; j < N; j++)
                var += (yh[j] - mu) * (yh[j] - mu);
            float inv = 1.0f / sqrtf(var / (float)N + 64e-5f);
            for (int64_t j = 0; j < N; j++)
                bonus += r[h * N + j] * k[h * N + j] * b->r_k[h * N + j];
            for (int64_t j = 0; j < N; j++) {
                int64_t d = h * N + j;
                yh[j] = ((yh[j] - mu) * inv * b->lnx_w[d] + b->lnx_b[d] + bonus * v[d]) * g[d];
            }
        }
    }
}

/* the prefill counterpart of time_mix's per-token loop (nk_rwkv7.c): from m->r, m->kk, m->v (T, D) and
 * the token-shifted inputs m->mix[1, 3, 4, 5] to m->y (T, D) (before the output mat-vec); S (H, N, N).
 * Threads split the tokens (LoRAs, elementwise), then the heads (wkv, group norm). */
void nk_att_prefill(nk_model *m, const nk_layer *b, int64_t T, float *S, int first) {
    att_ctx c = {m, b, S, first};
    m->pre_T = T;
    nk_pool_run(m->pool, att_tokens_task, &c, T);
    nk_pool_run(m->pool, att_heads_task, &c, m->H);
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
