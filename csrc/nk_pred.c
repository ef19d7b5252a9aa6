/* The n-bit W_k predictor of the native backend: input prep, scores, and the fused select.
 *
 * Math (nk.h, nk_pred_x): x rounded to int8 per predictor group g (xs_g = max|x_g| / 127), then
 *     score[r] = sum_g scale[r, g] (xs_g (codes_g . xq_g) + e_g) + zero[r, g] sum x_g
 * with exact int32 dots. Kernels:
 * - nk_pred_generic: plain C, any bits and group size.
 * - nk_pred_avx2: 2 or 4 bits, 64-column groups (maddubs), one row per pass; the VNNI level uses it
 *   for the scores the prefill asks for.
 * - sel2 (AVX-512 VNNI, nk_pred_sel2.h): 1 or 2 bits, 64-column groups, G % 8 == 0: 16 rows per pass, 512-bit
 *   vpdpbusd on the four code planes, the group sums of two rows folded into one vector in integers,
 *   then the float terms, the 16 row sums, the compare with the threshold and the compaction of the
 *   passing rows, all in registers. Its float operations are those of nk_pred_avx2 in the same order
 *   (per-lane FMA chain over blocks of eight groups, then the same pairwise tree over the eight
 *   lanes), so its scores, and the sets, are bit-identical to nk_pred_avx2's (tests/test_native.py).
 * - sel2_blk (2 bits, nk_pred_sel2.h): the same select over all rows from the predictor's blocked copy (p->blk,
 *   nk_pred_blk_new: 16 rows interleaved per block, codes, scales and zeros in one linear stream), the
 *   decode's pass. Same scores. 1.5B shapes, one thread: 7.1 -> 4.1 ms a token (17.7 -> 31 GB/s; a plain
 *   read of the bytes ~35): the row layout's interleaved streams defeated the hardware prefetcher.
 * nk_pred_select picks the fused kernel where it applies, else scores + a scalar compaction.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nk.h"

#include "nk_simd.h"
#undef VNNI
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")))

/* x (C,) -> px: xq, xs, xsum, e per group, and the code planes of xq (bits >= 2). The sums of each
 * group run in column order (double), as before; the groups are interleaved for independent chains. */
void nk_pred_prep(const nk_pred *p, const float *x, nk_pred_x *px) {
    int64_t C = p->C, G = p->G, gs = C / G;
    int per = 8 / p->bits;
    double mid = ((1 << p->bits) - 1) / 2.0;
    double sums[64];
    int64_t G0 = G <= 64 ? G : 0;             /* groups summed interleaved (the rest one by one) */
    for (int64_t g = 0; g < G0; g++)
        sums[g] = 0.0;
    for (int64_t i = 0; i < gs && G0; i++)
        for (int64_t g = 0; g < G0; g++)
            sums[g] += x[g * gs + i];
    for (int64_t g = 0; g < G; g++) {
        const float *xg = x + g * gs;
        float mx = 0.0f;
        for (int64_t i = 0; i < gs; i++) {
            float a = fabsf(xg[i]);
            mx = a > mx ? a : mx;          /* fmaxf without the libm call (x is never NaN here; a NaN is skipped by both) */
        }
        double sum = 0.0;
        if (g < G0)
            sum = sums[g];
        else
            for (int64_t i = 0; i < gs; i++)
                sum += xg[i];
        float inv = mx > 0 ? 127.0f / mx : 0.0f;
        long sq = 0;
        for (int64_t i = 0; i < gs; i++) {
            int8_t q = (int8_t)lrintf(xg[i] * inv);
            px->xq[g * gs + i] = q;
            sq += q;
        }
        px->xs[g] = mx / 127.0f;
        px->xsum[g] = (float)sum;
        px->e[g] = (float)(mid * (sum - (double)px->xs[g] * (double)sq));
    }
    if (per <= 4)
        for (int k = 0; k < per; k++)
            for (int64_t b = 0; b < C / per; b++)
                px->plane[k][b] = px->xq[per * b + k];
    else if (per == 8)      /* 1 bit: plane k (C / 8 bytes) at plane[k & 3] + (k >> 2) C / 8 (each holds C) */
        for (int k = 0; k < 8; k++)
            for (int64_t b = 0; b < C / 8; b++)
                px->plane[k & 3][(k >> 2) * (C / 8) + b] = px->xq[8 * b + k];
}

