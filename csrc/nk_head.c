/* The rescored head (NativeRWKV7(..., head_rescore=K), backends/native_head.py).
 *
 * Why: at the reference model's shapes the int8 head (V 16384 x D 512, 8.4 MB) is a quarter of what a
 * sparse int8 decode step reads, and an int4 head alone costs KLD ~0.015 against fp16 (too much). But
 * nearly all of the int4 head's error that matters sits in the few tokens that carry the probability
 * mass. So: the logits of all V tokens from a 4-bit copy of the int8 head (half its bytes), then the
 * K tokens with the largest 4-bit logits recomputed from their int8 rows (K x D bytes): per token
 * V D / 2 + K D bytes instead of V D, and the top tokens get exactly the int8 head's logits.
 *
 * Which K: exactly the K largest 4-bit logits: tau = the K-th largest value; the rows with z > tau,
 * then the rows with z == tau in index order until there are K (backends/native_head.py's numpy
 * reference picks the same rows, ties included).
 * How tau is found without sorting V floats: a strided sample (every SAMPLE-th logit) gives a
 * threshold tau0 that at least K logits pass in practice (its (K / SAMPLE + SLACK)-th largest); the
 * logits >= tau0 (in index order) are the candidates, and tau is the K-th largest of those. If fewer
 * than K pass, tau0 is lowered to -inf (all V are candidates). Either way the candidates hold every
 * logit >= tau, so the result is the exact top K.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "nk_model.h"
#include "nk_simd.h"

#define SAMPLE 8
#define SLACK 16

/* the value of rank r (0: the largest) among a[0..n), by quickselect (reorders a) */
static float kth_largest(float *a, int64_t n, int64_t r) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        float p = a[lo + (hi - lo) / 2];
        int64_t i = lo, j = hi;
        while (i <= j) {                       /* descending: >= p on the left */
            while (a[i] > p)
                i++;
            while (a[j] < p)
                j--;
            if (i <= j) {
                float t = a[i];
                a[i] = a[j], a[j] = t;
                i++, j--;
            }
        }
        if (r <= j)
            hi = j;
        else if (r >= i)
            lo = i;
        else
            return a[r];
    }
    return a[r];
}

/* The K rows of the candidates whose logit is >= tau (the K-th largest): those above tau first, then the
 * ties at tau in index order, so both selects return the same rows. Returns how many (K). */
static int64_t emit_rows(const float *z, const int32_t *cand, int64_t nc, float tau, int64_t K, int32_t *idx) {
    int64_t n = 0;
    for (int64_t c = 0; c < nc; c++)            /* above tau first, */
        if (z[cand[c]] > tau)
            idx[n++] = cand[c];
    for (int64_t c = 0; c < nc && n < K; c++)   /* then the ties at tau in index order */
        if (z[cand[c]] == tau)
            idx[n++] = cand[c];
    return n;
}

/* idx (K,) = the rows of z (V,) with the K largest values (see the header); scratch (V,) floats,
 * cand (V,) ints. Returns K (or V if V < K). */
static int64_t top_rows(const float *z, int64_t V, int64_t K, float *scratch, int32_t *cand, int32_t *idx) {
    if (K >= V) {
        for (int64_t j = 0; j < V; j++)
            idx[j] = (int32_t)j;
        return V;
    }
    float tau0 = -INFINITY;
    int64_t ns = V / SAMPLE, rank = K / SAMPLE + SLACK;
    if (rank < ns) {
        for (int64_t s = 0; s < ns; s++)
            scratch[s] = z[s * SAMPLE];
        tau0 = kth_largest(scratch, ns, rank);
    }
    int64_t nc = 0;
    for (int64_t j = 0; j < V; j++)
        if (z[j] >= tau0)
            cand[nc++] = (int32_t)j;
    if (nc < K) {                               /* the sample misled: every row is a candidate */
        nc = 0;
        for (int64_t j = 0; j < V; j++)
            cand[nc++] = (int32_t)j;
    }
    for (int64_t c = 0; c < nc; c++)
        scratch[c] = z[cand[c]];
    float tau = kth_largest(scratch, nc, K - 1);
    return emit_rows(z, cand, nc, tau, K, idx);
}

#ifdef NK_X86
/* The same rows on 16 lanes (AVX-512; perf: the scalar select was ~4% of a sparse int4 step with K
 * 1024, its quickselects branching on random floats). The value of rank r is found as a key: floats
 * map to uint32 keys in the same order (-0 just below +0, which the float compares after it treat as
 * equal, so the rows picked are the same), and the largest key t with count(key >= t) > r is built
 * bit by bit, 32 counting passes over the n keys (n ~ 2048 or ~K). Candidates are compacted with
 * vpcompressd into a register, then stored (no compress-to-memory: slow on some cores). */
VNNI static inline __m512i key16(__m512 z) {
    __m512i u = _mm512_castps_si512(z);
    __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
    return _mm512_mask_xor_epi32(_mm512_or_si512(u, _mm512_set1_epi32((int)0x80000000)), neg, u,
                                 _mm512_set1_epi32(-1));
}

