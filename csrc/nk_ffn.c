/* FFN of the native backend (see nk_rwkv7.c for the whole forward).
 *
 * Dense ("exact"): every neuron's key row (int8 dots, TB tokens per row load in prefill), then the value
 * column of each neuron with relu(k)^2 > 0 (the same sum as reading all of them). The every-row dense
 * FFN (`ffn="dense"`: value rows as activation-rounded dots) is nk_dense.c.
 * Sparse: the layer's n-bit predictor scores all F neurons (nk_pred.c; with AVX-512 VNNI one fused
 * pass: scores, threshold and compaction), the neurons with score >= thr form the set; decode reads
 * only their key rows, then the value columns of the active ones (int8 at the VNNI level: one pass,
 * key dot then the neuron's value column fetched, nk_ffn_set_vnni; the same floats). Prefill runs the
 * dense key pass over a chunk (each key row read once for all its tokens) and asks the predictor only
 * about the active neurons (relu(k) > 0): the same sums as the steps. Given sets (replayed,
 * tools/bench.py --shape) mask the dense pass the same way.
 * Threads split neurons in a fixed split (pieces, a function of the neuron count and the thread count
 * only): each piece adds into its own output rows, summed after in piece order, so N threads give the
 * same floats every run whichever thread runs which piece (per-thread outputs, in the order each
 * thread claimed its chunks, varied at ~3e-7 and flipped an int8 rounding about 1 run in 25).
 * Weights: int8 (kv (F, 2, D) + kv_scale (F, 2)) or int4 (kv4 (F, 2, D / 2) + group scales kv4s
 * (F, 2, D / 32), nk_q4.c): the helpers below pick the kernels; int4 has no per-neuron scales.
 */
#include <stdatomic.h>
#include <string.h>

#include "nk_model.h"
#include "nk_simd.h"

/* ---- FFN ----------------------------------------------------------------------------------------- */
typedef struct ffn_ctx {
    nk_model *m;
    const nk_layer *b;
    int64_t T;                 /* tokens (dense); sparse runs one token, t */
    int64_t t;
    const uint8_t *mask;       /* NULL, or (T, F): dense keys, but only these neurons' values (prefill) */
    const nk_pred *pred;       /* NULL, or prefill: dense keys, values of the active neurons it keeps */
    void (*rows)(struct ffn_ctx *f, int tid, int64_t lo, int64_t hi, float *out);   /* a piece's neurons */
    int64_t n, cs, rows_out;   /* neurons [0, n) in pieces of cs; the output rows of a piece (T or 1) */
} ffn_ctx;

#ifndef NK_WIDE_DECODE
#define NK_WIDE_DECODE 1   /* the decode's value columns on the 512-bit axpy too (the same floats; dense FFN
                              * at 1.5B shapes, 1 thread: 41.8 -> 37.5 ms a token, NK_PROF build); 0: 256-bit */