#ifdef NK_X86
/* nk_pred_prep on 512-bit registers for 2 or 4 bits (gs % 16 == 0, G <= 64), the same bytes and floats
 * (tests/test_native.py): each group's double sum in column order as the generic loop (eight groups a
 * register, lane l gathering group g0 + l's column i), the max, rint (cvtps2dq: half to even, as lrintf)
 * and the planes by truncating 32- or 16-bit lanes. The decode preps once per layer: the scalar loops
 * were ~1 us of it (12 us a 58M step, serial, sparse only). Returns 0 where it does not apply. */
VNNI static int pred_prep_512(const nk_pred *p, const float *x, nk_pred_x *px) {
    int64_t C = p->C, G = p->G, gs = C / G;
    int per = 8 / p->bits;
    if ((per != 4 && per != 2) || gs % 16 || G > 64 || C % 64)
        return 0;
    double mid = ((1 << p->bits) - 1) / 2.0, sums[64];
    const __m256i off = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)gs));
    for (int64_t g0 = 0; g0 < G; g0 += 8) {
        int nl = G - g0 < 8 ? (int)(G - g0) : 8;
        __mmask8 mk = (__mmask8)((1u << nl) - 1);
        __m512d acc = _mm512_setzero_pd();
        for (int64_t i = 0; i < gs; i++)
            acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_mmask_i32gather_ps(_mm256_setzero_ps(), mk, off,
                                                                                x + g0 * gs + i, 4)));
        double s8[8];
        _mm512_storeu_pd(s8, acc);
        for (int l = 0; l < nl; l++)
            sums[g0 + l] = s8[l];
    }
    for (int64_t g = 0; g < G; g++) {
        const float *xg = x + g * gs;
        __m512 mv = _mm512_setzero_ps();
        for (int64_t i = 0; i < gs; i += 16)
            mv = _mm512_max_ps(mv, _mm512_abs_ps(_mm512_loadu_ps(xg + i)));
        float mx = _mm512_reduce_max_ps(mv);
        float inv = mx > 0 ? 127.0f / mx : 0.0f;
        __m512 iv = _mm512_set1_ps(inv);
        __m512i sv = _mm512_setzero_si512();
        for (int64_t i = 0; i < gs; i += 16) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), iv));
            sv = _mm512_add_epi32(sv, q);
            _mm_storeu_si128((__m128i *)(px->xq + g * gs + i), _mm512_cvtepi32_epi8(q));
        }
        long sq = _mm512_reduce_add_epi32(sv);
        px->xs[g] = mx / 127.0f;
        px->xsum[g] = (float)sums[g];
        px->e[g] = (float)(mid * (sums[g] - (double)px->xs[g] * (double)sq));
    }
    for (int64_t b = 0; b < C; b += 64) {          /* plane k: xq[per * b + k] at b */
        __m512i v = _mm512_loadu_si512((const void *)(px->xq + b));
        for (int k = 0; k < per; k++) {
            if (per == 4)
                _mm_storeu_si128((__m128i *)(px->plane[k] + b / 4), _mm512_cvtepi32_epi8(_mm512_srli_epi32(v, 8 * k)));
            else
                _mm256_storeu_si256((__m256i *)(px->plane[k] + b / 2), _mm512_cvtepi16_epi8(_mm512_srli_epi16(v, 8 * k)));
        }
    }
    return 1;
}
#endif

void nk_pred_prep_k(const nk_kern *k, const nk_pred *p, const float *x, nk_pred_x *px) {
#ifdef NK_X86
    if (k->level == 2 && pred_prep_512(p, x, px))
        return;
#else
    (void)k;
#endif
    nk_pred_prep(p, x, px);
}

