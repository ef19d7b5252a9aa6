/* Every-row dense FFN of the native backend (`NativeRWKV7(..., ffn="dense")`): what a dense runtime
 * (llama.cpp's ffn_down) computes, for the honest "dense" row of tools/bench.py. The default FFN of
 * nk_ffn.c ("exact") reads a value column only where relu(k)^2 > 0: lossless, and fewer bytes.
 *
 * Per layer and token: all F key rows (the int8 / int4 dots of nk_ffn.c), then the value mat-vec
 * y (D,) = V (D, F) a (F,) as ROW dots over a transposed copy of the value matrix, built once by
 * nk_model_dense (only in this mode: F D bytes per layer int8, F D / 2 + F D / 16 int4), with the
 * activation rounded to int8 per 32 neurons and integer dot products (the kernels the attention
 * mat-vecs use: AVX2 maddubs, AVX-512 VNNI, or plain C), as llama.cpp's Q8_0 x Q8_0 / Q4_0 x Q8_0.
 *
 * int8 file (kv (F, 2, D), kv_scale (F, 2)): the neuron's value scale folds into its activation,
 *     a_i = relu(k_i s_k,i)^2 s_v,i;   y_d = sum_i a_i q_i,d = dots(VT8[d, :], round8(a))
 * VT8 (D, F) int8, unit weight scales.
 * int4 file (kv4 (F, 2, D / 2), group scales kv4s (F, 2, D / 32), nk_q4.c): the scale d_i,g varies
 * with the neuron i inside a dot, so per output group g (32 outputs) its own activation
 *     a_g,i = relu(k_i)^2 d_i,g;   y_d = dots4(VT4[d, :], round8(a_g(d)))      (unit group scales)
 * VT4 (D, F / 2): the codes transposed, in nk_q4.c's layout along F (groups of 32 neurons), read as
 * int4 bytes; ST (D / 32, F) float16: d_i,g transposed (the file's scale bytes, read once per token).
 * The extra cost over int8 is rounding D / 32 activation vectors of F per token (3% of the dots'
 * elements at D 512); re-packing the codes to int8 would read twice the bytes.
 * Threads split the key rows, then the output rows (int8) or output groups (int4).
 */
#include <stdlib.h>
#include <string.h>

#include "nk_model.h"
#include "nk_simd.h"

struct nk_dense {
    int8_t **vt8;              /* (L,) of (D, F) int8, or NULL */
    uint8_t **vt4;             /* (L,) of (D, F / 2) int4 codes (nk_q4.c layout along F) */
    uint16_t **st4;            /* (L,) of (D / 32, F) float16 */
    uint16_t *ones;            /* (F / 32,) float16 1.0: VT4's unit group scales (row stride 0) */
    float *A;                  /* (TB, F) the activations */
    int8_t *Xa;                /* (TB, F) int8 activations (int8 files) */
    float *xsa;                /* (TB, F / 32) */
    float *out;                /* (TB, D) the value mat-vec */
    struct {                   /* per thread (int4): one output group's activations */
        float *P;              /* (TB, F) */
        int8_t *X;             /* (TB, F) */
        float *xs;             /* (TB, F / 32) */
        int32_t *init;         /* (TB, NK_INIT(F / 32)) */
    } t[NK_MAXT];
};

typedef struct {
    nk_model *m;
    const nk_layer *b;
    int64_t T, layer;
} dense_ctx;

/* keys of neurons [lo, hi) for T tokens into A (T, F), then a = relu(k s_k)^2 s_v (int4: relu(k)^2) */
static void keys_task(void *c, int tid, int64_t lo, int64_t hi) {
    dense_ctx *dc = (dense_ctx *)c;
    nk_model *m = dc->m;
    const nk_layer *b = dc->b;
    int64_t D = m->D, G = D / NK_GS, F = m->F, T = dc->T;
    float *A = m->dense->A;
    (void)tid;
    if (b->kv4)
        m->k->dots4(b->kv4 + lo * D, b->kv4s + lo * 2 * G, D, 2 * G, NULL, hi - lo, D, m->X4, m->xs, m->init, T,
                    A + lo, F);
    else
        m->k->dots(b->kv + lo * 2 * D, 2 * D, NULL, hi - lo, D, m->Xq, m->xs, T, A + lo, F);
    for (int64_t t = 0; t < T; t++)
        for (int64_t j = lo; j < hi; j++) {
            float k = A[t * F + j] * (b->kv4 ? 1.0f : b->kv_scale[2 * j]);
            A[t * F + j] = k > 0 ? k * k * (b->kv4 ? 1.0f : b->kv_scale[2 * j + 1]) : 0.0f;
        }
}

