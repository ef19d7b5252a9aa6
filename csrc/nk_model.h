/* The native backend's model: struct of one layer's weight pointers, scratch, shared helpers.
 * Private to csrc/ (nk_rwkv7.c: time-mix, forward, entry points; nk_ffn.c: FFN and predictor). */
#ifndef NK_MODEL_H
#define NK_MODEL_H

#include "nk.h"
#include "nk_pool.h"

#define TB 64      /* tokens per prefill chunk (<= 64: nk_kernels' VNNI correction array) */
#define NB 256     /* neurons per key block of the prefill FFN: TB x NB keys (64 KiB); 256 vs 64:
                             dense within noise, sparse +0-3% (a quarter of the predictor calls) */
#define NK_FFN_PIECES 4   /* FFN pieces per thread (as the pool's chunks per thread: a late thread's share
                           * is taken by the others) */

/* One layer: pointers only, in this order (rwkv_edge/backends/native.py builds the same list). */
typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    const float *x_r, *x_w, *x_k, *x_v, *x_a, *x_g;
    const float *w0, *a0, *v0, *k_k, *k_a, *r_k, *lnx_w, *lnx_b;   /* v0 NULL in layer 0 */
    const int8_t *w1, *w2, *a1, *a2, *g1, *g2, *v1, *v2;           /* LoRA (in, out) int8 */
    const float *w1s, *w2s, *a1s, *a2s, *g1s, *g2s, *v1s, *v2s;    /* their column scales */
    const int8_t *Wr, *Wk, *Wv, *Wo;                              /* (D, D) int8 rows */
    const float *sr, *sk, *sv, *so;
    const float *ffn_xk;
    const int8_t *kv;                                             /* (F, 2, D) */
    const float *kv_scale;                                        /* (F, 2) */
    const uint8_t *p_packed;                                      /* predictor, NULL: dense FFN */
    const uint16_t *p_scale, *p_zero;
    /* int4 files (nk_q4.c layout): where an int8 pointer above is NULL its int4 twin here is used */
    const uint8_t *Wr4, *Wk4, *Wv4, *Wo4;                         /* (D, D / 2) codes */
    const uint16_t *sr4, *sk4, *sv4, *so4;                        /* (D, D / 32) float16 group scales */
    const uint8_t *kv4;                                           /* (F, 2, D / 2): key row, value column */
    const uint16_t *kv4s;                                         /* (F, 2, D / 32) */
} nk_layer;

typedef struct {               /* per-thread scratch */
    float *keys;               /* (TB, NB) or (F,) key activations */
    int32_t *pj;               /* (F,) active neurons */
    float *ph;                 /* (F,) their h = relu(k)^2 * value scale */
    int64_t nval;              /* value columns read in the last call */
    int64_t npred;             /* prefill: active neurons the predictor kept */
    float *sc;                 /* (F,) predictor scores of the candidates */
    int32_t *sel;              /* (F,) the predictor's select: positions, or rows of a decode chunk */
    int32_t *pjT;              /* prefill: (TB, NB + 20) each token's active neurons of a key block (nk_ffn.c) */
    float *phT;                /*   and their h */
    int64_t cnt[TB];           /*   and how many */
    float *lnprev;             /* (D,) prefill: the normed token before a thread's share (nk_shift_prefill) */
} nk_tls;

typedef struct {
    int64_t L, D, H, N, F, V, dw, da, dg, dv;
    const nk_kern *k;
    nk_pool *pool;
    const uint16_t *emb;
    const float *ln0_w, *ln0_b, *lnout_w, *lnout_b, *head_s;
    const int8_t *head;        /* (V, D) int8 rows, or NULL and then head4 (V, D / 2) + head_s4 (V, D / 32) */
    const uint8_t *head4;
    const uint16_t *head_s4;
    int64_t head_k;            /* > 0: head4 for all V logits, then the top head_k from the int8 rows (nk_head.c) */
    float *hscratch, *hval;    /*   its scratch: (V,), (head_k,) */
    int32_t *hcand, *hidx;     /*   (V,), (V,) */
    nk_layer *layers;
    nk_pred *pred;             /* (L,) or NULL */
    float *x, *xa, *mix[6], *r, *kk, *v, *vf, *y, *o, *fx;          /* (TB, D) */
    float *w, *a, *g, *nk, *bb, *gv, *t1;                             /* (D,) */
    float *lt[4];              /* (lora_max,) the decode LoRA pairs' hidden vectors (nk_rwkv7.c) */
    int8_t *Xq;                /* (TB, D) the activation rounded for the int8 dots */
    int8_t *X4;                /* (TB, D) the same values in the int4 dots' layout (nk_quantize4) */
    int32_t *init;             /* (TB, NK_INIT(D / NK_GS)) their -8 sum xq terms */
    float *xs;                 /* (TB, D / NK_GS) group scales (the same for both layouts) */
    float *score;
    int32_t *idx;
    uint8_t *mask;             /* (TB, F): the predicted sets of a prefill chunk */
    nk_pred_x px;
    nk_pred_x pxt[TB];         /* prefill: the predictor's view of each token of a chunk */
    nk_tls tls[NK_MAXT];
    float *part;               /* (npart, TB, D): the FFN's output per piece of its fixed split (nk_ffn.c) */
    int64_t npart;             /* NK_FFN_PIECES per thread; 1 on one thread */
    uint8_t *rec;              /* NULL, or where this call records the predicted sets (tests) */
    const int32_t *gidx;       /* NULL, or sets given by the caller (replayed): token t, layer i is */
    const int64_t *goff;       /*   gidx[goff[t L + i] : goff[t L + i + 1]] */
    int64_t rec_t0, rec_layer;
    float *pre[6];             /* prefill time-mix scratch (nk_prefill.c): (TB, lora_max) each */
    int64_t lora_max;          /* max(D, dw, da, dg, dv) */
    int8_t *lpbuf, *lp_end;    /* the decode's LoRAs packed for k->vecmatp (nk_lora.c nk_lora_pack_all) */
    const int8_t **lp;         /* (L * 8,): layer i's LoRA j (nk_layer order w1 .. v2) in lpbuf, or NULL */
    int64_t pre_T;             /* tokens of the chunk nk_att_prefill works on */
    struct nk_dense *dense;    /* NULL (the exact FFN), or the every-row dense FFN's matrices (nk_dense.c) */
    int sets_all_keys;         /* given sets, decode too: every key row, the values of the set (bench --shape
                                * "exact" rows; nk_model_all_keys) */
} nk_model;

