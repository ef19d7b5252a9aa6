/* int4 kernels of the native backend: row dot products and value-column axpy on group-wise 4-bit
 * weights (quant/q4.py, the storage of `rwkv-edge convert --dtype int4`).
 *
 * Weights: a row of I values is I/2 bytes; in each group g of 32 values (16 bytes) byte i holds
 * value g*32 + i in its low nibble and g*32 + 16 + i in its high nibble, as the unsigned code
 * u = q + 8 in 0..15; one float16 scale d per group (the row's G = I/32 scales are contiguous).
 *
 * Dots (the same math as rwkv_edge/backends/numba_i4dot.py): the activation x (I,) is rounded to
 * int8 per group of 32 exactly as nk_quantize (xs_g = max|x_g| / 127, xq = rint(x / xs_g)); then
 *     w_hat . x ~= sum_g float(u_g . xq_g - 8 sum xq_g) * (d_g xs_g)
 * with the bracket exact in int32: the -8 sum xq_g term is an integer that starts the group's
 * accumulator (no float correction after a sum, which would cancel). Every level computes the same
 * integer per group; AVX2 and VNNI also the same int32 lanes, so their results are bit-identical.
 *
 * Activation layout (nk_quantize4, as numba_i4dot.quantize_x4): groups go in pairs (2p, 2p+1), so
 * one 32-byte load of codes (both groups' 16 bytes) meets two 32-byte activation vectors:
 *   X[64p : 64p+32]  = xq_2p[0:16],  xq_2p+1[0:16]    (what the low nibbles meet)
 *   X[64p+32 : 64p+64] = xq_2p[16:32], xq_2p+1[16:32] (what the high nibbles meet)
 * and init[8p : 8p+8] (int32) holds -8 sum xq_2p in lane 0, -8 sum xq_2p+1 in lane 4, zeros
 * elsewhere (lanes 0-3 of the i32 products belong to group 2p, lanes 4-7 to 2p+1). An odd last
 * group g keeps natural order with its term in init[4g] (lane 0). NK_INIT(G) ints per token.
 *
 * Values (FFN value columns, int4 files store them as rows of D along the output): out (D,) +=
 * sum_k h_k d_kg (u_k - 8), the code made signed in integers before it meets the float.
 */
#include <math.h>

#include "nk.h"

#include "nk_simd.h"

/* index in the pair layout of activation column g * 32 + i (i in [0, 32)) */
static inline int64_t xpos4(int64_t g, int i, int64_t G) {
    if ((G & 1) && g == G - 1)
        return g * 32 + i;
    return (g >> 1) * 64 + (i >= 16 ? 32 : 0) + (g & 1) * 16 + (i & 15);
}

/* index in init of group g's -8 sum xq_g */
static inline int64_t ipos4(int64_t g, int64_t G) {
    if ((G & 1) && g == G - 1)
        return 4 * g;
    return (g >> 1) * 8 + (g & 1) * 4;
}

void nk_quantize4(const float *x, int64_t I, int8_t *X, float *xs, int32_t *init) {
    int64_t G = I / NK_GS;
    for (int64_t i = 0; i < NK_INIT(G); i++)
        init[i] = 0;
    for (int64_t g = 0; g < G; g++) {
        const float *xg = x + g * NK_GS;
        float mx = 0.0f;
        for (int i = 0; i < NK_GS; i++) {  /* not fmaxf (a libm call at the baseline target): nk_quantize */
            float a = fabsf(xg[i]);
            mx = a > mx ? a : mx;
        }
        float inv = mx > 0 ? 127.0f / mx : 0.0f;       /* the rounding of nk_quantize, bit for bit */
        xs[g] = mx / 127.0f;
        int32_t sq = 0;
        for (int i = 0; i < NK_GS; i++) {
            int8_t q = (int8_t)lrintf(xg[i] * inv);
            X[xpos4(g, i, G)] = q;
            sq += q;
        }
        init[ipos4(g, G)] = -8 * sq;
    }
}

