/* The decode's LoRA mat-vecs from a packed copy: y (O,) = x (I,) @ M (I, O) int8, unscaled (the column
 * scale is the caller's, nk_lora_apply below), the floats of vecmat_512 (nk_kernels.c) bit for bit.
 *
 * Why: a 58M decode step reads 3.5 MB of LoRAs (8 matrices of 16-64 KiB a layer) from DRAM. vecmat_512 on
 * the file's matrices (row i of a 128-column block is 128 bytes of every O-byte row, the matrices apart in
 * the file) ran them at ~27 GB/s on one thread: every matrix starts with a stall, and its prefetch reaches
 * 48 rows ahead inside the block only. Here the model keeps one copy of all layers' LoRAs in the order a
 * step reads them (nk_lora_pack_all below), each column block's rows contiguous, so the step is one
 * stream that the kernel prefetches LP_PD bytes ahead, on into the next matrix.
 * Measured (a C loop over the 96 matrices of the 58M model after a 64 MiB sweep, one thread, this host):
 * vecmat_512 130 us (27 GB/s); packed 95 us at LP_PD 4 KiB, 79 us (45 GB/s) at 8 KiB; warm (in cache)
 * 64 vs 61 us, i.e. bound by the converts and FMAs there.
 * (Rounding x to int16 and vpdpwssd on row pairs ran 69 us cold, 34 us warm, but a value on an int16
 * rounding boundary then moved int8 roundings after it in one path of two: float-order noise between
 * builds, threads and the reference became 1e-3-1e-2 logit moves in most tokens of the test models.)
 *
 * Also here: the model's packed copy and the decode's LoRA calls (nk_lora_pack_all, nk_lora_apply), and
 * the fetch of a layer's per-channel vectors ahead of the decode's serial code (nk_layer_vectors_prefetch).
 *
 * Layout (nk_lora_pack): column blocks of W = 128, 64 or 16 columns (the widest that fits, left to right;
 * O % 16 == 0), block c0 at byte c0 * I, its row i (W bytes: M[i, c0:c0 + W]) at i * W. Each column gets
 * acc = fma(x_i, M[i, o], acc) over i in order, in its own lane: vecmat_512's and vecmat_avx2's sums.
 */
#include <stdlib.h>
#include <string.h>

#include "nk_model.h"

#include "nk_simd.h"

int nk_lora_packable(int64_t I, int64_t O) { return I > 0 && O > 0 && O % 16 == 0; }

void nk_lora_pack(const int8_t *M, int64_t I, int64_t O, int8_t *P) {
    for (int64_t c0 = 0, W; c0 < O; c0 += W) {
        W = nk_lora_block_w(O - c0);
        for (int64_t i = 0; i < I; i++)
            memcpy(P + c0 * I + i * W, M + i * O + c0, W);
    }
}

#ifdef NK_X86
#define LP_PD 8192
/* one block of NV registers of 16 columns: rows of 16 NV bytes; the line LP_PD bytes ahead of each row
 * fetched (below end) */
VNNI static inline __attribute__((always_inline)) void block_512(const float *x, const int8_t *B, const int8_t *end,
                                                                 int64_t I, float *y, const int NV) {
    __m512 acc[8];
    for (int v = 0; v < NV; v++)
        acc[v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I; i++) {
        const int8_t *r = B + i * 16 * NV;
        if (NV >= 4 || (i & 3) == 0)            /* a line per 64 bytes read */
            for (int l = 0; l < 16 * NV; l += 64)
                if (r + l + LP_PD < end)
                    _mm_prefetch((const char *)(r + l + LP_PD), _MM_HINT_T0);
        __m512 xb = _mm512_set1_ps(x[i]);
        for (int v = 0; v < NV; v++)
            acc[v] = _mm512_fmadd_ps(xb, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                             _mm_loadu_si128((const __m128i *)(r + 16 * v)))), acc[v]);
    }
    for (int v = 0; v < NV; v++)
        _mm512_storeu_ps(y + 16 * v, acc[v]);
}