#endif
#ifndef NK_FUSED_SET
#define NK_FUSED_SET 1   /* int8 decode sets: keys and values in one pass (nk_ffn_set_vnni) */
#endif
#ifndef VPF
#define VPF 2          /* value columns: passes of four fetched ahead */
#endif
#ifndef VPF4
#define VPF4 4         /* the same for int4 columns */
#endif
/* out (D,) += h_j V[:, j] for the n neurons pj/ph, four per pass over out */
static void value_columns(const nk_model *m, const nk_layer *b, const int32_t *pj, const float *ph, int64_t n,
                          float *out, int wide) {
    int64_t D = m->D, G = D / NK_GS;
    void (*ax)(float *, int64_t, const int8_t *const *, const float *) = m->k->axpy4;
    void (*axq)(float *, int64_t, const uint8_t *const *, const uint16_t *const *, const float *) = m->k->axpy4q;
#ifdef NK_X86
    if (wide && m->k->level == 2 && D % NK_GS == 0)   /* prefill: the 512-bit twins (same floats) */
        ax = nk_axpy4_512, axq = nk_axpy4q_512;
#else
    (void)wide;
#endif
#if defined(__GNUC__) || defined(__clang__)
    if (!b->kv4)               /* the int8 columns of the first VPF passes (the loop fetches from there on) */
        for (int64_t p = 0; p < 4 * VPF && p < n; p++)
            for (int64_t l = 0; l < D; l += 64)
                __builtin_prefetch(b->kv + (int64_t)pj[p] * 2 * D + D + l);
    else                       /* the int4 columns of the first two passes, likewise */
        for (int64_t p = 0; p < 4 * VPF4 && p < n; p++) {
            for (int64_t l = 0; l < D / 2; l += 64)
                __builtin_prefetch(b->kv4 + (int64_t)pj[p] * D + D / 2 + l);
            __builtin_prefetch(b->kv4s + (int64_t)pj[p] * 2 * G + G);
        }
#endif
    for (int64_t q = 0; q < n; q += 4) {
        const int8_t *v[4];
        const uint8_t *v4[4];
        const uint16_t *s4[4];
        float h[4];
        for (int k = 0; k < 4; k++) {
            int64_t j = pj[q + k < n ? q + k : q];
            h[k] = q + k < n ? ph[q + k] : 0.0f;
            if (b->kv4)
                v4[k] = b->kv4 + j * D + D / 2, s4[k] = b->kv4s + j * 2 * G + G;
            else
                v[k] = b->kv + j * 2 * D + D;
        }
        if (b->kv4) {
#if defined(__GNUC__) || defined(__clang__)
            /* the columns two passes ahead (scattered neurons: D / 2 code bytes + D / 16 scale bytes each) */
            for (int64_t p = q + 4 * VPF4; p < q + 4 * VPF4 + 4 && p < n; p++) {
                const uint8_t *c = b->kv4 + (int64_t)pj[p] * D + D / 2;
                for (int64_t l = 0; l < D / 2; l += 64)
                    __builtin_prefetch(c + l);
                __builtin_prefetch(b->kv4s + (int64_t)pj[p] * 2 * G + G);
            }
#endif
            axq(out, D, v4, s4, h);
        } else {
#if defined(__GNUC__) || defined(__clang__)
            /* the int8 columns VPF passes ahead: scattered D-byte rows that the hardware prefetcher
             * meets one short stream at a time (perf: the sparse FFN read 9 GB/s without this) */
            for (int64_t p = q + 4 * VPF; p < q + 4 * VPF + 4 && p < n; p++) {
                const int8_t *c = b->kv + (int64_t)pj[p] * 2 * D + D;
                for (int64_t l = 0; l < D; l += 64)
                    __builtin_prefetch(c + l);
            }
#endif
            ax(out, D, v, h);
        }
    }
}

/* y[t * ldy + p] (t < T, p < n) = key dots of neuron idx[p] (idx NULL: j0 + p) with the rounded
 * activations of tokens t0 + t; int8 still to be multiplied by kscale */
static void key_dots(const nk_model *m, const nk_layer *b, const int32_t *idx, int64_t j0, int64_t n, int64_t t0,
                     int64_t T, float *y, int64_t ldy) {
    int64_t D = m->D, G = D / NK_GS;
    if (b->kv4)
        m->k->dots4(b->kv4 + j0 * D, b->kv4s + j0 * 2 * G, D, 2 * G, idx, n, D, m->X4 + t0 * D, m->xs + t0 * G,
                    m->init + t0 * NK_INIT(G), T, y, ldy);
    else
        m->k->dots(b->kv + j0 * 2 * D, 2 * D, idx, n, D, m->Xq + t0 * D, m->xs + t0 * G, T, y, ldy);
}

/* the per-neuron scales of the key row and value column (int8; int4 keeps its scales per group) */
static inline float kscale(const nk_layer *b, int64_t j) { return b->kv4 ? 1.0f : b->kv_scale[2 * j]; }
static inline float vscale(const nk_layer *b, int64_t j) { return b->kv4 ? 1.0f : b->kv_scale[2 * j + 1]; }