/* ---- generic C -------------------------------------------------------------------------------- */
void nk_dots4_generic(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride, const int32_t *idx,
                      int64_t n, int64_t I, const int8_t *X, const float *xs, const int32_t *init, int64_t T,
                      float *y, int64_t ldy) {
    int64_t G = I / NK_GS;
    for (int64_t p = 0; p < n; p++) {
        int64_t r = idx ? idx[p] : p;
        const uint8_t *w = base + stride * r;
        const uint16_t *s = sbase + sstride * r;
        for (int64_t t = 0; t < T; t++) {
            const int8_t *xq = X + t * I;
            float acc = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                int32_t d = init[t * NK_INIT(G) + ipos4(g, G)];
                for (int i = 0; i < 16; i++) {
                    int32_t b = w[g * 16 + i];
                    d += (b & 15) * (int32_t)xq[xpos4(g, i, G)] + (b >> 4) * (int32_t)xq[xpos4(g, 16 + i, G)];
                }
                acc += (float)d * (nk_h2f(s[g]) * xs[t * G + g]);
            }
            y[t * ldy + p] = acc;
        }
    }
}

void nk_axpy4q_generic(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h) {
    for (int64_t g = 0; g < D / NK_GS; g++) {
        float hd[4];
        for (int k = 0; k < 4; k++)
            hd[k] = h[k] * nk_h2f(s[k][g]);
        for (int i = 0; i < 32; i++) {
            int c[4];
            for (int k = 0; k < 4; k++)
                c[k] = ((v[k][g * 16 + (i & 15)] >> (i >= 16 ? 4 : 0)) & 15) - 8;
            out[g * 32 + i] += (hd[0] * c[0] + hd[1] * c[1]) + (hd[2] * c[2] + hd[3] * c[3]);
        }
    }
}

#ifdef NK_X86
/* Four rows x T tokens per pass (the four rows, 2 I bytes, stay in L1 while every token reads them).
 * Eight groups per inner step: d_kg xs_g of the eight as one vector per row (cvtph, one multiply),
 * then per pair a permute to (d xs of 2p in lanes 0-3, of 2p+1 in 4-7). PAIR(ptr, xlo, xhi, iv) gives
 * the pair's i32 lanes (init included) for the 32 code bytes at ptr; ODD(v, xv, iv) the odd last
 * group's for its 32 codes v in natural order. */
#define DOTS4_BODY(PAIR, ODD)                                                                          \
    int64_t G = I / NK_GS, NI = NK_INIT(G), H = I / 2, G8 = G / 8 * 8, P = G / 2;                      \
    /* prefetch distance in rows: two passes in prefill (T tokens per pass: time to spare); ~8 KiB     \
     * in decode, where a pass is short and the rows come from DRAM (kernel_dots4, 131072 x 512 vnni:  \
     * 21-22 GB/s at 8 rows ahead, 29-31 at 28; 4.7 MB in L3 35-38 either way). The four rows per      \
     * pass stay: one row at a time (as int8's DOT1_BODY) read 26-28 GB/s from DRAM but 29 in L3. */   \
    int64_t pa = T > 1 || 8192 / (H + 2 * G) < 8 ? 8 : 8192 / (H + 2 * G) / 4 * 4;                     \
    for (int64_t p = 0; p < n; p += 4) {                                                               \
        const uint8_t *w[4];                                                                           \
        const uint16_t *s[4];                                                                          \
        nk_rows4(base, sbase, stride, sstride, idx, p, n, w, s);                                       \
        for (int64_t k = pa; k < pa + 4 && p + k < n; k++) {   /* scattered or strided rows */         \
            nk_prefetch_row4(base, sbase, stride, sstride, idx ? idx[p + k] : p + k, H);               \
        }                                                                                              \
        for (int64_t t = 0; t < T; t++) {                                                              \
            const int8_t *xq = X + t * I;                                                              \
            const float *xst = xs + t * G;                                                             \
            const int32_t *it = init + t * NI;                                                         \
            __m256 f[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}; \
            for (int64_t q = 0; q < G8; q += 8) {                                                      \
                __m256 xs8 = _mm256_loadu_ps(xst + q), d8[4];                                          \
                for (int k = 0; k < 4; k++)                                                            \
                    d8[k] = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s[k] + q))), xs8); \
                for (int pp = 0; pp < 4; pp++) {                                                       \
                    int64_t pr = q / 2 + pp;                                                           \
                    __m256i xlo = _mm256_loadu_si256((const __m256i *)(xq + 64 * pr));                 \
                    __m256i xhi = _mm256_loadu_si256((const __m256i *)(xq + 64 * pr + 32));            \
                    __m256i iv = _mm256_loadu_si256((const __m256i *)(it + 8 * pr));                   \
                    __m256i sel = _mm256_setr_epi32(2 * pp, 2 * pp, 2 * pp, 2 * pp,                   \
                                                    2 * pp + 1, 2 * pp + 1, 2 * pp + 1, 2 * pp + 1);  \
                    for (int k = 0; k < 4; k++)                                                        \
                        f[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PAIR(w[k] + 32 * pr, xlo, xhi, iv)), \
                                               _mm256_permutevar8x32_ps(d8[k], sel), f[k]);            \
                }                                                                                      \
            }                                                                                          \
            for (int64_t pr = G8 / 2; pr < P; pr++) {      /* pairs left over from the eights */     \
                __m256i xlo = _mm256_loadu_si256((const __m256i *)(xq + 64 * pr));                     \
                __m256i xhi = _mm256_loadu_si256((const __m256i *)(xq + 64 * pr + 32));                \
                __m256i iv = _mm256_loadu_si256((const __m256i *)(it + 8 * pr));                       \
                for (int k = 0; k < 4; k++) {                                                          \
                    float a = _cvtsh_ss(s[k][2 * pr]) * xst[2 * pr], b = _cvtsh_ss(s[k][2 * pr + 1]) * xst[2 * pr + 1]; \
                    __m256 sc = _mm256_setr_ps(a, a, a, a, b, b, b, b);                                \
                    f[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(PAIR(w[k] + 32 * pr, xlo, xhi, iv)), sc, f[k]); \
                }                                                                                      \
            }                                                                                          \
            if (G & 1) {                                   /* the odd last group, natural order */   \
                int64_t g = G - 1;                                                                     \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + 32 * g));                       \
                __m256i iv = _mm256_loadu_si256((const __m256i *)(it + 4 * g));                        \
                for (int k = 0; k < 4; k++) {                                                          \
                    __m128i b = _mm_loadu_si128((const __m128i *)(w[k] + 16 * g)), c15 = _mm_set1_epi8(15); \
                    __m256i v = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), c15), _mm_and_si128(b, c15)); \
                    __m256 sc = _mm256_set1_ps(_cvtsh_ss(s[k][g]) * xst[g]);                           \
                    f[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ODD(v, xv, iv)), sc, f[k]);              \
                }                                                                                      \
            }                                                                                          \
            for (int k = 0; k < 4 && p + k < n; k++)                                                   \
                y[t * ldy + p + k] = hsum8(f[k]);                                                      \
        }                                                                                              \
    }

