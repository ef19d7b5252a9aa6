/* rwkv-edge native CPU backend: shared declarations.
 *
 * Kernels: nk_kernels.c (int8 dot products, int8 value axpy, n-bit predictor scores) and nk_q4.c
 * (the same for group-wise int4 weights), each in a plain C version and, on x86-64, AVX2 / AVX-512
 * VNNI versions chosen at run time by cpuid. The model: nk_rwkv7.c (a whole RWKV-7 forward over T
 * tokens: all layers and the head in one call) and nk_ffn.c (its FFN, dense or sparse).
 * Weights are not copied (but for the LoRAs' packed copy, nk_lora.c): the pointers below point into the
 * mmap of the .rwkve model file.
 */
#ifndef NK_H
#define NK_H

#include <stddef.h>
#include <stdint.h>

#define NK_GS 32          /* activation group: one float scale per 32 int8 values (as numba_i8dot) */
#define NK_INIT(G) (4 * (G) + 8)   /* int32 per token of the int4 kernels' -8 sum xq terms (nk_q4.c) */

/* An n-bit W_k predictor (quant.QuantizedMatrix): W_hat[r, c] = scale[r, g] code[r, c] + zero[r, g]. */
typedef struct nk_pred {
    int32_t bits, G;          /* bits 1/2/4/8; G groups of gs = C / G columns per row */
    int64_t R, C;             /* rows (= FFN neurons), columns (= D) */
    const uint8_t *packed;    /* (R, C * bits / 8), codes little-endian in each byte */
    const uint16_t *scale;    /* (R, G) float16 bits */
    const uint16_t *zero;     /* (R, G) float16 bits */
    float thr;                /* the layer's threshold: neuron r runs iff score >= thr */
    const uint8_t *blk;       /* NULL, or the same codes, scales and zeros in 16-row blocks (nk_pred_blk_new):
                               * the fused select's pass over all rows reads them there, one linear stream */
} nk_pred;

/* The activation as the predictor kernels read it (built once per token by nk_pred_prep).
 * x is rounded to int8 per predictor group g (xs_g = max|x_g| / 127), symmetric; with
 * mid = (2^bits - 1) / 2 and e_g = mid (sum x_g - xs_g sum xq_g) the score is
 *     sum_g scale[r, g] (xs_g (codes_g . xq_g) + e_g) + zero[r, g] sum x_g
 * (the centring term e_g leaves only (code - mid) times the rounding error, as numba_simd). */
typedef struct nk_pred_x {
    int8_t *xq;               /* (C,) */
    int8_t *plane[4];         /* plane k: xq[per * b + k] at b (per = 8 / bits codes per byte; 1 bit: plane
                               * k at plane[k & 3] + (k >> 2) C / 8) */
    float *xs, *e, *xsum;     /* (G,) each */
} nk_pred_x;