VNNI void nk_vecmatp_512(const float *x, const int8_t *P, int64_t I, int64_t O, float *y, const int8_t *pf_end) {
    const int8_t *end = pf_end ? pf_end : P + I * O;
    for (int64_t c0 = 0, W; c0 < O; c0 += W) {
        W = nk_lora_block_w(O - c0);
        const int8_t *B = P + c0 * I;
        if (W == 128)
            block_512(x, B, end, I, y + c0, 8);
        else if (W == 64)
            block_512(x, B, end, I, y + c0, 4);
        else
            block_512(x, B, end, I, y + c0, 1);
    }
}
#endif

/* ---- the model's packed copy and the decode's LoRA calls (nk_rwkv7.c) -------------------------- */
/* the lines of LoRA matrix M (I, O) that vecmat reads first (column block 0's first 48 rows): a
 * decode step's LoRAs come from DRAM, and each call's kernel prefetches only within its matrix,
 * so each call fetches the start of the next one (perf: vecmat stalled at its first rows) */
static void lora_head_prefetch(const int8_t *M, int64_t I, int64_t O) {
#if defined(__GNUC__) || defined(__clang__)
    for (int64_t i = 0; i < I && i < 48; i++)
        __builtin_prefetch(M + i * O);
#else
    (void)M, (void)I, (void)O;
#endif
}

/* LoRA j of a layer (nk_layer order: w1 w2 a1 a2 g1 g2 v1 v2): its int8 (I, O) matrix, column scale, shape */
static void lora_of(const nk_model *m, const nk_layer *b, int j, const int8_t **M, const float **cs, int64_t *I,
                    int64_t *O) {
    const int8_t *mats[8] = {b->w1, b->w2, b->a1, b->a2, b->g1, b->g2, b->v1, b->v2};
    const float *scales[8] = {b->w1s, b->w2s, b->a1s, b->a2s, b->g1s, b->g2s, b->v1s, b->v2s};
    int64_t hid[4] = {m->dw, m->da, m->dg, m->dv};
    *M = mats[j], *cs = scales[j];
    *I = j & 1 ? hid[j / 2] : m->D, *O = j & 1 ? m->D : hid[j / 2];
}

/* Pack every layer's LoRAs for k->vecmatp (above) into one buffer, in the order a decode step reads them
 * (gate, decay, a, value: nk_rwkv7.c lora_task), so the step streams it; a LoRA whose shape does not pack
 * keeps vecmat on the file's matrix (lp NULL), as does every LoRA at a level without vecmatp, or all of
 * them if the buffer cannot be had. The same floats either way. The decode and the prefill (nk_prefill.c
 * lora_rows) read the copy only, so native.py gives the file matrices' pages back once it is made
 * (nk_model_lora_packed): 3.5 MB of anonymous memory at 58M in place of as many file pages. */
void nk_lora_pack_all(nk_model *m) {
    static const int order[8] = {4, 5, 0, 1, 2, 3, 6, 7};
    if (!m->k->vecmatp)
        return;
    m->lp = calloc(m->L * 8, sizeof *m->lp);
    if (!m->lp)
        return;
    for (int pass = 0; pass < 2; pass++) {
        size_t off = 0;
        for (int64_t i = 0; i < m->L; i++)
            for (int q = 0; q < 8; q++) {
                const int8_t *M;
                const float *cs;
                int64_t I, O;
                lora_of(m, &m->layers[i], order[q], &M, &cs, &I, &O);
                if (!M || !nk_lora_packable(I, O))
                    continue;
                if (pass) {
                    nk_lora_pack(M, I, O, m->lpbuf + off);
                    m->lp[8 * i + order[q]] = m->lpbuf + off;
                }
                off += (size_t)(I * O);
            }
        if (!pass && !(m->lpbuf = off ? malloc(off) : NULL))
            return;
        m->lp_end = m->lpbuf + off;
    }
}