/* AVX2: vpmaddubsw of the u8 codes with the s8 activation (a pair <= 2 * 15 * 127, the low + high sum
 * <= 7620: no saturation), vpmaddwd with ones to i32, plus init */
AVX2 static inline __m256i pair_avx2(const uint8_t *ptr, __m256i xlo, __m256i xhi, __m256i iv) {
    const __m256i m15 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256i wb = _mm256_loadu_si256((const __m256i *)ptr);
    __m256i lo = _mm256_and_si256(wb, m15), hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), m15);
    __m256i h = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
    return _mm256_add_epi32(_mm256_madd_epi16(h, ones), iv);
}

AVX2 static inline __m256i odd_avx2(__m256i v, __m256i xv, __m256i iv) {
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(v, xv), _mm256_set1_epi16(1)), iv);
}

AVX2 void nk_dots4_avx2(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride, const int32_t *idx,
                        int64_t n, int64_t I, const int8_t *X, const float *xs, const int32_t *init, int64_t T,
                        float *y, int64_t ldy) {
    DOTS4_BODY(pair_avx2, odd_avx2)
}

/* VNNI: vpdpbusd (u8 codes x s8 activation, 4 bytes per i32 lane) accumulating onto init: the same
 * lanes as AVX2 (the codes are already unsigned: no offset to take off) */
VNNI static inline __m256i pair_vnni(const uint8_t *ptr, __m256i xlo, __m256i xhi, __m256i iv) {
    const __m256i m15 = _mm256_set1_epi8(15);
    __m256i wb = _mm256_loadu_si256((const __m256i *)ptr);
    __m256i lo = _mm256_and_si256(wb, m15), hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), m15);
    return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(iv, lo, xlo), hi, xhi);
}

VNNI static inline __m256i odd_vnni(__m256i v, __m256i xv, __m256i iv) { return _mm256_dpbusd_epi32(iv, v, xv); }