/* neurons [lo, hi) of all T tokens, added into out (T, D) */
static void ffn_dense_rows(ffn_ctx *f, int tid, int64_t lo, int64_t hi, float *out) {
    nk_model *m = f->m;
    nk_tls *s = &m->tls[tid];
    int64_t D = m->D, T = f->T;
    const nk_layer *b = f->b;
    if (T == 1) {              /* decode: all key rows, then the value columns of every active neuron */
        key_dots(m, b, NULL, lo, hi - lo, 0, 1, s->keys, 0);
        int64_t n = 0;
        for (int64_t j = lo; j < hi; j++) {
            float a = s->keys[j - lo] * kscale(b, j);
            if (a > 0 && (!f->mask || f->mask[j])) {
                s->pj[n] = (int32_t)j;
                s->ph[n++] = a * a * vscale(b, j);
            }
        }
        value_columns(m, b, s->pj, s->ph, n, out, NK_WIDE_DECODE);
        s->nval += n;
        return;
    }
    /* prefill: the key rows block by block (each read once for all T tokens), then per token the active
     * neurons of the block (and the predictor's verdict on them) and their value columns while the
     * block is in cache. Each token carries its last (< 4) neurons over to the next block, so its value
     * columns go in the same four-column groups as the step's list (one list per block left ~2 of
     * the 4 columns of a group empty at density 0.04) */
    const int64_t cap = NB + 20;          /* <= 3 carried + NB + 16 of slack for nk_active_512 */
    int64_t *cnt = s->cnt;
    for (int64_t t = 0; t < T; t++)
        cnt[t] = 0;
    for (int64_t j0 = lo; j0 < hi; j0 += NB) {
        int64_t nb = hi - j0 < NB ? hi - j0 : NB;
        NK_BUSY0();
        key_dots(m, b, NULL, j0, nb, 0, T, s->keys, NB);
        NK_BUSY(14, tid);
#ifdef NK_X86
        int fast = !f->mask && nb % 16 == 0 && m->k->level == 2;
#else
        int fast = 0;
#endif
        for (int64_t t = 0; t < T; t++) {
            int32_t *pj = s->pjT + t * cap;
            float *ph = s->phT + t * cap;
            int64_t c0 = cnt[t], n = c0;       /* pj[0 : c0]: carried from the blocks before */
            if (fast)
                n += nk_active_512(s->keys + t * NB, b->kv4 ? NULL : b->kv_scale + 2 * j0, j0, nb, pj + n, ph + n);
            else
            for (int64_t p = 0; p < nb; p++) {
                int64_t j = j0 + p;
                float a = s->keys[t * NB + p] * kscale(b, j);
                if (a > 0 && (!f->mask || f->mask[t * m->F + j])) {
                    pj[n] = (int32_t)j;
                    ph[n++] = a * a * vscale(b, j);
                }
            }
            if (f->pred && n > c0) {   /* the predictor's verdict, asked only where it matters */
                int64_t k = nk_pred_select(m->k, f->pred, &m->pxt[t], pj + c0, 0, n - c0, s->sel, s->sc);
                for (int64_t i = 0; i < k; i++) {       /* positions ascending: in place */
                    int64_t q = c0 + s->sel[i];
                    pj[c0 + i] = pj[q], ph[c0 + i] = ph[q];
                    if (m->rec)
                        m->rec[((m->rec_t0 + t) * m->L + m->rec_layer) * m->F + pj[c0 + i]] = 1;
                }
                s->npred += k;
                k += c0;
                n = k;
            }
            s->nval += n - c0;
            NK_BUSY(15, tid);
            int64_t full = j0 + NB < hi ? n / 4 * 4 : n;          /* the last block: all of them */
            value_columns(m, b, pj, ph, full, out + t * D, 1);
            for (int64_t q = full; q < n; q++)
                pj[q - full] = pj[q], ph[q - full] = ph[q];
            cnt[t] = n - full;
            NK_BUSY(16, tid);
        }
    }
}