/* ---- generic C -------------------------------------------------------------------------------- */
/* score of one row over groups [g0, G): the plain form of the predictor math (any bits) */
static float pred_row_tail(const nk_pred *p, const nk_pred_x *px, int64_t r, int64_t g0) {
    int64_t gs = p->C / p->G, rb = p->C * p->bits / 8;
    int per = 8 / p->bits, mask = (1 << p->bits) - 1;
    const uint8_t *row = p->packed + r * rb;
    float acc = 0.0f;
    for (int64_t g = g0; g < p->G; g++) {
        int32_t dot = 0;
        for (int64_t c = g * gs; c < (g + 1) * gs; c++)
            dot += ((row[c / per] >> ((c % per) * p->bits)) & mask) * (int32_t)px->xq[c];
        acc += nk_h2f(p->scale[r * p->G + g]) * ((float)dot * px->xs[g] + px->e[g])
               + nk_h2f(p->zero[r * p->G + g]) * px->xsum[g];
    }
    return acc;
}

void nk_pred_generic(const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1,
                         float *score) {
    for (int64_t q = r0; q < r1; q++)
        score[q - r0] = pred_row_tail(p, px, idx ? idx[q] : q, 0);
}

#ifdef NK_X86
/* ---- AVX2 ------------------------------------------------------------------------------------ */
/* Integer dot of one 64-column predictor group g of a row (2 or 4 bits) with xq: the groups after
 * the last full eight (D = 768: 12 groups, 4 left; D = 192: 3) one at a time, same integers as below. */
AVX2 static int32_t pred_group_dot(const nk_pred *p, const nk_pred_x *px, const uint8_t *row, int64_t g) {
    if (p->bits == 4) {                           /* 32 bytes: columns 2b (low nibble), 2b + 1 (high) */
        const __m256i m15 = _mm256_set1_epi8(15);
        int64_t b = g * 32;
        __m256i raw = _mm256_loadu_si256((const __m256i *)(row + b));
        __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(raw, m15), _mm256_loadu_si256((const __m256i *)(px->plane[0] + b)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m15),
                                                     _mm256_loadu_si256((const __m256i *)(px->plane[1] + b))));
        __m256i v = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1)));
    }
    const __m128i m3 = _mm_set1_epi8(3);          /* 2 bits: 16 bytes, plane k = columns 4b + k */
    int64_t b = g * 16;
    __m128i raw = _mm_loadu_si128((const __m128i *)(row + b)), s = _mm_setzero_si128();
    for (int k = 0; k < 4; k++)
        s = _mm_add_epi16(s, _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(raw, 2 * k), m3),
                                               _mm_loadu_si128((const __m128i *)(px->plane[k] + b))));
    __m128i h = _mm_madd_epi16(s, _mm_set1_epi16(1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    return _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1)));
}

/* Predictor rows, 2 or 4 bits with 64 columns per group, eight groups per pass:
 * 2-bit: a 32-byte load holds 128 columns = two groups; plane k = (raw >> 2k) & 3 holds columns
 * 4b + k, multiplied by plane k of xq (xq[4b + k]); the i32 lanes of one load are 16 columns each,
 * lanes 0-3 group 2q, 4-7 group 2q + 1. Two rounds of hadd fold four loads into one vector holding
 * the eight groups in the order PERM2 below; the float scales are permuted to match.
 * 4-bit: one load = one group; planes raw & 15 (columns 2b) and (raw >> 4) & 15 (2b + 1); the hadd
 * tree of eight loads ends in natural order. */