/* The kernels that have SIMD versions. All rows are int8, all activations int8 per NK_GS group. */
typedef struct {
    const char *name;     /* "vnni", "avx2" or "generic" */
    int level;            /* 2, 1 or 0 (nk_kern_get's argument): the hot paths' test for the 512-bit twins */
    /* y[t * ldy + p] = sum_g xs[t * G + g] * (row_p . X[t])_g   (G = I / NK_GS; exact int32 per group)
     * row_p = base + stride * (idx ? idx[p] : p), p in [0, n); X (T, I) int8, xs (T, G). Unscaled. */
    void (*dots)(const int8_t *base, int64_t stride, const int32_t *idx, int64_t n, int64_t I,
                 const int8_t *X, const float *xs, int64_t T, float *y, int64_t ldy);
    /* out[d] += h[0] v[0][d] + h[1] v[1][d] + h[2] v[2][d] + h[3] v[3][d], v int8 rows of length D */
    void (*axpy4)(float *out, int64_t D, const int8_t *const *v, const float *h);
    /* scores of predictor rows r0 + q (idx NULL) or idx[r0 + q], q in [0, r1 - r0) (see nk_pred_prep),
     * into score[q] */
    void (*pred)(const struct nk_pred *p, const struct nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1,
                 float *score);
    /* one RWKV-7 head, one token: S (N, N) [value i, key j] = S0 * w + (S0 @ a) b^T + v k^T, y = S @ r
     * (all vectors (N,), N % 8 == 0); S0 is the state before the token: S0 == S (in place) or another
     * (N, N) (a caller that keeps its input state: no copy of it first) */
    void (*wkv)(float *S, const float *S0, int64_t N, const float *r, const float *w, const float *k, const float *v,
                const float *a, const float *b, float *y);
    /* int4 rows (nk_q4.c): y[t * ldy + p] = sum_g (d_g xs[t * G + g]) (u_g . xq_g - 8 sum xq_g) for
     * row r = idx ? idx[p] : p, codes base + stride * r (I / 2 bytes), scales sbase + sstride * r
     * (G float16); X (T, I) int8, xs (T, G), init (T, NK_INIT(G)) as nk_quantize4 lays them out */
    void (*dots4)(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride, const int32_t *idx,
                  int64_t n, int64_t I, const int8_t *X, const float *xs, const int32_t *init, int64_t T,
                  float *y, int64_t ldy);
    /* out[d] += sum_k h[k] d_k,g (u_k[d] - 8), k < 4: four int4 value columns v[k] (D / 2 bytes) with
     * scales s[k] (D / 32 float16) */
    void (*axpy4q)(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h);
    /* y (O,) = x (I,) @ M (I, O) int8 (a LoRA's input-major matrix; O % 8 == 0), unscaled */
    void (*vecmat)(const float *x, const int8_t *M, int64_t I, int64_t O, float *y);
    /* the same floats from M packed by nk_lora_pack (nk_lora.c: the decode's LoRAs), prefetching ahead up
     * to pf_end (NULL: the end of P; the model's packed LoRAs are one buffer in the order a step reads
     * them); NULL at a level without one (the caller runs vecmat on the file's matrix) */
    void (*vecmatp)(const float *x, const int8_t *P, int64_t I, int64_t O, float *y, const int8_t *pf_end);
} nk_kern;

const nk_kern *nk_kern_get(int level);       /* 0 generic, 1 avx2, 2 vnni; NULL if this CPU lacks it */
int nk_cpu_level(void);                       /* the best level this CPU runs */

/* quantize x (I,) to X (I,) int8 and xs (I / NK_GS,) as numba_i8dot.quantize_x */
void nk_quantize(const float *x, int64_t I, int8_t *X, float *xs);
void nk_pred_prep(const nk_pred *p, const float *x, nk_pred_x *px);
/* the same px by kernel set k's prep (nk_pred.c: 512-bit at the VNNI level where it applies; the same bytes) */
void nk_pred_prep_k(const nk_kern *k, const nk_pred *p, const float *x, nk_pred_x *px);
/* the predictor kernels (nk_pred.c): scores as nk_kern.pred, and the select: the positions q in
 * [r0, r1) of the rows (idx ? idx[q] : q) with score >= p->thr, ascending, into out; returns their
 * count. score: scratch of r1 - r0 floats (used where k has no fused select for p). */
void nk_pred_generic(const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1, float *score);
void nk_pred_avx2(const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1, float *score);
int64_t nk_pred_select(const nk_kern *k, const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0,
                       int64_t r1, int32_t *out, float *score);
/* p's codes, scales and zeros in the blocked layout of the fused select (nk_pred_sel2.h), malloc'd (free()),
 * or NULL where kernel set k has no blocked select for p (or no memory) */
uint8_t *nk_pred_blk_new(const nk_kern *k, const nk_pred *p);
/* quantize x (I,) for the int4 dots: X (I,) int8 in the pair layout, xs (I / NK_GS,), init
 * (NK_INIT(I / NK_GS),) int32 (nk_q4.c); the same rounding as nk_quantize */
void nk_quantize4(const float *x, int64_t I, int8_t *X, float *xs, int32_t *init);
/* the int4 kernels of each level (nk_q4.c; the SIMD ones only on x86-64) */
void nk_dots4_generic(const uint8_t *, const uint16_t *, int64_t, int64_t, const int32_t *, int64_t, int64_t,
                      const int8_t *, const float *, const int32_t *, int64_t, float *, int64_t);