/* 1 where layer i's LoRA j (nk_layer order w1 .. v2) is read from the packed copy alone (nothing reads the
 * file's matrix after nk_model_new: native.py drops its pages), else 0 */
int nk_model_lora_packed(const void *mp, int64_t i, int j) {
    const nk_model *m = (const nk_model *)mp;
    return m->lp && i >= 0 && i < m->L && j >= 0 && j < 8 && m->lp[8 * i + j] && m->k->level == 2;
}

/* the start of layer b's LoRA j: its first 48 lines (packed) or rows (the file's matrix) */
void nk_lora_prefetch(const nk_model *m, const nk_layer *b, int j) {
    const int8_t *M, *P = m->lp ? m->lp[8 * (b - m->layers) + j] : NULL;
    const float *cs;
    int64_t I, O;
    lora_of(m, b, j, &M, &cs, &I, &O);
    if (P)
        for (int64_t l = 0; l < I * O && l < 48 * 64; l += 64)
            __builtin_prefetch(P + l);
    else if (M)
        lora_head_prefetch(M, I, O);
}

/* y (O,) = LoRA j of layer b applied to x (I,), column-scaled; the start of LoRA nj (-1: none) fetched
 * first where the kernel does not (the packed kernel streams on into the next matrix of the buffer) */
void nk_lora_apply(const nk_model *m, const nk_layer *b, int j, const float *x, float *y, int nj) {
    const int8_t *M;
    const float *cs;
    int64_t I, O, li = b - m->layers;
    const int8_t *P = m->lp ? m->lp[8 * li + j] : NULL;
    if (nj >= 0 && !P)
        nk_lora_prefetch(m, b, nj);
    lora_of(m, b, j, &M, &cs, &I, &O);
    if (P)
        m->k->vecmatp(x, P, I, O, y, m->lp_end);
    else
        m->k->vecmat(x, M, I, O, y);
    for (int64_t o = 0; o < O; o++)
        y[o] *= cs[o];
}

/* A decode step's per-channel float vectors (D floats each, 2 KiB at 58M; ~20 a layer, apart in the
 * file) come from DRAM, and the serial code and the head tasks that read them (norms, shifts, the
 * time-mix's elementwise part) waited on each in turn. part 1: those read after the r/k/v mat-vecs
 * (fetched before them); part 0: the next time-mix's norm and shift (fetched from the channel mix). */
void nk_layer_vectors_prefetch(const nk_model *m, const nk_layer *b, int part) {
    const float *v1[] = {b->w0, b->a0, b->v0, b->k_k, b->k_a, b->r_k, b->lnx_w, b->lnx_b, b->ln2_w, b->ln2_b,
                         b->ffn_xk};
    const float *v0[] = {b->ln1_w, b->ln1_b, b->x_r, b->x_w, b->x_k, b->x_v, b->x_a, b->x_g};
    const float *const *v = part ? v1 : v0;
    int n = part ? (int)(sizeof v1 / sizeof *v1) : (int)(sizeof v0 / sizeof *v0);
    for (int i = 0; i < n; i++)
        if (v[i])
            for (int64_t l = 0; l < m->D; l += 16)
                __builtin_prefetch(v[i] + l);
}

/* ---- for the tests (tests/test_native.py): y (O,) = x (I,) @ M (I, O) by level's packed kernel, unscaled;
 * -1 where the level has none or the shape does not pack ---- */
int nk_test_vecmatp(int level, const int8_t *M, int64_t I, int64_t O, const float *x, float *y) {
    const nk_kern *k = nk_kern_get(level);
    if (!k || !k->vecmatp || !nk_lora_packable(I, O))
        return -1;
    int8_t *P = malloc(I * O);
    if (!P)
        return -1;
    nk_lora_pack(M, I, O, P);
    k->vecmatp(x, P, I, O, y, NULL);
    free(P);
    return 0;
}
