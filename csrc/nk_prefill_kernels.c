/* 512-bit kernels of the native backend's prefill (T > 1 tokens; AVX-512 VNNI level, x86-64 only),
 * each giving the same floats as the 256-bit kernel it stands in for, so the VNNI level stays equal to
 * AVX2 bit for bit (tests/test_native*.py):
 * - int8 and int4 row dots with two tokens per register (dots_vnni / nk_dots4_vnni for T > 1);
 * - a token's active neurons of a key block by compress (nk_ffn.c's scalar loop);
 * - the value pass's four-column axpy, int8 and int4 (axpy4_avx2 / nk_axpy4q_avx2).
 * The rest of the prefill (LoRAs, wkv, rounding, the time-mix tasks) is nk_prefill.c.
 */
#include "nk.h"

#include "nk_simd.h"

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
                                                                      int64_t I, const uint8_t *P, const float *xs,
                                                                      int64_t t0, int64_t T,
                                                                      int64_t p, int64_t n, float *y, int64_t ldy,
                                                                      const int NP) {
    int64_t G = I / NK_GS;
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
                const uint8_t *pq = P + ((ta[q] >> 1) * (G / 2) + pr) * 192;     /* dots4_pairs' layout */
                __m512i xlo = _mm512_loadu_si512((const void *)pq), xhi = _mm512_loadu_si512((const void *)(pq + 64));
                __m512i iv = _mm512_loadu_si512((const void *)(pq + 128));
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

/* The activations of each token pair (t, t + 1) (t even; t + 1 -> t past the end) as the tile's
 * registers hold them, built once per call instead of per four rows: per group pair pr, 192 bytes:
 * xq[64 pr : 64 pr + 32] of t | of t + 1, then xq[64 pr + 32 : 64 pr + 64] of both, then the init
 * terms init[8 pr : 8 pr + 8] of both (the same bytes the tile's pair loads assembled) */
VNNI static void dots4_pairs(const int8_t *X, const int32_t *init, int64_t T, int64_t I, uint8_t *P) {
    int64_t G = I / NK_GS, NI = NK_INIT(G);
    for (int64_t ta = 0; ta < T; ta += 2) {
        int64_t tb = ta + 1 < T ? ta + 1 : ta;
        for (int64_t pr = 0; pr < G / 2; pr++) {
            const int8_t *xa = X + ta * I + 64 * pr, *xb = X + tb * I + 64 * pr;
            uint8_t *o = P + ((ta >> 1) * (G / 2) + pr) * 192;
            _mm512_storeu_si512((void *)o, pair512_si(xa, xb));
            _mm512_storeu_si512((void *)(o + 64), pair512_si(xa + 32, xb + 32));
            _mm512_storeu_si512((void *)(o + 128), pair512_si(init + ta * NI + 8 * pr, init + tb * NI + 8 * pr));
        }
    }
}

#define NK_PAIRS_MAX (96 * 1024)     /* the pairs buffer on the stack: T <= 64 at I <= 1024 (larger: built in slices) */

/* the rows against tokens [0, T) whose pairs are in P */
VNNI static void dots4_rows(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride,
                            const int32_t *idx, int64_t n, int64_t I, const uint8_t *P, const float *xs, int64_t T,
                            float *y, int64_t ldy) {
    int64_t H = I / 2;
    for (int64_t p = 0; p < n; p += 4) {
        const uint8_t *w[4];
        const uint16_t *s[4];
        nk_rows4(base, sbase, stride, sstride, idx, p, n, w, s);
        if (p + 12 < n)              /* fetch the rows two passes ahead (scattered or strided) */
            for (int k = 8; k < 12; k++) {
                nk_prefetch_row4(base, sbase, stride, sstride, idx ? idx[p + k] : p + k, H);
            }
        for (int64_t t0 = 0; t0 < T; t0 += 6) {
            switch ((T - t0 + 1) / 2 < 3 ? (T - t0 + 1) / 2 : 3) {
            case 3: dots4_512_tile(w, s, I, P, xs, t0, T, p, n, y, ldy, 3); break;
            case 2: dots4_512_tile(w, s, I, P, xs, t0, T, p, n, y, ldy, 2); break;
            default: dots4_512_tile(w, s, I, P, xs, t0, T, p, n, y, ldy, 1); break;
            }
        }
    }
}

VNNI void nk_dots4_vnni512(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride,
                           const int32_t *idx, int64_t n, int64_t I, const int8_t *X, const float *xs,
                           const int32_t *init, int64_t T, float *y, int64_t ldy) {
    int64_t G = I / NK_GS, TS = T;
    uint8_t P[NK_PAIRS_MAX] __attribute__((aligned(64)));
    while ((TS + 1) / 2 * (G / 2) * 192 > NK_PAIRS_MAX)   /* a slice of token pairs that fits (even) */
        TS = (TS / 2 + 1) & ~(int64_t)1;
    for (int64_t t0 = 0; t0 < T; t0 += TS) {               /* tiles restart per slice */
        int64_t nt = T - t0 < TS ? T - t0 : TS;
        dots4_pairs(X + t0 * I, init + t0 * NK_INIT(G), nt, I, P);
        dots4_rows(base, sbase, stride, sstride, idx, n, I, P, xs + t0 * G, nt, y + t0 * ldy, ldy);
    }
}
#endif

#ifdef NK_X86
/* The active neurons of one token in a key block (nk_ffn.c, VNNI level): for p < nb (nb % 16 == 0)
 * with a = keys[p] * ks_p > 0, appends j0 + p to pj and (a * a) * vs_p to ph; (ks, vs) = sc[2p],
 * sc[2p + 1] (int8 kv_scale), or 1 with sc NULL (int4). The scalar loop's operations, so the same
 * floats; each 16 are compressed in registers and stored whole: pj, ph need 16 entries of slack.
 * Returns how many it appended. */
/* the same for the decode's sparse set: keys[p] belongs to neuron idx[p] (p < n, any n), sc gathered by
 * neuron; appends idx[p] and (a * a) * vs to pj, ph (exactly as many entries as it appends) */
VNNI int64_t nk_active_idx_512(const float *keys, const float *sc, const int32_t *idx, int64_t n, int32_t *pj,
                               float *ph) {
    int64_t k = 0;
    for (int64_t p = 0; p < n; p += 16) {
        __mmask16 live = n - p >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - p)) - 1);
        __m512i j = _mm512_maskz_loadu_epi32(live, idx + p);
        __m512 ks = _mm512_set1_ps(1.0f), vs = ks;
        if (sc) {
            __m512i j2 = _mm512_add_epi32(j, j);
            ks = _mm512_mask_i32gather_ps(ks, live, j2, sc, 4);
            vs = _mm512_mask_i32gather_ps(vs, live, _mm512_add_epi32(j2, _mm512_set1_epi32(1)), sc, 4);
        }
        __m512 a = _mm512_mul_ps(_mm512_maskz_loadu_ps(live, keys + p), ks);
        __mmask16 m = _mm512_mask_cmp_ps_mask(live, a, _mm512_setzero_ps(), _CMP_GT_OQ);
        if (!m)
            continue;
        int c = __builtin_popcount(m);
        __mmask16 lo = (__mmask16)((1u << c) - 1);
        _mm512_mask_storeu_epi32(pj + k, lo, _mm512_maskz_compress_epi32(m, j));
        _mm512_mask_storeu_ps(ph + k, lo, _mm512_maskz_compress_ps(m, _mm512_mul_ps(_mm512_mul_ps(a, a), vs)));
        k += c;
    }
    return k;
}

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

