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
#include <string.h>

#include "nk_model.h"

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
    int64_t n = 0;
    for (int64_t c = 0; c < nc; c++)            /* above tau first, */
        if (z[cand[c]] > tau)
            idx[n++] = cand[c];
    for (int64_t c = 0; c < nc && n < K; c++)   /* then the ties at tau in index order */
        if (z[cand[c]] == tau)
            idx[n++] = cand[c];
    return n;
}

/* out (T, ldy) holds the int4 head's logits of the T rows of xa (T, D); the top head_k of each row
 * are overwritten with the int8 rows' logits (the activation rounded as every int8 mat-vec rounds it) */
void nk_head_rescore(nk_model *m, const float *xa, int64_t T, float *out, int64_t ldy) {
    int64_t D = m->D, G = D / NK_GS;
    nk_quantize_rows(m, xa, T, D);
    for (int64_t t = 0; t < T; t++) {
        float *z = out + t * ldy;
        int64_t K = top_rows(z, m->V, m->head_k, m->hscratch, m->hcand, m->hidx);
        m->k->dots(m->head, D, m->hidx, K, D, m->Xq + t * D, m->xs + t * G, 1, m->hval, K);
        for (int64_t p = 0; p < K; p++)
            z[m->hidx[p]] = m->hval[p] * m->head_s[m->hidx[p]];
    }
}