void nk_dots4_avx2(const uint8_t *, const uint16_t *, int64_t, int64_t, const int32_t *, int64_t, int64_t,
                   const int8_t *, const float *, const int32_t *, int64_t, float *, int64_t);
void nk_dots4_vnni(const uint8_t *, const uint16_t *, int64_t, int64_t, const int32_t *, int64_t, int64_t,
                   const int8_t *, const float *, const int32_t *, int64_t, float *, int64_t);
void nk_axpy4q_generic(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h);
void nk_axpy4q_avx2(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h);
float nk_h2f(uint16_t h);
/* the packed LoRA layout (nk_lora.c): the width of the column block at column c0 (left = O - c0: 128, 64 or 16
 * columns; block c0 at byte c0 * I, its rows W bytes apart), whether (I, O) has it, the packing (P: I * O
 * bytes), the VNNI kernel */
static inline int64_t nk_lora_block_w(int64_t left) { return left >= 128 ? 128 : (left >= 64 ? 64 : 16); }
int nk_lora_packable(int64_t I, int64_t O);
void nk_lora_pack(const int8_t *M, int64_t I, int64_t O, int8_t *P);
void nk_vecmatp_512(const float *x, const int8_t *P, int64_t I, int64_t O, float *y, const int8_t *pf_end);
/* dots_vnni for T > 1 on 512-bit registers, bit-identical to it (nk_prefill_kernels.c; x86-64 VNNI only) */
void nk_dots_vnni512(const int8_t *base, int64_t stride, const int32_t *idx, int64_t n, int64_t I, const int8_t *X,
                     const float *xs, int64_t T, float *y, int64_t ldy);
/* axpy4 / axpy4q on 512-bit registers, the same floats as the AVX2 ones (nk_prefill_kernels.c; prefill only) */
void nk_axpy4_512(float *out, int64_t D, const int8_t *const *v, const float *h);
void nk_axpy4q_512(float *out, int64_t D, const uint8_t *const *v, const uint16_t *const *s, const float *h);
/* the decode's sparse FFN of one piece, int8, in one pass: key dots, the active list, value axpys (nk_kernels.c) */
int64_t nk_ffn_set_vnni(const int8_t *kv, const float *sc, const int32_t *idx, int64_t n, int64_t I, const int8_t *X,
                        const float *xs, float *out, int32_t *pj, float *ph);
/* a token's active neurons of a prefill key block, 512-bit (nk_prefill_kernels.c; see there) */
int64_t nk_active_512(const float *keys, const float *sc, int64_t j0, int64_t nb, int32_t *pj, float *ph);
int64_t nk_active_idx_512(const float *keys, const float *sc, const int32_t *idx, int64_t n, int32_t *pj, float *ph);
/* nk_dots4_vnni for T > 1 and I % 256 == 0 on 512-bit registers, bit-identical to it (nk_prefill_kernels.c) */
void nk_dots4_vnni512(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride, const int32_t *idx,
                      int64_t n, int64_t I, const int8_t *X, const float *xs, const int32_t *init, int64_t T,
                      float *y, int64_t ldy);

/* Fetch int4 row r (H code bytes, its scale row) into cache: the dots' rows ahead of the pass */
static inline void nk_prefetch_row4(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride,
                                    int64_t r, int64_t H) {
    for (int64_t l = 0; l < H; l += 64)
        __builtin_prefetch(base + stride * r + l, 0, 3);
    __builtin_prefetch(sbase + sstride * r, 0, 3);
}

/* The code and scale rows of the 4 int4 rows a dots pass reads from row p (of idx, or p.. when idx is NULL);
 * past n, the first row again (its results are not stored). */
static inline void nk_rows4(const uint8_t *base, const uint16_t *sbase, int64_t stride, int64_t sstride,
                            const int32_t *idx, int64_t p, int64_t n, const uint8_t **w, const uint16_t **s) {
    for (int k = 0; k < 4; k++) {
        int64_t r = idx ? idx[p + k < n ? p + k : p] : (p + k < n ? p + k : p);
        w[k] = base + stride * r, s[k] = sbase + sstride * r;
    }
}

#endif
