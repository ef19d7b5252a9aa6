/* The time-mix of a prefill chunk (T > 1 tokens) after its r/k/v mat-vecs (nk_rwkv7.c time_mix):
 * the same math as the decode step's per-token loop, reorganised for a chunk:
 * - the LoRAs (M (I, O) int8 (in, out) + column scale cs (O,)) for all T tokens at once: each int8
 *   row of M is converted to float once per block of up to 6 tokens and FMA'd into all of them
 *   (decode: once per token), 6 tokens x 16 outputs of accumulators in registers;
 * - the elementwise part token by token with the steps' operations (nk_prefill_elem.c: libm's expf, or
 *   at the VNNI level a 16-lane expf bit-identical to glibc's; an 8-wide polynomial exp that differed by
 *   ~1 ulp flipped an int8 rounding of a later activation, which the prefill-vs-steps tests saw as a
 *   2e-2 jump in one token's logits);
 * - the wkv recurrence head by head over all T tokens (the head's (N, N) state, 16 KiB at N 64,
 *   stays in L1 across the chunk; decode walks all heads per token).
 * The LoRA sums keep the order of the steps' vecmat, so on the same inputs the prefill's time-mix
 * gives the steps' floats (the 6-token tile only reuses each converted row; it does not reorder sums).
 * Threads split the tokens (LoRAs, elementwise), then the heads (wkv, group norm; one head per item).
 * The elementwise parts (the per-token time-mix, gate sigmoid, norms four tokens at a time, the layer
 * norm + token shift by token over threads) are in nk_prefill_elem.c.
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
/* NT (<= 6) tokens x 16 outputs (rows of M ldm bytes apart): 12 accumulators; each row of M converted once for the NT tokens,
 * then per token acc = fma(x_i, M_i, acc) over i in order: the sums of vecmat_avx2 in the steps'
 * lora() (nk_rwkv7.c), so the prefill's LoRAs equal the steps' bit for bit */