/* the active neurons m->idx[lo : hi) of token f->t, added into out (D,) */
static void ffn_sparse_rows(ffn_ctx *f, int tid, int64_t lo, int64_t hi, float *out) {
    nk_model *m = f->m;
    nk_tls *s = &m->tls[tid];
    const nk_layer *b = f->b;
    int64_t n = 0;
#ifdef NK_X86
    if (NK_FUSED_SET && m->k->level == 2 && !b->kv4 && m->D % NK_GS == 0 && m->D / NK_GS <= 256) {
        s->nval += nk_ffn_set_vnni(b->kv, b->kv_scale, m->idx + lo, hi - lo, m->D, m->Xq + f->t * m->D,
                                   m->xs + f->t * (m->D / NK_GS), out, s->pj, s->ph);
        return;
    }
#endif
    key_dots(m, b, m->idx + lo, 0, hi - lo, f->t, 1, s->keys, 0);
#ifdef NK_X86
    if (m->k->level == 2)          /* 16 at a time, no branch per neuron: the same floats */
        n = nk_active_idx_512(s->keys, b->kv4 ? NULL : b->kv_scale, m->idx + lo, hi - lo, s->pj, s->ph);
    else
#endif
    for (int64_t p = lo; p < hi; p++) {
        int64_t j = m->idx[p];
        float a = s->keys[p - lo] * kscale(b, j);
        if (a > 0) {
            s->pj[n] = (int32_t)j;
            s->ph[n++] = a * a * vscale(b, j);
        }
    }
    value_columns(m, b, s->pj, s->ph, n, out, NK_WIDE_DECODE);
    s->nval += n;
}

/* pieces [i0, i1) of the split: each into its own output rows, zeroed here (on the thread that runs it) */
static void ffn_pieces_task(void *c, int tid, int64_t i0, int64_t i1) {
    ffn_ctx *f = (ffn_ctx *)c;
    int64_t D = f->m->D;
    for (int64_t i = i0; i < i1; i++) {
        float *out = f->m->part + i * TB * D;
        int64_t lo = i * f->cs, hi = lo + f->cs < f->n ? lo + f->cs : f->n;
        memset(out, 0, f->rows_out * D * sizeof(float));
        f->rows(f, tid, lo, hi, out);
    }
}

typedef struct {
    nk_model *m;
    float *x;                  /* (rows, D): += the pieces' outputs */
    int64_t np;
} sum_ctx;

/* x[e] += part 0 [e], then part 1 [e], ...: piece order for every element, whichever thread sums it (a piece
 * at a time over 1024 elements: contiguous adds the compiler vectorises, x stays in L1) */
static void sum_task(void *c, int tid, int64_t lo, int64_t hi) {
    sum_ctx *sc = (sum_ctx *)c;
    float *x = sc->x;
    int64_t ld = TB * sc->m->D;
    (void)tid;
    for (int64_t e0 = lo; e0 < hi; e0 += 1024) {
        int64_t e1 = e0 + 1024 < hi ? e0 + 1024 : hi;
        for (int64_t i = 0; i < sc->np; i++) {
            const float *p = sc->m->part + i * ld;
            for (int64_t e = e0; e < e1; e++)
                x[e] += p[e];
        }
    }
}

/* x (rows, D) += the FFN of neurons [0, n) by f->rows over the pieces of the fixed split: m->npart pieces of
 * a multiple of 4 neurons (one under 16 neurons); the sum over threads where it is a prefill chunk's */
static void ffn_run(nk_model *m, ffn_ctx *f, int64_t n, int64_t rows, float *x) {
    if (n <= 0)
        return;
    int64_t np = n < 16 ? 1 : m->npart;
    f->n = n, f->rows_out = rows, f->cs = ((n + np - 1) / np + 3) / 4 * 4;
    np = (n + f->cs - 1) / f->cs;
    NK_TAG(3);
    nk_pool_run_items(m->pool, ffn_pieces_task, f, np);
    NK_SPAN0();
    sum_ctx sc = {m, x, np};
    if (rows > 1)
        nk_pool_run(m->pool, sum_task, &sc, rows * m->D);
    else
        sum_task(&sc, 0, 0, m->D);
    NK_SPAN(13);
}

