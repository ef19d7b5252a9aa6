/* RWKV-7 forward in C over T tokens in ONE call: embedding, all layers, head (math of
 * rwkv_edge/models/v7.py; the decode step is T = 1). Weights are pointers into the mmap of an int8
 * .rwkve file (rwkv_edge/modelfile.py): int8 linear rows + per-row scale, LoRA int8 (in, out) +
 * per-column scale, neuron-bundled FFN kv (F, 2, D) int8 + kv_scale (F, 2), emb float16.
 *
 * Prefill runs in chunks of TB tokens, layer by layer: every weight row is loaded once per chunk and
 * dotted with all TB int8-rounded activations while it sits in L1 (r/k/v/o, FFN keys, head); the
 * wkv recurrence and the LoRAs go token by token. Scratch is allocated once per model (~TB * D * 30
 * floats), so memory does not grow with the prompt.
 *
 * FFN: nk_ffn.c (dense, or sparse on the n-bit W_k predictor's sets).
 * Threads (nk_pool.c) split rows of the mat-vecs, predictor rows and FFN neurons (each thread adds
 * into its own output row; the rows are summed after).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>


#include "nk_model.h"


/* ---- small helpers ------------------------------------------------------------------------------ */
/* The sums in 8 lanes (lane l: columns d % 8 == l, D % 8 == 0), added in a fixed tree: 8 independent
 * chains that the compiler keeps in vector registers, where one chain waited ~3 cycles per add on
 * the one before (D 2048: the decode's norms and token shifts were 0.4 ms of a 1.5B-shape step, serial
 * between the pool calls). Decode and prefill (nk_prefill_elem.c) both call this: the same floats. */
static inline float sum8(const float *s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

void nk_layer_norm(const float *x, const float *w, const float *b, float eps, int64_t D, float *out) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0}, q[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t d = 0; d < D; d += 8)
        for (int l = 0; l < 8; l++)
            s[l] += x[d + l];
    float mu = sum8(s) / (float)D;
    for (int64_t d = 0; d < D; d += 8)
        for (int l = 0; l < 8; l++)
            q[l] += (x[d + l] - mu) * (x[d + l] - mu);
    float var = sum8(q);
    float inv = 1.0f / sqrtf(var / (float)D + eps);
    for (int64_t d = 0; d < D; d++)
        out[d] = (x[d] - mu) * inv * w[d] + b[d];
}

static inline float sigmoidf(float z) { return 1.0f / (1.0f + expf(-z)); }

/* ---- y (T, O) = x (T, I) @ (W * s).T, int8 rows split over threads ------------------------------ */
typedef struct {
    const nk_model *m;
    const int8_t *W;           /* int8 rows (I,) + per-row scale s, or NULL: */
    const float *s;
    const uint8_t *W4;         /* int4 rows (I / 2,) + group scales s4 (I / 32,) float16 */
    const uint16_t *s4;
    int64_t I, T, ldy;
    float *y;
} lin_ctx;

static void lin_task(void *c, int tid, int64_t lo, int64_t hi) {
    lin_ctx *L = (lin_ctx *)c;
    (void)tid;
    if (!L->W) {               /* int4: the scales are inside the dot (per group) */
        int64_t G = L->I / NK_GS;
        L->m->k->dots4(L->W4 + lo * (L->I / 2), L->s4 + lo * G, L->I / 2, G, NULL, hi - lo, L->I, L->m->X4, L->m->xs,
                       L->m->init, L->T, L->y + lo, L->ldy);
        return;
    }
    L->m->k->dots(L->W + lo * L->I, L->I, NULL, hi - lo, L->I, L->m->Xq, L->m->xs, L->T, L->y + lo, L->ldy);
    for (int64_t t = 0; t < L->T; t++)
        for (int64_t r = lo; r < hi; r++)
            L->y[t * L->ldy + r] *= L->s[r];
}

/* the decode's token too: the same rounding, 8 lanes at a time (the scalar loop's lrintf per value was
 * ~3% of a 1-thread sparse int4 step at 58M, five roundings a layer) */
void nk_quantize_rows(nk_model *m, const float *x, int64_t T, int64_t I) {
    nk_quantize_many(m, x, T, I, m->Xq, m->xs);
}

void nk_quantize_rows4(nk_model *m, const float *x, int64_t T, int64_t I) {
    nk_quantize4_many(m, x, T, I, m->X4, m->xs, m->init);
}