AVX2 static inline __attribute__((always_inline)) void lora_tile(const float *X, int64_t ldx, const int8_t *M,
                                                                 const float *cs, int64_t I, int64_t ldm, float *Y,
                                                                 int64_t ldy, const int NT) {
    __m256 acc[6][2];
    for (int t = 0; t < NT; t++)
        acc[t][0] = acc[t][1] = _mm256_setzero_ps();
#define CV(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
    for (int64_t i = 0; i < I; i++) {
        const int8_t *r = M + i * ldm;
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
                                                                    const float *cs, int64_t I, int64_t ldm, float *Y,
                                                                    int64_t ldy, const int NT) {
    __m512 acc[6][2];
    for (int t = 0; t < NT; t++)
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
#define CV(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
    for (int64_t i = 0; i < I; i++) {
        const int8_t *r = M + i * ldm;
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

/* Y[t, o] (T x O, ldy) = sum_i X[t, i] M[i, o] * cs[o] in W-column stripes and blocks of <= 6 tokens; the
 * switch makes the block's token count a constant in each inlined TILE (their accumulators stay in registers) */
#define LORA_ROWS_BODY(TILE, W)                                                                      \
    for (int64_t o0 = 0; o0 < O; o0 += (W))                                                          \
        for (int64_t t0 = 0; t0 < T; t0 += 6) {                                                      \
            const float *x = X + t0 * ldx;                                                           \
            float *y = Y + t0 * ldy + o0;                                                            \
            switch (T - t0 < 6 ? T - t0 : 6) {                                                       \
            case 6: TILE(x, ldx, M + o0, cs + o0, I, ldm, y, ldy, 6); break;                         \
            case 5: TILE(x, ldx, M + o0, cs + o0, I, ldm, y, ldy, 5); break;                         \
            case 4: TILE(x, ldx, M + o0, cs + o0, I, ldm, y, ldy, 4); break;                         \
            case 3: TILE(x, ldx, M + o0, cs + o0, I, ldm, y, ldy, 3); break;                         \
            case 2: TILE(x, ldx, M + o0, cs + o0, I, ldm, y, ldy, 2); break;                         \
            default: TILE(x, ldx, M + o0, cs + o0, I, ldm, y, ldy, 1); break;                        \
            }                                                                                        \
        }

/* O % 32 == 0; rows of M ldm bytes apart (O: the file's matrix; a block's width: the packed copy) */
VNNI static void lora_rows_512(const float *X, int64_t ldx, int64_t T, const int8_t *M, int64_t ldm, const float *cs,
                               int64_t I, int64_t O, float *Y, int64_t ldy) {
    LORA_ROWS_BODY(lora_tile512, 32)
}

/* O % 16 == 0; a 16-column stripe of M (16 I bytes) stays in L1 while every token block reads it */
AVX2 static void lora_rows_avx2(const float *X, int64_t ldx, int64_t T, const int8_t *M, int64_t ldm, const float *cs,
                                int64_t I, int64_t O, float *Y, int64_t ldy) {
    LORA_ROWS_BODY(lora_tile, 16)
}
#undef LORA_ROWS_BODY

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
    if (m->k->level > 0) {
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
    if (m->k->level > 0) {
        quantize_rows_avx2(x, T, I, X, xs);
        return;
    }
#endif
    for (int64_t t = 0; t < T; t++)
        nk_quantize(x + t * I, I, X + t * I, xs + t * (I / NK_GS));
}

/* Y (T, O) = X (T, I) @ LoRA j of layer b (nk_layer order w1 .. v2; M (I, O), cs: its file matrix and column
 * scale). From the model's packed copy where it has one (nk_lora.c, VNNI level: block by block, each block's
 * rows W bytes apart), so that after nk_model_new nothing reads the file's matrix (native.py gives its pages
 * back); else from M. The same floats either way: each column's sum in its own lane, i in order, whichever
 * tile width (the 512-bit tile's lanes do the 256-bit tile's operations). The SIMD paths need O % 16. */
static void lora_rows(const nk_model *m, const nk_layer *b, int j, const float *X, int64_t ldx, int64_t T,
                      const int8_t *M, const float *cs, int64_t I, int64_t O, float *Y, int64_t ldy) {
#ifdef NK_X86
    const int8_t *P = m->lp ? m->lp[8 * (b - m->layers) + j] : NULL;
    if (P && m->k->level == 2) {
        for (int64_t c0 = 0, W; c0 < O; c0 += W) {
            W = nk_lora_block_w(O - c0);
            if (W % 32 == 0)
                lora_rows_512(X, ldx, T, P + c0 * I, W, cs + c0, I, W, Y + c0, ldy);
            else
                lora_rows_avx2(X, ldx, T, P + c0 * I, W, cs + c0, I, W, Y + c0, ldy);
        }
        return;
    }
    if (m->k->level == 2 && O % 32 == 0) {
        lora_rows_512(X, ldx, T, M, O, cs, I, O, Y, ldy);
        return;
    }
    if (m->k->level > 0 && O % 16 == 0) {
        lora_rows_avx2(X, ldx, T, M, O, cs, I, O, Y, ldy);
        return;
    }
#else
    (void)m, (void)b, (void)j;
#endif
    lora_rows_generic(X, ldx, T, M, cs, I, O, Y, ldy);
}

/* x (T, n) (row stride ld) = tanh of itself (the decay's hidden LoRA layer) */
static void tanh_rows(float *x, int64_t T, int64_t n, int64_t ld) {
    for (int64_t t = 0; t < T; t++) {
        for (int64_t j = 0; j < n; j++)
            x[t * ld + j] = tanhf(x[t * ld + j]);
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
 * other), then the update and s . r (a row pair's chain of the first pass had stalled its second).
 * nS0, nS: NULL, or the next head's state in and out, fetched a row pair at a time alongside (a decode
 * step's states come from DRAM or L3, 1.5 MiB each way at 58M; 96 heads after a 64 MiB sweep, one
 * thread: 82-98 us without, 66-74 us with both, 78 us with nS0 only; the whole next head fetched before
 * the head instead: 104 us) */
VNNI static inline __attribute__((always_inline)) void wkv_512_body(float *S, const float *S0, int64_t N,
                                                                    const float *r, const float *w, const float *k,
                                                                    const float *v, const float *a, const float *b,
                                                                    float *y, const float *nS0, float *nS) {
    float sav_[256];                      /* N <= 256 (else the 256-bit kernel) */
    for (int64_t i = 0; i < N; i += 2) {
        const float *s0 = S0 + i * N;
        if (nS0)
            for (int64_t l = 0; l < 2 * N; l += 16)
                _mm_prefetch((const char *)(nS0 + i * N + l), _MM_HINT_T0);
        __m512 sa = _mm512_setzero_ps();
        for (int64_t j = 0; j < N; j += 8)
            sa = _mm512_fmadd_ps(rows2(s0 + j, N), bcast8(a + j), sa);
        sav_[i] = hsum8(_mm512_castps512_ps256(sa));
        sav_[i + 1] = hsum8(hi8(sa));
    }
    for (int64_t i = 0; i < N; i += 2) {
        float *s = S + i * N;
        const float *s0 = S0 + i * N;
        if (nS)
            for (int64_t l = 0; l < 2 * N; l += 16)
                __builtin_prefetch(nS + i * N + l, 1, 3);
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

VNNI static void wkv_512(float *S, const float *S0, int64_t N, const float *r, const float *w, const float *k,
                         const float *v, const float *a, const float *b, float *y) {
    wkv_512_body(S, S0, N, r, w, k, v, a, b, y, NULL, NULL);
}

VNNI static void wkv_512_pf(float *S, const float *S0, int64_t N, const float *r, const float *w, const float *k,
                            const float *v, const float *a, const float *b, float *y, const float *nS0, float *nS) {
    wkv_512_body(S, S0, N, r, w, k, v, a, b, y, nS0, nS);
}
#endif

nk_wkv_fn nk_wkv_of(const nk_model *m) {
#ifdef NK_X86
    if (m->k->level == 2 && m->N % 16 == 0 && m->N <= 256)
        return wkv_512;
#endif
    return m->k->wkv;
}

void nk_wkv_step(const nk_model *m, float *S, const float *S0, const float *r, const float *w, const float *k,
                 const float *v, const float *a, const float *b, float *y, const float *nS0, float *nS) {
    nk_wkv_fn f = nk_wkv_of(m);                    /* where the 512-bit kernel applies, its fetching twin */
#ifdef NK_X86
    if (f == wkv_512) {
        wkv_512_pf(S, S0, m->N, r, w, k, v, a, b, y, nS0, nS);
        return;
    }
#endif
    (void)nS0, (void)nS;
    f(S, S0, m->N, r, w, k, v, a, b, y);
}

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
    int64_t D = m->D, lt = m->lora_max, T = hi - lo;
    float *W = m->pre[0] + lo * D, *A = m->pre[1] + lo * D, *Gt = m->pre[2] + lo * D, *GV = m->pre[3] + lo * D;
    float *t1 = m->pre[5] + lo * lt;
    NK_BUSY0();
    lora_rows(m, b, 0, m->mix[1] + lo * D, D, T, b->w1, b->w1s, D, m->dw, t1, lt);          /* decay */
    tanh_rows(t1, T, m->dw, lt);
    lora_rows(m, b, 1, t1, lt, T, b->w2, b->w2s, m->dw, D, W, D);
    lora_rows(m, b, 2, m->mix[4] + lo * D, D, T, b->a1, b->a1s, D, m->da, t1, lt);          /* in-context rate */
    lora_rows(m, b, 3, t1, lt, T, b->a2, b->a2s, m->da, D, A, D);
    lora_rows(m, b, 4, m->mix[5] + lo * D, D, T, b->g1, b->g1s, D, m->dg, t1, lt);          /* output gate */
    nk_sigmoid_rows(m, t1, T, m->dg, lt);
    lora_rows(m, b, 5, t1, lt, T, b->g2, b->g2s, m->dg, D, Gt, D);
    if (a->first) {
        memcpy(m->vf + lo * D, m->v + lo * D, T * D * sizeof(float));
    } else {                                                                              /* value residual */
        lora_rows(m, b, 6, m->mix[3] + lo * D, D, T, b->v1, b->v1s, D, m->dv, t1, lt);
        lora_rows(m, b, 7, t1, lt, T, b->v2, b->v2s, m->dv, D, GV, D);
    }
    NK_BUSY(17, tid);
    for (int64_t t = lo; t < hi; t++) {
        int64_t o = t * D;
        nk_mix_token(m, b, a->first, m->kk + o, m->v + o, m->vf + o, m->pre[0] + o, m->pre[1] + o, m->pre[3] + o,
                     m->pre[4] + o);
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
    nk_wkv_fn wkv = nk_wkv_of(m);
    for (int64_t h = lo; h < hi; h++)
        for (int64_t t = 0; t < T; t++) {
            int64_t o = t * D + h * N;
            wkv(a->S + h * N * N, (t ? a->S : a->S0) + h * N * N, N, m->r + o, W + o, m->kk + o, m->v + o, KN + o,
                A + o, m->y + o);
        }
    for (int64_t h = lo; h < hi; h++)                /* four tokens at a time (nk_prefill_elem.c) */
        nk_head_out_rows(b, N, h, D, T, m->r, m->kk, m->v, Gt, m->y);
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