AVX2 void nk_pred_avx2(const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1,
                           float *score) {
    int64_t gs = p->C / p->G, G8 = p->G / 8 * 8, rb = p->C * p->bits / 8;
    if (!((p->bits == 2 || p->bits == 4) && gs == 64)) {
        nk_pred_generic(p, px, idx, r0, r1, score);
        return;
    }
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i perm = p->bits == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7) : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    float xsP[256], eP[256], sP[256];     /* per-call vectors in the kernel's group order (G <= 256) */
    if (p->G > 256) {
        nk_pred_generic(p, px, idx, r0, r1, score);
        return;
    }
    for (int64_t c = 0; c < G8; c += 8)
        for (int i = 0; i < 8; i++) {
            int g = (int)c + (p->bits == 2 ? (i < 4 ? 2 * i : 2 * (i - 4) + 1) : i);
            xsP[c + i] = px->xs[g], eP[c + i] = px->e[g], sP[c + i] = px->xsum[g];
        }
    for (int64_t q = r0; q < r1; q++) {
        int64_t r = idx ? idx[q] : q;
        const uint8_t *row = p->packed + r * rb;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < G8; c += 8) {
            __m256i hh;
            if (p->bits == 2) {
                const __m256i m3 = _mm256_set1_epi8(3);
                __m256i v[4];
                for (int q = 0; q < 4; q++) {
                    int64_t b = c * 16 + 32 * q;              /* byte offset in the row */
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(row + b));
                    __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(raw, m3), _mm256_loadu_si256((const __m256i *)(px->plane[0] + b)));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 2), m3),
                                                                 _mm256_loadu_si256((const __m256i *)(px->plane[1] + b))));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m3),
                                                                 _mm256_loadu_si256((const __m256i *)(px->plane[2] + b))));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 6), m3),
                                                                 _mm256_loadu_si256((const __m256i *)(px->plane[3] + b))));
                    v[q] = _mm256_madd_epi16(s, ones);
                }
                hh = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
            } else {
                const __m256i m15 = _mm256_set1_epi8(15);
                __m256i v[8];
                for (int q = 0; q < 8; q++) {
                    int64_t b = c * 32 + 32 * q;
                    __m256i raw = _mm256_loadu_si256((const __m256i *)(row + b));
                    __m256i s = _mm256_maddubs_epi16(_mm256_and_si256(raw, m15), _mm256_loadu_si256((const __m256i *)(px->plane[0] + b)));
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m15),
                                                                 _mm256_loadu_si256((const __m256i *)(px->plane[1] + b))));
                    v[q] = _mm256_madd_epi16(s, ones);
                }
                __m256i A = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                __m256i B = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
                hh = _mm256_add_epi32(_mm256_permute2x128_si256(A, B, 0x20), _mm256_permute2x128_si256(A, B, 0x31));
            }
            __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p->scale + r * p->G + c)));
            __m256 zc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p->zero + r * p->G + c)));
            sc = _mm256_permutevar8x32_ps(sc, perm);
            zc = _mm256_permutevar8x32_ps(zc, perm);
            __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hh), _mm256_loadu_ps(xsP + c), _mm256_loadu_ps(eP + c));
            acc = _mm256_fmadd_ps(sc, f, acc);
            acc = _mm256_fmadd_ps(zc, _mm256_loadu_ps(sP + c), acc);
        }
        float s = hsum8(acc);
        for (int64_t g = G8; g < p->G; g++)
            s += nk_h2f(p->scale[r * p->G + g]) * ((float)pred_group_dot(p, px, row, g) * px->xs[g] + px->e[g])
                 + nk_h2f(p->zero[r * p->G + g]) * px->xsum[g];
        score[q - r0] = s;
    }
}

/* ---- AVX-512 VNNI: the fused 2-bit select (nk_pred_sel2.h) ------------------------------------ */
#define VNNIG __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")))

/* 16 floats (two of one row's eight-lane sums at a time) of eight vectors [row 2i: 8 | row 2i + 1: 8]
 * -> the 16 row sums, each by the tree of hsum8 over nk_pred_avx2's lanes: lane i there holds group
 * perm[i] = 0 2 4 6 1 3 5 7, so its sum is ((g0 + g1) + (g4 + g5)) + ((g2 + g3) + (g6 + g7)). */
VNNI static inline __m512 sel2_rowsums(const __m512 *a) {
    const __m512i back = _mm512_setr_epi32(0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15);
    __m512 x[4], y[2];
    for (int i = 0; i < 4; i++)         /* 128-bit lane q: pairs (g01, g23) / (g45, g67) of two rows */
        x[i] = _mm512_add_ps(_mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0x88), _mm512_shuffle_ps(a[2 * i], a[2 * i + 1], 0xdd));
    for (int j = 0; j < 2; j++)         /* g01 + g45, g23 + g67 */
        y[j] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0x88), _mm512_shuffle_f32x4(x[2 * j], x[2 * j + 1], 0xdd));
    __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xdd));
    return _mm512_permutexvar_ps(back, z);   /* z holds rows 0 2 8 10 | 1 3 9 11 | 4 6 12 14 | 5 7 13 15 */
}