/* int8: output rows [lo, hi) of all T tokens */
static void values8_task(void *c, int tid, int64_t lo, int64_t hi) {
    dense_ctx *dc = (dense_ctx *)c;
    nk_model *m = dc->m;
    struct nk_dense *dn = m->dense;
    int64_t F = m->F;
    (void)tid;
    m->k->dots(dn->vt8[dc->layer] + lo * F, F, NULL, hi - lo, F, dn->Xa, dn->xsa, dc->T, dn->out + lo, m->D);
}

#ifdef NK_X86
AVX2 static void scale_rows_avx2(const float *A, const uint16_t *s, int64_t T, int64_t F, float *P) {
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < F; i += 8) {
            __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(P + t * F + i, _mm256_mul_ps(_mm256_loadu_ps(A + t * F + i), sv));
        }
}
#endif

/* P (T, F) = A (T, F) * s (F,) (float16 bits), per token (the same products at every level) */
static void scale_rows(const nk_model *m, const float *A, const uint16_t *s, int64_t T, int64_t F, float *P) {
#ifdef NK_X86
    if (m->k->level > 0) {
        scale_rows_avx2(A, s, T, F, P);
        return;
    }
#endif
    for (int64_t t = 0; t < T; t++)
        for (int64_t i = 0; i < F; i++)
            P[t * F + i] = A[t * F + i] * nk_h2f(s[i]);
}

#ifdef NK_X86
/* scale_rows + nk_quantize4_many of T rows in one pass on 512-bit registers (AVX-512 level): per block
 * of 32 neurons p = A * s (the same float products), max |p|, inv = 127 / max, rint(p inv) (cvtps2dq,
 * half to even as lrintf), xs = max / 127: bit-identical to the two-pass path (tests: the numpy math),
 * written straight into the int4 dots' pair layout with their -8 sum xq terms (nk_q4.c). The two
 * passes cost 9% of an int4-h8 dense decode step and 24% of its prefill (a build without them). */
VNNI static void fold_quantize4_512(const float *A, const uint16_t *s, int64_t T, int64_t F, int8_t *X, float *xs,
                                    int32_t *init) {
    int64_t GF = F / NK_GS, NI = NK_INIT(GF);
    for (int64_t t = 0; t < T; t++) {
        const float *a = A + t * F;
        int8_t *Xt = X + t * F;
        int32_t *it = init + t * NI;
        memset(it, 0, NI * sizeof(int32_t));
        for (int64_t g = 0; g < GF; g++) {
            __m512 p0 = _mm512_mul_ps(_mm512_loadu_ps(a + 32 * g),
                                      _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32 * g))));
            __m512 p1 = _mm512_mul_ps(_mm512_loadu_ps(a + 32 * g + 16),
                                      _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + 32 * g + 16))));
            float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(p0), _mm512_abs_ps(p1)));
            float inv = mx > 0 ? 127.0f / mx : 0.0f;
            xs[t * GF + g] = mx / 127.0f;
            __m512 iv = _mm512_set1_ps(inv);
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(p0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(p1, iv));
            int32_t sq = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            __m128i b0 = _mm512_cvtsepi32_epi8(q0), b1 = _mm512_cvtsepi32_epi8(q1);
            if ((GF & 1) && g == GF - 1) {             /* the odd last group: natural order, term in lane 0 */
                _mm_storeu_si128((__m128i *)(Xt + 32 * g), b0);
                _mm_storeu_si128((__m128i *)(Xt + 32 * g + 16), b1);
                it[4 * g] = -8 * sq;
            } else {                                   /* xq[0:16] at 64p + 16 (g & 1), xq[16:32] 32 further */
                int8_t *o = Xt + (g >> 1) * 64 + (g & 1) * 16;
                _mm_storeu_si128((__m128i *)o, b0);
                _mm_storeu_si128((__m128i *)(o + 32), b1);
                it[(g >> 1) * 8 + (g & 1) * 4] = -8 * sq;
            }
        }
    }
}
#endif