/* y (T, O) = x (T, I) @ W.T for an int8 (W, s) or, with W NULL, an int4 (W4, s4) matrix (O, I) */
static void linear(nk_model *m, const int8_t *W, const float *s, const uint8_t *W4, const uint16_t *s4, int64_t O,
                   int64_t I, const float *x, int64_t T, float *y, int64_t ldy) {
    NK_SPAN0();
    if (W)
        nk_quantize_rows(m, x, T, I);
    else
        nk_quantize_rows4(m, x, T, I);
    NK_SPAN(10);
    lin_ctx c = {m, W, s, W4, s4, I, T, ldy, y};
    nk_pool_run(m->pool, lin_task, &c, O);
}

/* ---- the decode's LoRA pairs, one task each, the largest first (gate, decay, a, value) ----------- */
typedef struct {
    const nk_model *m;
    const nk_layer *b;
    int64_t t;
    int first;
} lora_ctx;

static void lora_task(void *c, int tid, int64_t lo, int64_t hi) {
    lora_ctx *lc = (lora_ctx *)c;
    const nk_model *m = lc->m;
    const nk_layer *b = lc->b;
    int64_t D = m->D, t = lc->t;
    (void)tid;
    for (int64_t i = lo; i < hi; i++) {
        float *h = m->lt[i];
        switch (i) {
        case 0:                                                              /* output gate */
            nk_lora_apply(m, b, 4, m->mix[5] + t * D, h, 5);
            for (int64_t j = 0; j < m->dg; j++)
                h[j] = sigmoidf(h[j]);
            nk_lora_apply(m, b, 5, h, m->g, -1);
            break;
        case 1:                                                              /* decay */
            nk_lora_apply(m, b, 0, m->mix[1] + t * D, h, 1);
            for (int64_t j = 0; j < m->dw; j++)
                h[j] = tanhf(h[j]);
            nk_lora_apply(m, b, 1, h, m->w, -1);
            break;
        case 2:                                                              /* in-context learning rate */
            nk_lora_apply(m, b, 2, m->mix[4] + t * D, h, 3);
            nk_lora_apply(m, b, 3, h, m->a, -1);
            break;
        default:                                                             /* value residual gate */
            nk_lora_apply(m, b, 6, m->mix[3] + t * D, h, 7);
            nk_lora_apply(m, b, 7, h, m->gv, -1);
        }
    }
}

/* head h's wkv output yh (N,) in place: group norm (eps 64e-5), the bonus (r . k * r_k) v, the gate g;
 * r, k, v, g are the token's (D,) vectors (one function for the steps and the prefill: the same floats) */