#define NK_MAXREC 256            /* chunks of one pool call (nk_pool.c: about four per thread) */
typedef struct {
    nk_model *m;
    const nk_pred *p;
    int one;                   /* one thread: the single task writes straight into m->idx */
    atomic_int nrec;
    int64_t lo[NK_MAXREC], n[NK_MAXREC];
    const int32_t *sel[NK_MAXREC];
} pred_ctx;

/* rows [lo, hi): the passing ones into m->idx (one thread), or into the thread's scratch at lo, recorded */
static void pred_task(void *c, int tid, int64_t lo, int64_t hi) {
    pred_ctx *pc = (pred_ctx *)c;
    nk_model *m = pc->m;
    int32_t *out = pc->one ? m->idx + lo : m->tls[tid].sel + lo;
    int64_t n = nk_pred_select(m->k, pc->p, &m->px, NULL, lo, hi, out, m->score + lo);
    int i = atomic_fetch_add(&pc->nrec, 1);
    pc->lo[i] = lo, pc->n[i] = n, pc->sel[i] = out;
}

/* the predicted set of token xk (D,) into m->idx (sorted); returns its size. One fused pass per
 * layer where the kernel set has it (nk_pred.c): scores, threshold and compaction in registers. */
static int64_t predict(nk_model *m, const nk_pred *p, const float *xk) {
    nk_pred_prep_k(m->k, p, xk, &m->px);
    pred_ctx c = {.m = m, .p = p, .one = nk_pool_size(m->pool) == 1};
    atomic_init(&c.nrec, 0);
    NK_TAG(2);
    nk_pool_run(m->pool, pred_task, &c, p->R);
    int nr = atomic_load(&c.nrec);
    if (c.one)
        return nr ? c.n[0] : 0;
    for (int i = 1; i < nr; i++)              /* the chunks in row order (insertion sort, nr <= ~64) */
        for (int j = i; j > 0 && c.lo[j - 1] > c.lo[j]; j--) {
            int64_t tl = c.lo[j], tn = c.n[j];
            const int32_t *ts = c.sel[j];
            c.lo[j] = c.lo[j - 1], c.n[j] = c.n[j - 1], c.sel[j] = c.sel[j - 1];
            c.lo[j - 1] = tl, c.n[j - 1] = tn, c.sel[j - 1] = ts;
        }
    int64_t n = 0;
    for (int i = 0; i < nr; i++) {
        memcpy(m->idx + n, c.sel[i], c.n[i] * sizeof(int32_t));
        n += c.n[i];
    }
    return n;
}

/* the tasks count into their thread's counters: zero them first */
static void zero_counts(nk_model *m) {
    for (int i = 0; i < nk_pool_size(m->pool); i++)
        m->tls[i].nval = 0, m->tls[i].npred = 0;
}

/* token t's set (given, or predicted from m->fx) into m->idx, recorded in m->rec; returns its size */
static int64_t sparse_set(nk_model *m, const nk_pred *p, int64_t t) {
    int64_t n;
    if (m->goff) {
        if (p)                /* given sets and a predictor (bench --shape): pay the scoring, run the sets */
            predict(m, p, m->fx + t * m->D);
        const int64_t *o = m->goff + (m->rec_t0 + t) * m->L + m->rec_layer;
        n = o[1] - o[0];
        memcpy(m->idx, m->gidx + o[0], n * sizeof(int32_t));
    } else {
        n = predict(m, p, m->fx + t * m->D);
    }
    if (m->rec)                                     /* rec (T, L, F): 1 where predicted */
        for (int64_t q = 0; q < n; q++)
            m->rec[((m->rec_t0 + t) * m->L + m->rec_layer) * m->F + m->idx[q]] = 1;
    return n;
}

/* x += FFN(token-shifted ln2 x) for T tokens; stats[0] += neurons whose key row was read,
 * stats[1] += value columns read */
