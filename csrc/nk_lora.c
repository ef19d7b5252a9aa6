/* The decode's LoRA mat-vecs from a packed copy: y (O,) = x (I,) @ M (I, O) int8, unscaled (the column
 * scale is the caller's, nk_rwkv7.c lora()), the floats of vecmat_512 (nk_kernels.c) bit for bit.
 *
 * Why: a 58M decode step reads 3.5 MB of LoRAs (8 matrices of 16-64 KiB a layer) from DRAM. vecmat_512 on
 * the file's matrices (row i of a 128-column block is 128 bytes of every O-byte row, the matrices apart in
 * the file) ran them at ~27 GB/s on one thread: every matrix starts with a stall, and its prefetch reaches
 * 48 rows ahead inside the block only. Here the model keeps one copy of all layers' LoRAs in the order a
 * step reads them (nk_rwkv7.c lora_pack_all), each column block's rows contiguous, so the step is one
 * stream that the kernel prefetches LP_PD bytes ahead, on into the next matrix.
 * Measured (a C loop over the 96 matrices of the 58M model after a 64 MiB sweep, one thread, this host):
 * vecmat_512 130 us (27 GB/s); packed 95 us at LP_PD 4 KiB, 79 us (45 GB/s) at 8 KiB; warm (in cache)
 * 64 vs 61 us, i.e. bound by the converts and FMAs there.
 * (Rounding x to int16 and vpdpwssd on row pairs ran 69 us cold, 34 us warm, but a value on an int16
 * rounding boundary then moved int8 roundings after it in one path of two: float-order noise between
 * builds, threads and the reference became 1e-3-1e-2 logit moves in most tokens of the test models.)
 *
 * Layout (nk_lora_pack): column blocks of W = 128, 64 or 16 columns (the widest that fits, left to right;
 * O % 16 == 0), block c0 at byte c0 * I, its row i (W bytes: M[i, c0:c0 + W]) at i * W. Each column gets
 * acc = fma(x_i, M[i, o], acc) over i in order, in its own lane: vecmat_512's and vecmat_avx2's sums.
 */
#include <stdlib.h>
#include <string.h>

#include "nk.h"

#include "nk_simd.h"

static inline int64_t block_w(int64_t left) { return left >= 128 ? 128 : (left >= 64 ? 64 : 16); }

int nk_lora_packable(int64_t I, int64_t O) { return I > 0 && O > 0 && O % 16 == 0; }

void nk_lora_pack(const int8_t *M, int64_t I, int64_t O, int8_t *P) {
    for (int64_t c0 = 0, W; c0 < O; c0 += W) {
        W = block_w(O - c0);
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
        W = block_w(O - c0);
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