void nk_head_out(const nk_layer *b, int64_t N, int64_t h, const float *r, const float *k, const float *v,
                 const float *g, float *yh) {
    float mu = 0.0f, var = 0.0f, bonus = 0.0f;
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

/* ---- the decode's time-mix after the LoRAs, heads [lo, hi) per task: every step below is per
 * channel or per head (value residual, decay, kk normalised per head, wkv, group norm), so the
 * heads split over threads compute the very floats of one thread (the wkv state: 16 KiB a head) */
typedef struct {
    const nk_model *m;
    const nk_layer *b;
    int64_t t;
    int first;
    float *S;
    const float *Sin;
} heads_ctx;

static void heads_task(void *c, int tid, int64_t lo, int64_t hi) {
    heads_ctx *hc = (heads_ctx *)c;
    const nk_model *m = hc->m;
    const nk_layer *b = hc->b;
    int64_t D = m->D, N = m->N, t = hc->t, d0 = lo * N, d1 = hi * N;
    float *r = m->r + t * D, *k = m->kk + t * D, *v = m->v + t * D, *y = m->y + t * D;
    float *w = m->w, *a = m->a, *g = m->g, *kn = m->nk;
    (void)tid;
    if (hc->first)
        memcpy(m->vf + t * D + d0, v + d0, (d1 - d0) * sizeof(float));
    /* the prefill's elementwise code (nk_prefill_elem.c: 16 lanes at the VNNI level, its expf glibc's
     * bit for bit): after it a holds the wkv's b (kk * a), kn its a (-kk) */
    nk_mix_heads(m, b, hc->first, lo, hi, k, v, m->vf + t * D, w, a, m->gv, kn);
    /* each head fetches the next one's state while it runs; the task with the last head the next layer's
     * first (the state arrays are (L, H, N, N): the next layer's head 0 follows; in the caller's input
     * state too) */
    int64_t nl = (b - m->layers) + 1 < m->L && hi == m->H, HNN = m->H * N * N;
    for (int64_t h = lo; h < hi; h++) {
        int nx = h + 1 < hi || nl;
        int64_t no = h + 1 < hi ? (h + 1) * N * N : HNN;        /* the next state's offset, if nx */
        nk_wkv_step(m, hc->S + h * N * N, hc->Sin + h * N * N, r + h * N, w + h * N, k + h * N, v + h * N,
                    kn + h * N, a + h * N, y + h * N, nx ? hc->Sin + no : NULL, nx ? hc->S + no : NULL);
    }
    for (int64_t h = lo; h < hi; h++)
        nk_head_out(b, N, h, r, k, v, g, y + h * N);
}

/* ---- time-mix of T tokens: x += att(ln1 x), state att_x (D,), S (H, N, N) updated --------------- */
/* S0: the state before the first token (S itself, or the caller's input state: read, not copied) */
static void time_mix(nk_model *m, const nk_layer *b, int64_t T, float *att_x, float *S, const float *S0, int first) {
    int64_t D = m->D, H = m->H;
    const float *mixw[6] = {b->x_r, b->x_w, b->x_k, b->x_v, b->x_a, b->x_g};
    NK_SPAN0();
    if (T > 1) {                                   /* prefill: over threads by token (nk_prefill.c) */
        nk_shift_prefill(m, T, b->ln1_w, b->ln1_b, att_x, mixw, m->mix, 6, 0, NULL);
    } else {
        nk_layer_norm(m->x, b->ln1_w, b->ln1_b, 1e-5f, D, m->xa);
        for (int c = 0; c < 6; c++)                /* token shift: x + (prev - x) * mix */
            for (int64_t d = 0; d < D; d++)
                m->mix[c][d] = m->xa[d] + (att_x[d] - m->xa[d]) * mixw[c][d];
    }
    memcpy(att_x, m->xa + (T - 1) * D, D * sizeof(float));
    if (T == 1)
        NK_SPAN(11);         /* the decode's norm + shift, serial */
    NK_SPAN_RESET();         /* the prefill's shift is pool call 11 */
    nk_lora_prefetch(m, b, 4);                           /* the first LoRAs (of two threads), while r/k/v stream */
    nk_lora_prefetch(m, b, 0);
    if (T == 1)
        nk_layer_vectors_prefetch(m, b, 1);
    NK_TAG(0);
    linear(m, b->Wr, b->sr, b->Wr4, b->sr4, D, D, m->mix[0], T, m->r, D);
    linear(m, b->Wk, b->sk, b->Wk4, b->sk4, D, D, m->mix[2], T, m->kk, D);
    linear(m, b->Wv, b->sv, b->Wv4, b->sv4, D, D, m->mix[3], T, m->v, D);
#ifdef NK_PROF
    double tm0 = nk_prof_now();
#endif
    if (T > 1)                                     /* a prefill chunk: LoRAs batched, wkv head-major */
        nk_att_prefill(m, b, T, S, S0, first);
    else
    for (int64_t t = 0; t < T; t++) {
        /* the four LoRA pairs (gate, decay, in-context learning rate, value residual) are independent:
         * one pool call, a pair per task (2 MiB of LoRAs per layer at 1.5B shapes; on one thread
         * they were ~10% of a 2-thread sparse step) */
        lora_ctx lc = {m, b, t, first};
        NK_TAG(7);
        nk_pool_run_items(m->pool, lora_task, &lc, first ? 3 : 4);
        heads_ctx hc = {m, b, t, first, S, t ? S : S0};
        NK_TAG(9);                                 /* the prefill's tag of its head tasks too */
        nk_pool_run(m->pool, heads_task, &hc, H);
    }
#ifdef NK_PROF
    if (T == 1)
        nk_prof_add(6, -1, nk_prof_now() - tm0, 0);
#endif
    NK_TAG(1);
    linear(m, b->Wo, b->so, b->Wo4, b->so4, D, D, m->y, T, m->o, D);
    NK_SPAN_RESET();
    for (int64_t i = 0; i < T * D; i++)
        m->x[i] += m->o[i];
    NK_SPAN(13);
}

/* ---- the public entry points (called through ctypes) ------------------------------------------- */
enum { P_EMB, P_LN0W, P_LN0B, P_LNOW, P_LNOB, P_HEAD, P_HEADS, P_HEAD4, P_HEADS4, P_NGLOBAL };

/* dims: L, D, H, N, F, V, dw, da, dg, dv, predictor bits (0: dense), predictor groups, threads, level,
 * head_k (0: the head as stored; > 0: rescored, both head.q and head q4 given)
 * glob: emb, ln0 w/b, ln_out w/b, head.q, head.scale, head q4, head s4 (NULL: int8); layers: L * sizeof(nk_layer) / sizeof(void *)
 * pointers; thr: (L,) thresholds (with a predictor). Returns NULL on a bad level or no memory. */
void *nk_model_new(const int64_t *dims, const void *const *glob, const void *const *layers, const float *thr) {
    const nk_kern *k = nk_kern_get((int)dims[13]);
    if (!k)
        return NULL;
    nk_model *m = calloc(1, sizeof *m);
    if (!m)
        return NULL;
    m->L = dims[0], m->D = dims[1], m->H = dims[2], m->N = dims[3], m->F = dims[4], m->V = dims[5];
    m->dw = dims[6], m->da = dims[7], m->dg = dims[8], m->dv = dims[9];
    m->k = k;
    m->pool = nk_pool_new((int)dims[12]);
    m->emb = glob[P_EMB], m->ln0_w = glob[P_LN0W], m->ln0_b = glob[P_LN0B];
    m->lnout_w = glob[P_LNOW], m->lnout_b = glob[P_LNOB], m->head = glob[P_HEAD], m->head_s = glob[P_HEADS];
    m->head4 = glob[P_HEAD4], m->head_s4 = glob[P_HEADS4];
    m->head_k = m->head && m->head4 && dims[14] > 0 ? dims[14] : 0;
    if (m->head_k) {
        int64_t K = m->head_k < m->V ? m->head_k : m->V;
        m->hscratch = malloc(m->V * sizeof(float)), m->hval = malloc(K * sizeof(float));
        m->hcand = malloc(m->V * sizeof(int32_t)), m->hidx = malloc(m->V * sizeof(int32_t));
    }
    m->layers = malloc(m->L * sizeof(nk_layer));
    memcpy(m->layers, layers, m->L * sizeof(nk_layer));
    int64_t D = m->D, F = m->F, G = dims[11] > 0 ? dims[11] : 1;
    if (dims[10] > 0) {
        m->pred = calloc(m->L, sizeof(nk_pred));
        for (int64_t i = 0; i < m->L; i++) {
            nk_pred *p = &m->pred[i];
            p->bits = (int32_t)dims[10], p->G = (int32_t)G, p->R = F, p->C = D, p->thr = thr[i];
            p->packed = m->layers[i].p_packed, p->scale = m->layers[i].p_scale, p->zero = m->layers[i].p_zero;
            p->blk = nk_pred_blk_new(k, p);           /* NULL where the fused select has no blocked copy */
        }
    }
    float **bufs[] = {&m->x, &m->xa, &m->mix[0], &m->mix[1], &m->mix[2], &m->mix[3], &m->mix[4], &m->mix[5],
                      &m->r, &m->kk, &m->v, &m->vf, &m->y, &m->o, &m->fx};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        *bufs[i] = malloc(TB * D * sizeof(float));
    int64_t lmax = D > F ? D : F;
    float **vecs[] = {&m->w, &m->a, &m->g, &m->nk, &m->bb, &m->gv, &m->t1};
    for (size_t i = 0; i < sizeof vecs / sizeof *vecs; i++)
        *vecs[i] = malloc(lmax * sizeof(float));
    m->lora_max = D;
    for (int i = 6; i < 10; i++)
        m->lora_max = dims[i] > m->lora_max ? dims[i] : m->lora_max;
    for (int i = 0; i < 6; i++)
        m->pre[i] = malloc(TB * m->lora_max * sizeof(float));
    for (int i = 0; i < 4; i++)
        m->lt[i] = malloc(m->lora_max * sizeof(float));
    nk_lora_pack_all(m);
    m->Xq = malloc(TB * D);
    m->X4 = malloc(TB * D);
    m->init = malloc(TB * NK_INIT(D / NK_GS) * sizeof(int32_t));
    m->xs = malloc(TB * (D / NK_GS) * sizeof(float));
    m->score = malloc(F * sizeof(float));
    m->idx = malloc(F * sizeof(int32_t));
    m->mask = malloc(TB * F);
    for (int t = 0; t <= TB; t++) {       /* m->px, then the TB of a prefill chunk */
        nk_pred_x *px = t ? &m->pxt[t - 1] : &m->px;
        px->xq = malloc(D);
        for (int k2 = 0; k2 < 4; k2++)
            px->plane[k2] = malloc(D);
        px->xs = malloc(G * sizeof(float)), px->e = malloc(G * sizeof(float)), px->xsum = malloc(G * sizeof(float));
    }
    m->npart = nk_pool_size(m->pool) > 1 ? NK_FFN_PIECES * nk_pool_size(m->pool) : 1;
    m->part = malloc(m->npart * TB * D * sizeof(float));
    for (int i = 0; i < nk_pool_size(m->pool); i++) {
        m->tls[i].keys = malloc((TB * NB > F ? TB * NB : F) * sizeof(float));
        m->tls[i].pj = malloc(F * sizeof(int32_t));
        m->tls[i].ph = malloc(F * sizeof(float));
        m->tls[i].sc = malloc(F * sizeof(float));
        m->tls[i].sel = malloc(F * sizeof(int32_t));
        m->tls[i].pjT = malloc(TB * (NB + 20) * sizeof(int32_t));
        m->tls[i].phT = malloc(TB * (NB + 20) * sizeof(float));
        m->tls[i].lnprev = malloc(D * sizeof(float));
    }
    return m;
}

void nk_model_free(void *mp) {
    nk_model *m = (nk_model *)mp;
    if (!m)
        return;
    nk_dense_free(m);
    nk_pool_free(m->pool);
    float *bufs[] = {m->x, m->xa, m->mix[0], m->mix[1], m->mix[2], m->mix[3], m->mix[4], m->mix[5], m->r, m->kk,
                     m->v, m->vf, m->y, m->o, m->fx, m->w, m->a, m->g, m->nk, m->bb, m->gv, m->t1, m->xs, m->score};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++)
        free(bufs[i]);
    for (int i = 0; i < 6; i++)
        free(m->pre[i]);
    for (int i = 0; i < 4; i++)
        free(m->lt[i]);
    free(m->Xq), free(m->X4), free(m->init), free(m->idx), free(m->mask);
    for (int t = 0; t <= TB; t++) {
        nk_pred_x *px = t ? &m->pxt[t - 1] : &m->px;
        free(px->xq), free(px->xs), free(px->e), free(px->xsum);
        for (int k = 0; k < 4; k++)
            free(px->plane[k]);
    }
    for (int i = 0; i < NK_MAXT; i++)
        free(m->tls[i].keys), free(m->tls[i].pj), free(m->tls[i].ph), free(m->tls[i].sc), free(m->tls[i].sel);
    for (int i = 0; i < NK_MAXT; i++)
        free(m->tls[i].pjT), free(m->tls[i].phT), free(m->tls[i].lnprev);
    free(m->hscratch), free(m->hval), free(m->hcand), free(m->hidx);
    free(m->lpbuf), free(m->lp), free(m->part);
    for (int64_t i = 0; m->pred && i < m->L; i++)
        free((void *)m->pred[i].blk);
    free(m->layers), free(m->pred), free(m);
}