/* DOTS4_BODY(pair_vnni, odd_vnni) for one token and G % 8 == 0 on 512-bit registers, two rows a
 * register (row 2j in lanes 0-7, 2j + 1 in 8-15): every row's lanes see the 256-bit kernel's integers,
 * scales and FMA chain in its order, and the same hsum8, so the floats are identical, in about half the
 * vector instructions (the decode's r/k/v/o, FFN keys and int4 head were bound by them, not by bytes:
 * ~27 cycles a 512-column row). The pair's activation vectors, broadcast to both halves, are built
 * once per call. */
VNNI static void dots4_t1_512(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride,
                              const int32_t *idx, int64_t n, int64_t I, const int8_t *X, const float *xs,
                              const int32_t *init, float *y) {
    int64_t G = I / NK_GS, H = I / 2, P = G / 2;
    /* 16 KiB of rows ahead (DOTS4_BODY: 8; here 8 KiB 0.97x, 32 KiB 0.97x of 16, native_ab at 58M) */
    int64_t pa = 16384 / (H + 2 * G) < 8 ? 8 : 16384 / (H + 2 * G) / 4 * 4;
    __m512i xl[64], xh[64], iv[64];                                            /* P <= 64 */
    __m512 xs2[16];
    for (int64_t pr = 0; pr < P; pr++) {
        xl[pr] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(X + 64 * pr)));
        xh[pr] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(X + 64 * pr + 32)));
        iv[pr] = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(init + 8 * pr)));
    }
    for (int64_t q = 0; q < G; q += 8)
        xs2[q / 8] = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(xs + q))));
    const __m512i m15 = _mm512_set1_epi8(15);
    for (int64_t k = 0; k < pa && k < n; k++) {      /* the first pa rows at once (the loop fetches from pa on): */
        nk_prefetch_row4(base, sbase, stride, sstride, idx ? idx[k] : k, H);   /* a sparse set's scattered rows,
                                                                                 * not one miss after another */
    }
    for (int64_t p = 0; p < n; p += 4) {
        const uint8_t *w[4];
        const uint16_t *s[4];
        nk_rows4(base, sbase, stride, sstride, idx, p, n, w, s);
        for (int64_t k = pa; k < pa + 4 && p + k < n; k++) {
            nk_prefetch_row4(base, sbase, stride, sstride, idx ? idx[p + k] : p + k, H);
        }
        __m512 f[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t q = 0; q < G; q += 8) {
            __m512 d[2];
            for (int j = 0; j < 2; j++)
                d[j] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_inserti128_si256(
                                         _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(s[2 * j] + q))),
                                         _mm_loadu_si128((const __m128i *)(s[2 * j + 1] + q)), 1)), xs2[q / 8]);
            for (int pp = 0; pp < 4; pp++) {
                int64_t pr = q / 2 + pp;
                const __m512i sel = _mm512_setr_epi32(2 * pp, 2 * pp, 2 * pp, 2 * pp, 2 * pp + 1, 2 * pp + 1, 2 * pp + 1,
                                                      2 * pp + 1, 8 + 2 * pp, 8 + 2 * pp, 8 + 2 * pp, 8 + 2 * pp,
                                                      9 + 2 * pp, 9 + 2 * pp, 9 + 2 * pp, 9 + 2 * pp);
                for (int j = 0; j < 2; j++) {
                    __m512i c = _mm512_inserti64x4(
                        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(w[2 * j] + 32 * pr))),
                        _mm256_loadu_si256((const __m256i *)(w[2 * j + 1] + 32 * pr)), 1);
                    __m512i lo = _mm512_and_si512(c, m15), hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), m15);
                    __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iv[pr], lo, xl[pr]), hi, xh[pr]);
                    f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(sel, d[j]), f[j]);
                }
            }
        }
        float r[4] = {hsum8(_mm512_castps512_ps256(f[0])),
                      hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f[0]), 1))),
                      hsum8(_mm512_castps512_ps256(f[1])),
                      hsum8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(f[1]), 1)))};
        for (int k = 0; k < 4 && p + k < n; k++)
            y[p + k] = r[k];
    }
}

VNNI void nk_dots4_vnni(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride, const int32_t *idx,
                        int64_t n, int64_t I, const int8_t *X, const float *xs, const int32_t *init, int64_t T,
                        float *y, int64_t ldy) {
    if (T > 1 && (I / NK_GS) % 8 == 0) {  /* prefill: two tokens per 512-bit register (nk_prefill_kernels.c) */
        nk_dots4_vnni512(base, sbase, stride, sstride, idx, n, I, X, xs, init, T, y, ldy);
        return;
    }
    if (T == 1 && (I / NK_GS) % 8 == 0 && I / NK_GS <= 128) {   /* decode: two rows a 512-bit register */
        dots4_t1_512(base, sbase, stride, sstride, idx, n, I, X, xs, init, y);
        return;
    }
    DOTS4_BODY(pair_vnni, odd_vnni)
}