/* int4: output groups [lo, hi): each group's activation rounded, then its 32 rows */
static void values4_task(void *c, int tid, int64_t lo, int64_t hi) {
    dense_ctx *dc = (dense_ctx *)c;
    nk_model *m = dc->m;
    struct nk_dense *dn = m->dense;
    int64_t F = m->F, T = dc->T;
    for (int64_t g = lo; g < hi; g++) {
#ifdef NK_X86
        if (m->k->level == 2)
            fold_quantize4_512(dn->A, dn->st4[dc->layer] + g * F, T, F, dn->t[tid].X, dn->t[tid].xs, dn->t[tid].init);
        else
#endif
        {
            scale_rows(m, dn->A, dn->st4[dc->layer] + g * F, T, F, dn->t[tid].P);
            nk_quantize4_many(m, dn->t[tid].P, T, F, dn->t[tid].X, dn->t[tid].xs, dn->t[tid].init);
        }
        m->k->dots4(dn->vt4[dc->layer] + g * NK_GS * (F / 2), dn->ones, F / 2, 0, NULL, NK_GS, F, dn->t[tid].X,
                    dn->t[tid].xs, dn->t[tid].init, T, dn->out + g * NK_GS, m->D);
    }
}

/* x += FFN for T tokens, every key row and every value row; fx already rounded into m->Xq / m->X4
 * (nk_channel_mix). stats[0] += T F keys, stats[1] += T F value rows. */
void nk_ffn_dense_rows(nk_model *m, const nk_layer *b, int64_t T, int64_t *stats) {
    struct nk_dense *dn = m->dense;
    int64_t D = m->D, F = m->F;
    dense_ctx c = {m, b, T, b - m->layers};
    NK_TAG(3);
    nk_pool_run(m->pool, keys_task, &c, F);
    if (b->kv4) {
        nk_pool_run(m->pool, values4_task, &c, D / NK_GS);
    } else {
        nk_quantize_many(m, dn->A, T, F, dn->Xa, dn->xsa);
        nk_pool_run(m->pool, values8_task, &c, D);
    }
    for (int64_t e = 0; e < T * D; e++)
        m->x[e] += dn->out[e];
    stats[0] += T * F;
    stats[1] += T * F;
}

/* int4 code (0..15) of value v of a row in nk_q4.c's layout (I values, groups of 32) */
static inline int get4(const uint8_t *row, int64_t v) {
    uint8_t byte = row[(v / 32) * 16 + (v % 16)];
    return (v % 32) < 16 ? byte & 15 : byte >> 4;
}

static inline void put4(uint8_t *row, int64_t v, int code) {
    uint8_t *p = &row[(v / 32) * 16 + (v % 16)];
    *p = (v % 32) < 16 ? (uint8_t)((*p & 0xf0) | code) : (uint8_t)((*p & 0x0f) | (code << 4));
}

void nk_dense_free(nk_model *m) {
    struct nk_dense *dn = m->dense;
    if (!dn)
        return;
    for (int64_t i = 0; i < m->L; i++) {
        if (dn->vt8)
            free(dn->vt8[i]);
        if (dn->vt4)
            free(dn->vt4[i]), free(dn->st4[i]);
    }
    free(dn->vt8), free(dn->vt4), free(dn->st4), free(dn->ones);
    free(dn->A), free(dn->Xa), free(dn->xsa), free(dn->out);
    for (int i = 0; i < NK_MAXT; i++)
        free(dn->t[i].P), free(dn->t[i].X), free(dn->t[i].xs), free(dn->t[i].init);
    free(dn);
    m->dense = NULL;
}

/* Switch the model's FFN without predictor to every-row dense (on: 1, building the transposed value
 * matrices) or back to exact (0). Returns 0, or -1 (no memory, or F % 32: the dots' activation
 * groups; the model is then left exact). All layers must hold the same value dtype. */