/* Run tokens (T,) from the state (att_x (L, D), wkv (L, H, N, N), ffn_x (L, D), updated in place).
 * logits: (V,) for the last token, or (T, V) with full. stats: (L, 2) int64 accumulated (neurons
 * whose key row was read, value columns read). rec: NULL or (T, L, F) uint8 zeroed: the sparse
 * FFN marks each token's predicted neurons there. gidx/goff: NULL, or the sets to run instead of a
 * predictor's (distinct neuron ids; token t, layer i: gidx[goff[t L + i] : goff[t L + i + 1]]).
 * wkv_in: NULL (wkv updated in place) or the input wkv state, which the first token's wkv step reads
 * (1.5 MiB at 58M: the memcpy it replaced was ~2.5% of a decode step).
 * Returns 0. */
int nk_forward(void *mp, const int32_t *tokens, int64_t T, float *att_x, float *wkv, float *ffn_x,
               float *logits, int64_t full, int64_t *stats, uint8_t *rec, const int32_t *gidx, const int64_t *goff,
               const float *wkv_in) {
    nk_model *m = (nk_model *)mp;
#ifdef NK_PROF
    double f0 = nk_prof_now();
#endif
    m->rec = rec, m->gidx = gidx, m->goff = goff;
    int64_t D = m->D, HNN = m->H * m->N * m->N;
    for (int64_t c0 = 0; c0 < T; c0 += TB) {
        int64_t n = T - c0 < TB ? T - c0 : TB;
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *e = m->emb + (int64_t)tokens[c0 + t] * D;
            for (int64_t d = 0; d < D; d++)
                m->xa[t * D + d] = nk_h2f(e[d]);
            nk_layer_norm(m->xa + t * D, m->ln0_w, m->ln0_b, 1e-5f, D, m->x + t * D);
        }
        m->rec_t0 = c0;
        for (int64_t i = 0; i < m->L; i++) {
            m->rec_layer = i;
            const float *S0 = wkv_in && c0 == 0 ? wkv_in + i * HNN : wkv + i * HNN;
            time_mix(m, &m->layers[i], n, att_x + i * D, wkv + i * HNN, S0, i == 0);
            nk_channel_mix(m, &m->layers[i], m->pred ? &m->pred[i] : NULL, n, ffn_x + i * D, stats + 2 * i);
        }
        int64_t h0 = full ? 0 : n - 1;                 /* tokens of this chunk that need logits */
        if (!full && c0 + n < T)
            continue;
        for (int64_t t = h0; t < n; t++)
            nk_layer_norm(m->x + t * D, m->lnout_w, m->lnout_b, 1e-5f, D, m->xa + (t - h0) * D);
        float *out = full ? logits + c0 * m->V : logits;
        NK_TAG(4);
        if (m->head_k > 0) {                            /* the rescored head: int4 all, int8 the top */
            linear(m, NULL, NULL, m->head4, m->head_s4, m->V, D, m->xa, n - h0, out, m->V);
            nk_head_rescore(m, m->xa, n - h0, out, m->V);
        } else
            linear(m, m->head, m->head_s, m->head4, m->head_s4, m->V, D, m->xa, n - h0, out, m->V);
    }