void nk_channel_mix(nk_model *m, const nk_layer *b, const nk_pred *p, int64_t T, float *ffn_x, int64_t *stats) {
    int64_t D = m->D, nt = nk_pool_size(m->pool);
    NK_SPAN0();
    ffn_ctx c = {m, b, T, 0, NULL, NULL, ffn_dense_rows, 0, 0, 0};
    if (T > 1) {
        /* prefill: norm, shift, rounding (and the predictor's prep: sparse prefill below) over threads
         * by token (nk_prefill.c), the same floats as the steps' serial code */
        const float *mw[1] = {b->ffn_xk};
        float *out[1] = {m->fx};
        nk_shift_prefill(m, T, b->ln2_w, b->ln2_b, ffn_x, mw, out, 1, b->kv4 ? 4 : 8, p && !m->goff ? p : NULL);
    } else {
        nk_layer_norm(m->x, b->ln2_w, b->ln2_b, 1e-5f, D, m->xa);
        for (int64_t d = 0; d < D; d++)
            m->fx[d] = m->xa[d] + (ffn_x[d] - m->xa[d]) * b->ffn_xk[d];
        if (b->kv4)
            nk_quantize_rows4(m, m->fx, 1, D);
        else
            nk_quantize_rows(m, m->fx, 1, D);
    }
    memcpy(ffn_x, m->xa + (T - 1) * D, D * sizeof(float));
    if (T == 1)
        NK_SPAN(11);         /* the decode's norm + shift + rounding, serial */
    NK_SPAN_RESET();         /* the prefill's shift is pool call 11 */
    if (T == 1 && b + 1 < m->layers + m->L)          /* the next layer's first vectors, while this FFN streams */
        nk_layer_vectors_prefetch(m, b + 1, 0);
    if (m->dense && !p && !m->goff) {              /* every key and value row (nk_dense.c) */
        nk_ffn_dense_rows(m, b, T, stats);
        return;
    }
    if (T > 1 && p && !m->goff) {
        /* sparse prefill: the dense key pass over the chunk (each key row read once for all T tokens);
         * a neuron adds to token t iff relu(k) > 0 and its score >= thr, so only the active neurons
         * are scored (each token's predictor prep is done above): the same sums as T sparse steps at
         * a fraction of the predictor's work */
        c.pred = p;
    } else if ((T > 1 || m->sets_all_keys) && m->goff) {
        /* sparse prefill: every token's set first, then the dense key pass over the chunk (each key
         * row read once for all T tokens) with the values of each token's predicted neurons only:
         * the same sums as T sparse steps, without T scattered reads of the key rows */
        memset(m->mask, 0, T * m->F);
        for (int64_t t = 0; t < T; t++) {
            int64_t n = sparse_set(m, p, t);
            for (int64_t q = 0; q < n; q++)
                m->mask[t * m->F + m->idx[q]] = 1;
            stats[0] += m->sets_all_keys ? m->F : n;   /* all_keys: every key row read (bytes) */
        }
        c.mask = m->mask;
    }
    if (c.mask || c.pred || (!p && !m->goff)) {
        zero_counts(m);
        ffn_run(m, &c, m->F, T, m->x);
        for (int64_t i = 0; i < nt; i++) {
            stats[1] += m->tls[i].nval;
            if (c.pred)
                stats[0] += m->tls[i].npred;
        }
        if (!c.mask && !c.pred)
            stats[0] += T * m->F;
        return;
    }
    for (int64_t t = 0; t < T; t++) {
        NK_SPAN_RESET();
        int64_t n = sparse_set(m, p, t);
        NK_SPAN(12);             /* the set: the predictor's prep and merge (its pool call is tag 2) */
        c.t = t, c.rows = ffn_sparse_rows;
        zero_counts(m);
        ffn_run(m, &c, n, 1, m->x + t * D);
        for (int i = 0; i < nt; i++)
            stats[1] += m->tls[i].nval;
        stats[0] += n;
    }
}