int nk_model_dense(void *mp, int on) {
    nk_model *m = (nk_model *)mp;
    nk_dense_free(m);
    if (!on)
        return 0;
    int64_t L = m->L, D = m->D, F = m->F, G = D / NK_GS, GF = F / NK_GS;
    if (F % NK_GS)
        return -1;
    struct nk_dense *dn = calloc(1, sizeof *dn);
    if (!dn)
        return -1;
    m->dense = dn;
    int q4 = m->layers[0].kv4 != NULL, ok = 1;
    if (q4) {
        dn->vt4 = calloc(L, sizeof *dn->vt4), dn->st4 = calloc(L, sizeof *dn->st4);
        dn->ones = malloc(GF * sizeof(uint16_t));
        ok = dn->vt4 && dn->st4 && dn->ones;
        for (int64_t g = 0; ok && g < GF; g++)
            dn->ones[g] = 0x3c00;                       /* float16 1.0 */
    } else {
        dn->vt8 = calloc(L, sizeof *dn->vt8);
        ok = dn->vt8 != NULL;
    }
    for (int64_t i = 0; ok && i < L; i++) {
        const nk_layer *b = &m->layers[i];
        if ((b->kv4 != NULL) != q4) {
            ok = 0;
            break;
        }
        if (!q4) {                    /* VT8[d, j] = kv[j, 1, d], in 32 x 32 tiles */
            int8_t *vt = dn->vt8[i] = malloc(D * F);
            if (!(ok = vt != NULL))
                break;
            for (int64_t j0 = 0; j0 < F; j0 += 32)
                for (int64_t d0 = 0; d0 < D; d0 += 32)
                    for (int64_t j = j0; j < j0 + 32 && j < F; j++)
                        for (int64_t d = d0; d < d0 + 32 && d < D; d++)
                            vt[d * F + j] = b->kv[j * 2 * D + D + d];
            continue;
        }
        uint8_t *vt = dn->vt4[i] = calloc(D * (F / 2), 1);
        uint16_t *st = dn->st4[i] = malloc(G * F * sizeof(uint16_t));
        if (!(ok = vt && st))
            break;
        for (int64_t j = 0; j < F; j++) {
            const uint8_t *col = b->kv4 + j * D + D / 2;         /* value column j: (D / 2) codes */
            for (int64_t d = 0; d < D; d++)
                put4(vt + d * (F / 2), j, get4(col, d));
            for (int64_t g = 0; g < G; g++)
                st[g * F + j] = b->kv4s[j * 2 * G + G + g];
        }
    }
    dn->A = malloc(TB * F * sizeof(float));
    dn->Xa = malloc(TB * F);
    dn->xsa = malloc(TB * GF * sizeof(float));
    dn->out = malloc(TB * D * sizeof(float));
    ok = ok && dn->A && dn->Xa && dn->xsa && dn->out;
    for (int i = 0; ok && q4 && i < nk_pool_size(m->pool); i++) {
        dn->t[i].P = malloc(TB * F * sizeof(float));
        dn->t[i].X = malloc(TB * F);
        dn->t[i].xs = malloc(TB * GF * sizeof(float));
        dn->t[i].init = malloc(TB * NK_INIT(GF) * sizeof(int32_t));
        ok = dn->t[i].P && dn->t[i].X && dn->t[i].xs && dn->t[i].init;
    }
    if (!ok) {
        nk_dense_free(m);
        return -1;
    }
    return 0;
}

/* For the tests (tests/test_native_dense.py): the dense FFN core of layer i on xk (T, D), T <= TB, on a
 * model in dense mode: A (T, F) its activations (int8 file: relu(k s_k)^2 s_v; int4: relu(k)^2) and
 * y (T, D) its output. Returns 0, or -1 (not dense mode, bad layer or T). Uses the model's scratch. */
int nk_test_dense_ffn(void *mp, int64_t i, const float *xk, int64_t T, float *A, float *y) {
    nk_model *m = (nk_model *)mp;
    if (!m->dense || i < 0 || i >= m->L || T < 1 || T > TB)
        return -1;
    const nk_layer *b = &m->layers[i];
    int64_t D = m->D, st[2] = {0, 0};
    if (b->kv4)
        nk_quantize_rows4(m, xk, T, D);
    else
        nk_quantize_rows(m, xk, T, D);
    memset(m->x, 0, T * D * sizeof(float));
    nk_ffn_dense_rows(m, b, T, st);
    memcpy(y, m->x, T * D * sizeof(float));
    memcpy(A, m->dense->A, T * m->F * sizeof(float));
    return 0;
}

/* Given sets (with_sets) in decode as well as prefill: every key row, then the value rows of the set's
 * neurons with relu(k) > 0 (on: 1), or only the set's key rows (0, the default): tools/bench.py --shape's
 * "exact" row, on random weights whose own active sets (~50%) are not a trained model's. */
void nk_model_all_keys(void *mp, int on) { ((nk_model *)mp)->sets_all_keys = on; }