VNNI static inline __m512 twice(__m256 a) {           /* [a | a] (AVX-512F only: no insertf32x8) */
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(a)), _mm256_castps_pd(a), 1));
}

#define SEL2(name) sel2_##name##_sh
#define SEL2_TARGET VNNI
#define SEL2_PLANE(raw, k) _mm512_and_si512(_mm512_srli_epi16(raw, 2 * (k)), m3)
#define SEL2_BIT(raw, k) _mm512_and_si512(_mm512_srli_epi16(raw, k), m1)
#include "nk_pred_sel2.h"
#undef SEL2
#undef SEL2_TARGET
#undef SEL2_PLANE
#undef SEL2_BIT
/* GF(2) affine map of each byte: output bits 0, 1 = input bits 2k, 2k + 1 (1 bit: output bit 0 = input
 * bit k; the matrix row of output bit i is byte 7 - i of the 64-bit operand) */
#define SEL2(name) sel2_##name##_gf
#define SEL2_TARGET VNNIG
#define SEL2_PLANE(raw, k) _mm512_gf2p8affine_epi64_epi8(raw, _mm512_set1_epi64((0x0102ll << (2 * (k))) << 48), 0)
#define SEL2_BIT(raw, k) _mm512_gf2p8affine_epi64_epi8(raw, _mm512_set1_epi64((1ll << (k)) << 56), 0)
#include "nk_pred_sel2.h"
#undef SEL2
#undef SEL2_TARGET
#undef SEL2_PLANE
#undef SEL2_BIT

/* the GFNI copy where the CPU has GFNI (unless sh: the tests run both); all rows (idx NULL) of a predictor
 * with its blocked copy (p->blk) by the blocked kernel */
static int64_t sel2(const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1, int32_t *out,
                    float *score, int sh) {
    static int gf = -1;
    if (gf < 0) {
        __builtin_cpu_init();
        gf = __builtin_cpu_supports("gfni") ? 1 : 0;
    }
    if (!idx && p->blk)
        return gf && !sh ? sel2_blk_gf(p, px, r0, r1, out, score) : sel2_blk_sh(p, px, r0, r1, out, score);
    return gf && !sh ? sel2_vnni_gf(p, px, idx, r0, r1, out, score) : sel2_vnni_sh(p, px, idx, r0, r1, out, score);
}
#endif

/* Does the fused select (sel2) run p on kernel set k? */
static int sel2_fits(const nk_kern *k, const nk_pred *p) {
#ifdef NK_X86
    return k->level == 2 && (p->bits == 2 || p->bits == 1) && p->C == 64 * (int64_t)p->G && p->G % 8 == 0
           && p->G <= 64;
#else
    (void)k, (void)p;
    return 0;
#endif
}

/* 16-row blocks of 320 G bytes (nk_pred_sel2.h, sel2_blk): per group g, the four 64-byte code loads
 * (lane i of load j: row 16b + i's code bytes 16g + 4j ..), the 16 scales, the 16 zeros; rows past R zero.
 * A copy of the predictor (+100% of its bytes, kept: the prefill's candidate lists read the row layout). */
uint8_t *nk_pred_blk_new(const nk_kern *k, const nk_pred *p) {
    if (!sel2_fits(k, p) || p->bits != 2)
        return NULL;
    int64_t G = p->G, rb = p->C / 4, nb = (p->R + 15) / 16, bs = 320 * G;
    uint8_t *dst = aligned_alloc(64, nb * bs);          /* bs: a multiple of 64 (G % 8 == 0) */
    if (!dst)
        return NULL;
    memset(dst, 0, nb * bs);
    for (int64_t r = 0; r < p->R; r++)
        for (int64_t g = 0; g < G; g++) {
            uint8_t *q = dst + r / 16 * bs + 320 * g;
            int64_t i = r % 16;
            for (int j = 0; j < 4; j++)
                memcpy(q + 64 * j + 4 * i, p->packed + r * rb + 16 * g + 4 * j, 4);
            memcpy(q + 256 + 2 * i, p->scale + r * G + g, 2);
            memcpy(q + 288 + 2 * i, p->zero + r * G + g, 2);
        }
    return dst;
}