/* the value of rank r (0: the largest) of keys k[0..n) (n % 16 == 0, padded with key 0 = below all) */
VNNI static float kth_key(const uint32_t *k, int64_t n, int64_t r) {
    uint32_t t = 0;
    for (int bit = 31; bit >= 0; bit--) {
        uint32_t c = t | (1u << bit);
        __m512i cv = _mm512_set1_epi32((int)c);
        int64_t cnt = 0;
        for (int64_t i = 0; i < n; i += 16)
            cnt += __builtin_popcount(_mm512_cmpge_epu32_mask(_mm512_loadu_si512((const void *)(k + i)), cv));
        if (cnt > r)
            t = c;
    }
    uint32_t u = (t & 0x80000000u) ? (t & 0x7fffffffu) : ~t;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* top_rows for V % 16 == 0 on 16 lanes (keys: the (V,) scratch as uint32; cand (V,) ints) */
VNNI static int64_t top_rows_512(const float *z, int64_t V, int64_t K, float *scratch, int32_t *cand, int32_t *idx) {
    uint32_t *key = (uint32_t *)scratch;
    const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float tau0 = -INFINITY;
    int64_t ns = V / SAMPLE, rank = K / SAMPLE + SLACK;
    if (rank < ns) {
        const __m512i every = _mm512_mullo_epi32(step, _mm512_set1_epi32(SAMPLE));
        int64_t s = 0;
        for (; s + 16 <= ns; s += 16)
            _mm512_storeu_si512((void *)(key + s), key16(_mm512_i32gather_ps(every, z + s * SAMPLE, 4)));
        for (; s < ns; s++) {                    /* the sample's tail, then padding */
            uint32_t u;
            memcpy(&u, z + s * SAMPLE, 4);
            key[s] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        }
        for (; s % 16; s++)
            key[s] = 0;
        tau0 = kth_key(key, s, rank);
    }
    int64_t nc = 0;
    for (int pass = 0; pass < 2 && nc < K; pass++) {   /* pass 1: the sample misled, every row */
        __m512 t0 = _mm512_set1_ps(pass ? -INFINITY : tau0);
        nc = 0;
        for (int64_t j = 0; j < V; j += 16) {
            __m512 zv = _mm512_loadu_ps(z + j);
            __mmask16 m = pass ? (__mmask16)0xffff : _mm512_cmp_ps_mask(zv, t0, _CMP_GE_OQ);
            if (!m)
                continue;
            int c = __builtin_popcount(m);
            __mmask16 lo = (__mmask16)((1u << c) - 1);
            _mm512_mask_storeu_epi32(cand + nc, lo, _mm512_maskz_compress_epi32(m, _mm512_add_epi32(step, _mm512_set1_epi32((int)j))));
            _mm512_mask_storeu_epi32(key + nc, lo, _mm512_maskz_compress_epi32(m, key16(zv)));
            nc += c;
        }
    }
    int64_t np = (nc + 15) / 16 * 16;
    for (int64_t c = nc; c < np; c++)
        key[c] = 0;
    float tau = kth_key(key, np, K - 1);
    return emit_rows(z, cand, nc, tau, K, idx);
}
#endif

/* out (T, ldy) holds the int4 head's logits of the T rows of xa (T, D); the top head_k of each row
 * are overwritten with the int8 rows' logits (the activation rounded as every int8 mat-vec rounds it) */
void nk_head_rescore(nk_model *m, const float *xa, int64_t T, float *out, int64_t ldy) {
    int64_t D = m->D, G = D / NK_GS;
    nk_quantize_rows(m, xa, T, D);
    for (int64_t t = 0; t < T; t++) {
        float *z = out + t * ldy;
        int64_t K;
#ifdef NK_X86
        if (m->k->level == 2 && m->V % 16 == 0 && m->head_k < m->V)
            K = top_rows_512(z, m->V, m->head_k, m->hscratch, m->hcand, m->hidx);
        else
#endif
            K = top_rows(z, m->V, m->head_k, m->hscratch, m->hcand, m->hidx);
        m->k->dots(m->head, D, m->hidx, K, D, m->Xq + t * D, m->xs + t * G, 1, m->hval, K);
        for (int64_t p = 0; p < K; p++)
            z[m->hidx[p]] = m->hval[p] * m->head_s[m->hidx[p]];
    }
}

/* ---- for the tests (tests/test_native_head.py): idx (K,) = the rows of z (V,) top_rows picks, by the
 * 16-lane select (fast = 1; -1 where it is not built, the CPU lacks AVX-512 or V % 16) or the C one;
 * returns the count ------------------------------------------------------------------------------- */
int64_t nk_test_top_rows(int fast, const float *z, int64_t V, int64_t K, int32_t *idx) {
    float *scratch = malloc(V * sizeof(float));
    int32_t *cand = malloc(V * sizeof(int32_t));
    int64_t n = -1;
    if (!fast)
        n = top_rows(z, V, K, scratch, cand, idx);
#ifdef NK_X86
    else if (nk_cpu_level() >= 2 && V % 16 == 0 && K < V)
        n = top_rows_512(z, V, K, scratch, cand, idx);
#endif
    free(scratch), free(cand);
    return n;
}