/* out += h_0 V_0 + ... + h_3 V_3 over one group (32 outputs) at a time: the 16 code bytes of each
 * column give 16 values in the low nibbles (outputs 0-15) and 16 in the high (16-31), made signed
 * (u - 8) in bytes, widened to i32 and to float, then FMA with h_k d_kg (the order of axpy4_avx2) */
AVX2 void nk_axpy4q_avx2(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h) {
    const __m128i m15 = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
    for (int64_t g = 0; g < D / NK_GS; g++) {
        __m256 hd[4];
        __m128i c[4][2];
        for (int k = 0; k < 4; k++) {
            hd[k] = _mm256_set1_ps(h[k] * _cvtsh_ss(s[k][g]));
            __m128i b = _mm_loadu_si128((const __m128i *)(v[k] + 16 * g));
            c[k][0] = _mm_sub_epi8(_mm_and_si128(b, m15), eight);
            c[k][1] = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m15), eight);
        }
        for (int q = 0; q < 4; q++) {              /* outputs 8q .. 8q + 7 of the group */
#define CV(k) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q & 1 ? _mm_srli_si128(c[k][q >> 1], 8) : c[k][q >> 1]))
            __m256 a = _mm256_fmadd_ps(hd[0], CV(0), _mm256_mul_ps(hd[1], CV(1)));
            __m256 b = _mm256_fmadd_ps(hd[2], CV(2), _mm256_mul_ps(hd[3], CV(3)));
#undef CV
            float *o = out + g * 32 + 8 * q;
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(a, b)));
        }
    }
}
#endif

/* ---- single kernels, for the tests (tests/test_native_int4.py checks them against numpy) --------- */
#include <stdlib.h>

/* y (T, n) = int4 rows (W (n, I / 2), S (n, I / 32) float16) . x (T, I) rounded per NK_GS; T <= 64 */
int nk_test_dots4(int level, const uint8_t *W, const uint16_t *S, int64_t n, int64_t I, const float *x, int64_t T,
                  float *y) {
    const nk_kern *k = nk_kern_get(level);
    if (!k || T > 64 || I % NK_GS || I <= 0)
        return -1;
    int64_t G = I / NK_GS;
    int8_t *X = malloc(T * I);
    float *xs = malloc(T * G * sizeof(float));
    int32_t *init = malloc(T * NK_INIT(G) * sizeof(int32_t));
    for (int64_t t = 0; t < T; t++)
        nk_quantize4(x + t * I, I, X + t * I, xs + t * G, init + t * NK_INIT(G));
    k->dots4(W, S, I / 2, G, NULL, n, I, X, xs, init, T, y, n);
    free(X), free(xs), free(init);
    return 0;
}

/* out (D,) += sum_j h[j] V_hat[j] for int4 columns V (n, D / 2), S (n, D / 32), four per kernel call
 * (level 3: the decode's and prefill's 512-bit twin, nk_axpy4q_512, where the CPU has the VNNI level) */
int nk_test_axpy4q(int level, const uint8_t *V, const uint16_t *S, const float *h, int64_t n, int64_t D, float *out) {
    void (*axq)(float *, int64_t, const uint8_t *const *, const uint16_t *const *, const float *) = NULL;
#ifdef NK_X86
    if (level == 3 && nk_cpu_level() >= 2)
        axq = nk_axpy4q_512;
#endif
    const nk_kern *k = level == 3 ? NULL : nk_kern_get(level);
    if ((!k && !axq) || D % NK_GS || D <= 0)
        return -1;
    if (!axq)
        axq = k->axpy4q;
    for (int64_t q = 0; q < n; q += 4) {
        const uint8_t *v[4];
        const uint16_t *s[4];
        float hh[4];
        for (int j = 0; j < 4; j++) {
            int64_t p = q + j < n ? q + j : q;
            v[j] = V + p * (D / 2), s[j] = S + p * (D / NK_GS), hh[j] = q + j < n ? h[p] : 0.0f;
        }
        axq(out, D, v, s, hh);
    }
    return 0;
}