#ifdef NK_PROF
    nk_prof_add(5, -1, nk_prof_now() - f0, 0);
#endif
    return 0;
}

const char *nk_level_name(int level) {
    const nk_kern *k = nk_kern_get(level);
    return k ? k->name : "";
}

int nk_best_level(void) { return nk_cpu_level(); }

/* ---- single kernels, for the tests (tests/test_native.py checks them against numpy) ------------- */
/* y (T, n) = rows of W (n, I) . x (T, I) rounded to int8 per NK_GS, unscaled; T <= 64 */
int nk_test_dots(int level, const int8_t *W, int64_t n, int64_t I, const float *x, int64_t T, float *y) {
    const nk_kern *k = nk_kern_get(level);
    if (!k || T > 64 || I % NK_GS)
        return -1;
    int8_t *X = malloc(T * I);
    float *xs = malloc(T * (I / NK_GS) * sizeof(float));
    for (int64_t t = 0; t < T; t++)
        nk_quantize(x + t * I, I, X + t * I, xs + t * (I / NK_GS));
    k->dots(W, I, NULL, n, I, X, xs, T, y, n);
    free(X), free(xs);
    return 0;
}

/* score (R,) of a predictor (see nk_pred) for x (C,) */
int nk_test_pred(int level, int64_t bits, int64_t G, int64_t R, int64_t C, const uint8_t *packed,
                 const uint16_t *scale, const uint16_t *zero, const float *x, float *score) {
    const nk_kern *k = nk_kern_get(level);
    if (!k)
        return -1;
    nk_pred p = {(int32_t)bits, (int32_t)G, R, C, packed, scale, zero, 0.0f, NULL};
    nk_pred_x px;
    px.xq = malloc(C);
    for (int i = 0; i < 4; i++)
        px.plane[i] = malloc(C);
    px.xs = malloc(G * sizeof(float)), px.e = malloc(G * sizeof(float)), px.xsum = malloc(G * sizeof(float));
    nk_pred_prep_k(k, &p, x, &px);
    k->pred(&p, &px, NULL, 0, R, score);
    free(px.xq), free(px.xs), free(px.e), free(px.xsum);
    for (int i = 0; i < 4; i++)
        free(px.plane[i]);
    return 0;
}