/* the decode's LoRAs (nk_lora.c): the model's packed copy (nk_model_new), the start of layer b's LoRA j
 * fetched, and y (O,) = LoRA j (nk_layer order w1 w2 a1 a2 g1 g2 v1 v2) of x (I,) column-scaled, the start
 * of LoRA nj (-1: none) fetched first where the kernel does not stream into it */
void nk_lora_pack_all(nk_model *m);
void nk_lora_prefetch(const nk_model *m, const nk_layer *b, int j);
void nk_lora_apply(const nk_model *m, const nk_layer *b, int j, const float *x, float *y, int nj);
/* fetch layer b's per-channel vectors a decode step reads next (nk_lora.c; part 1: the time-mix's after its
 * r/k/v and the channel mix's, part 0: the time-mix's norm and shift) */
void nk_layer_vectors_prefetch(const nk_model *m, const nk_layer *b, int part);
void nk_layer_norm(const float *x, const float *w, const float *b, float eps, int64_t D, float *out);
void nk_head_out(const nk_layer *b, int64_t N, int64_t h, const float *r, const float *k, const float *v,
                 const float *g, float *yh);
void nk_quantize_rows(nk_model *m, const float *x, int64_t T, int64_t I);     /* into m->Xq, m->xs */
void nk_quantize_rows4(nk_model *m, const float *x, int64_t T, int64_t I);    /* into m->X4, m->xs, m->init */
/* a prefill chunk's time-mix between the r/k/v and the output mat-vecs (nk_prefill.c) */
void nk_att_prefill(nk_model *m, const nk_layer *b, int64_t T, float *S, const float *S0, int first);
/* nk_quantize of T rows of x (T, I) into X (T, I), xs (T, I / NK_GS), vectorised (nk_prefill.c) */
void nk_quantize_many(const nk_model *m, const float *x, int64_t T, int64_t I, int8_t *X, float *xs);
void nk_quantize4_many(const nk_model *m, const float *x, int64_t T, int64_t I, int8_t *X, float *xs, int32_t *init);
/* the prefill's elementwise parts (nk_prefill_elem.c; see there): one token's time-mix elementwise
 * part, the gate's sigmoid rows, head h's group norm for T tokens, and a chunk's layer norm + token
 * shifts over threads */
void nk_mix_token(const nk_model *m, const nk_layer *b, int first, float *k, float *v, const float *vf, float *W,
                  float *A, const float *GV, float *KN);
void nk_mix_heads(const nk_model *m, const nk_layer *b, int first, int64_t h0, int64_t h1, float *k, float *v,
                  const float *vf, float *W, float *A, const float *GV, float *KN);
void nk_sigmoid_rows(const nk_model *m, float *x, int64_t T, int64_t n, int64_t ld);
/* the wkv the prefill and the decode run: on 512-bit registers (two rows a register), bit-identical to
 * m->k->wkv, where it applies (VNNI level, N % 16 == 0, N <= 256); else m->k->wkv */
typedef void (*nk_wkv_fn)(float *, const float *, int64_t, const float *, const float *, const float *,
                          const float *, const float *, const float *, float *);
nk_wkv_fn nk_wkv_of(const nk_model *m);
/* the decode's wkv of one head: nk_wkv_of's floats, fetching the next head's state (nS0 in, nS out; NULL:
 * none) alongside where the 512-bit kernel runs */
void nk_wkv_step(const nk_model *m, float *S, const float *S0, const float *r, const float *w, const float *k,
                 const float *v, const float *a, const float *b, float *y, const float *nS0, float *nS);
void nk_head_out_rows(const nk_layer *b, int64_t N, int64_t h, int64_t D, int64_t T, const float *r, const float *k,
                      const float *v, const float *g, float *y);
void nk_shift_prefill(nk_model *m, int64_t T, const float *lnw, const float *lnb, const float *prev0,
                      const float *const *mw, float *const *out, int nmix, int bits, const nk_pred *p);
/* the top head_k logits of each of T rows of out recomputed from the int8 head (nk_head.c) */
void nk_head_rescore(nk_model *m, const float *xa, int64_t T, float *out, int64_t ldy);
/* x += FFN(token-shifted ln2 x) for T tokens (nk_ffn.c) */
void nk_channel_mix(nk_model *m, const nk_layer *b, const nk_pred *p, int64_t T, float *ffn_x, int64_t *stats);

/* the every-row dense FFN (nk_dense.c): x += FFN of T tokens, fx already rounded; and its free */
void nk_ffn_dense_rows(nk_model *m, const nk_layer *b, int64_t T, int64_t *stats);
void nk_dense_free(nk_model *m);

#endif