/* nk_axpy4q: the code of a column made float by a table, not by widening and converting: vpermps
 * reads only an index's low 4 bits, so the 16 code bytes zero-extended to i32 index the low nibbles
 * (outputs 0-15) as they are and the high ones (16-31) after a shift; table C[u] = u - 8 gives the
 * float of the signed code exactly, and table P_k[u] = (h_k d_kg)(u - 8) the rounded product that the
 * 256-bit kernel's mul makes (columns 1 and 3; columns 0 and 2 stay inside the FMA, unrounded): the
 * same floats, ~25 instead of ~50 vector operations per group of four columns. */
VNNI void nk_axpy4q_512(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h) {
    const __m512 C = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t g = 0; g < D / NK_GS; g++) {
        __m512 hd0 = _mm512_set1_ps(h[0] * _cvtsh_ss(s[0][g])), hd2 = _mm512_set1_ps(h[2] * _cvtsh_ss(s[2][g]));
        __m512 P1 = _mm512_mul_ps(_mm512_set1_ps(h[1] * _cvtsh_ss(s[1][g])), C);
        __m512 P3 = _mm512_mul_ps(_mm512_set1_ps(h[3] * _cvtsh_ss(s[3][g])), C);
        __m512i u[4];
        for (int k = 0; k < 4; k++)
            u[k] = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(v[k] + 16 * g)));
        for (int q = 0; q < 2; q++) {              /* outputs 16q .. 16q + 15 of the group */
            __m512i i0 = q ? _mm512_srli_epi32(u[0], 4) : u[0], i1 = q ? _mm512_srli_epi32(u[1], 4) : u[1];
            __m512i i2 = q ? _mm512_srli_epi32(u[2], 4) : u[2], i3 = q ? _mm512_srli_epi32(u[3], 4) : u[3];
            __m512 a = _mm512_fmadd_ps(hd0, _mm512_permutexvar_ps(i0, C), _mm512_permutexvar_ps(i1, P1));
            __m512 b = _mm512_fmadd_ps(hd2, _mm512_permutexvar_ps(i2, C), _mm512_permutexvar_ps(i3, P3));
            float *o = out + g * 32 + 16 * q;
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(a, b)));
        }
    }
}
#endif