int64_t nk_pred_select(const nk_kern *k, const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0,
                       int64_t r1, int32_t *out, float *score) {
#ifdef NK_X86
    if (sel2_fits(k, p))
        return sel2(p, px, idx, r0, r1, out, NULL, 0);
#endif
    k->pred(p, px, idx, r0, r1, score);
    int64_t n = 0;
    for (int64_t q = r0; q < r1; q++)
        if (score[q - r0] >= p->thr)
            out[n++] = (int32_t)q;
    return n;
}

/* ---- single kernels, for the tests (tests/test_native.py checks them against numpy) ------------- */
/* scores (R,) of the predictor for x (C,) by kernel set `level` (fused: 1 = by the fused select's kernel
 * where it applies, 2 = its copy without GFNI, 3 / 4 = the same on the blocked copy (nk_pred_blk_new: all rows
 * in chunks of 20, unaligned to its 16-row blocks as the pool's chunks; a candidate list idx still takes the row
 * layout), else -2), and the select with threshold thr over the rows idx (n of them; NULL: all R) into sel
 * (returns its count in *nsel; fused 3 / 4: on the blocked copy, in the same chunks). */
int nk_test_pred_sel(int level, int fused, int64_t bits, int64_t G, int64_t R, int64_t C, const uint8_t *packed,
                     const uint16_t *scale, const uint16_t *zero, const float *x, float thr, const int32_t *idx,
                     int64_t n, float *score, int32_t *sel, int64_t *nsel) {
    const nk_kern *k = nk_kern_get(level);
    if (!k)
        return -1;
    nk_pred p = {(int32_t)bits, (int32_t)G, R, C, packed, scale, zero, thr, NULL};
    if (fused && !sel2_fits(k, &p))
        return -2;
    uint8_t *blk = fused >= 3 ? nk_pred_blk_new(k, &p) : NULL;
    if (fused >= 3 && !blk)
        return -2;
    p.blk = blk;
    nk_pred_x px;
    px.xq = malloc(C);
    for (int i = 0; i < 4; i++)
        px.plane[i] = malloc(C);
    px.xs = malloc(G * sizeof(float)), px.e = malloc(G * sizeof(float)), px.xsum = malloc(G * sizeof(float));
    if (!idx)
        n = R;
    float *tmp = malloc((n > 0 ? n : 1) * sizeof(float));
    nk_pred_prep(&p, x, &px);
    int64_t cs = blk && !idx ? 20 : (n > 0 ? n : 1);       /* the chunks of rows */
#ifdef NK_X86
    if (fused)
        for (int64_t q = 0; q < n; q += cs)
            sel2(&p, &px, idx, q, q + cs < n ? q + cs : n, NULL, score + q, fused % 2 == 0);
    else
#endif
        k->pred(&p, &px, idx, 0, n, score);
    *nsel = 0;
    for (int64_t q = 0; q < n; q += cs)
        *nsel += nk_pred_select(k, &p, &px, idx, q, q + cs < n ? q + cs : n, sel + *nsel, tmp);
    free(px.xq), free(px.xs), free(px.e), free(px.xsum), free(tmp), free(blk);
    for (int i = 0; i < 4; i++)
        free(px.plane[i]);
    return 0;
}

/* ---- for the tests (tests/test_native.py): px of x (C,) by level's prep into xq (C,), xs, e, xsum (G,) and
 * planes (4, C) (zeroed by the caller; plane k in row k) ---- */
int nk_test_pred_prep(int level, int64_t bits, int64_t G, int64_t C, const float *x, int8_t *xq, float *xs, float *e,
                      float *xsum, int8_t *planes) {
    const nk_kern *k = nk_kern_get(level);
    if (!k || G < 1 || C % G)
        return -1;
    nk_pred p = {(int32_t)bits, (int32_t)G, 1, C, NULL, NULL, NULL, 0.0f, NULL};
    nk_pred_x px = {xq, {planes, planes + C, planes + 2 * C, planes + 3 * C}, xs, e, xsum};
    nk_pred_prep_k(k, &p, x, &px);
    return 0;
}
