/* The fused 1- and 2-bit predictor select (nk_pred.c), included once per code-plane extraction:
 * SEL2(name) names this copy's functions, SEL2_TARGET is its target attribute, SEL2_PLANE(raw, k)
 * (k = 1, 2, 3) gives 2-bit code plane k = (raw >> 2k) & 3 of 64 code bytes and SEL2_BIT(raw, k)
 * (k = 1..7) 1-bit plane (raw >> k) & 1: two ops (shift, and) with AVX-512BW alone, one
 * (vgf2p8affineqb) with GFNI. Plane 0 is raw & 3 (raw & 1) in both. */
/* Integer dots of rows ra, rb (2 bits, G groups of 64 columns: 16 bytes a group) with xq over the
 * groups 8c .. 8c + 7, as one vector [ra: g 0..7 | rb: g 0..7] (natural order).
 * Each 64-byte load holds four groups, one per 128-bit lane; code plane k = (raw >> 2k) & 3 holds
 * columns 4b + k, times plane k of xq by vpdpbusd (u8 codes x s8 xq: each i32 lane sums four
 * columns). A group's four lanes are summed with 64-bit unpacks and a two-source shuffle, which
 * leaves lane 4m + h = group 4 (h & 1) + m of row h >> 1 (h: load 0/1 of ra, then of rb). */
SEL2_TARGET static inline __m512i SEL2(dots2)(const uint8_t *ra, const uint8_t *rb, int64_t c, const __m512i *xp) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i nat = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m512i s[4];
    for (int h = 0; h < 4; h++) {
        const __m512i *x = xp + 4 * (2 * c + (h & 1));     /* the four planes of xq under this load */
        __m512i raw = _mm512_loadu_si512((const void *)((h < 2 ? ra : rb) + c * 128 + (h & 1) * 64));
        __asm__("" : "+v"(raw));       /* one load, kept in a register (not re-read by each shift) */
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, m3), x[0]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_PLANE(raw, 1), x[1]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_PLANE(raw, 2), x[2]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_PLANE(raw, 3), x[3]);
        s[h] = acc;
    }
    __m512 u = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_unpacklo_epi64(s[0], s[1]), _mm512_unpackhi_epi64(s[0], s[1])));
    __m512 w = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_unpacklo_epi64(s[2], s[3]), _mm512_unpackhi_epi64(s[2], s[3])));
    __m512i t = _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(u, w, 0x88)),
                                 _mm512_castps_si512(_mm512_shuffle_ps(u, w, 0xdd)));
    return _mm512_permutexvar_epi32(nat, t);
}

/* The same for 1 bit (8 bytes a group): one 64-byte load per row holds the eight groups, two i32
 * lanes each; plane k = (raw >> k) & 1 holds columns 8b + k (xq's plane k: nk_pred_prep). Pairs of
 * lanes are summed by one two-source shuffle: lane 4m + 2 rho + i = group 2m + i of row rho. */
SEL2_TARGET static inline __m512i SEL2(dots1)(const uint8_t *ra, const uint8_t *rb, int64_t c, const __m512i *xp) {
    const __m512i m1 = _mm512_set1_epi8(1);
    const __m512i nat = _mm512_setr_epi32(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    const __m512i *x = xp + 8 * c;
    __m512i s[2];
    for (int h = 0; h < 2; h++) {
        __m512i raw = _mm512_loadu_si512((const void *)((h ? rb : ra) + c * 64));
        __asm__("" : "+v"(raw));
        __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(raw, m1), x[0]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 1), x[1]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 2), x[2]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 3), x[3]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 4), x[4]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 5), x[5]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 6), x[6]);
        acc = _mm512_dpbusd_epi32(acc, SEL2_BIT(raw, 7), x[7]);
        s[h] = acc;
    }
    __m512 u = _mm512_castsi512_ps(s[0]), w = _mm512_castsi512_ps(s[1]);
    __m512i t = _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(u, w, 0x88)),
                                 _mm512_castps_si512(_mm512_shuffle_ps(u, w, 0xdd)));
    return _mm512_permutexvar_epi32(nat, t);
}

/* Rows q in [r0, r1) (row idx ? idx[q] : q): the positions q with score >= thr into out (ascending;
 * out may be NULL), and, when score is not NULL, every score into score[q - r0]. Returns the count. */
SEL2_TARGET static inline __attribute__((always_inline)) int64_t SEL2(run)(const nk_pred *p, const nk_pred_x *px,
        const int32_t *idx, int64_t r0, int64_t r1, int32_t *out, float *score, const int64_t NC, const int bits) {
    int64_t G = 8 * NC, rb = G * 8 * bits;
    __m512 XS[8], E[8], XSUM[8];         /* per block of eight groups, for both rows of a vector */
    for (int64_t c = 0; c < NC; c++) {
        __m256 a = _mm256_loadu_ps(px->xs + 8 * c), e = _mm256_loadu_ps(px->e + 8 * c), s = _mm256_loadu_ps(px->xsum + 8 * c);
        XS[c] = twice(a), E[c] = twice(e), XSUM[c] = twice(s);
    }
    /* 2 bits: plane k of xq under code load j (64 bytes) at 4 j + k; 1 bit: plane k under block c at
     * 8 c + k (planes 4..7 in the second halves of plane[0..3], nk_pred_prep); G <= 64 */
    __m512i xp[64];
    for (int64_t j = 0; j < 2 * NC; j++)
        for (int k = 0; k < 4; k++)
            xp[4 * j + k] = bits == 2 ? _mm512_loadu_si512((const void *)(px->plane[k] + 64 * j))
                                      : _mm512_loadu_si512((const void *)(px->plane[k] + (j & 1) * 8 * G + 64 * (j >> 1)));
    const __m512 thr = _mm512_set1_ps(p->thr);
    const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    /* software prefetch ~16 KiB of codes ahead (a whole-row multiple of 16): the hardware's stream
     * prefetch alone left this kernel at ~21 GB/s from DRAM in the decode; 8-32 KiB measured alike */
    const int64_t pf = (16384 / rb + 15) / 16 * 16;
    int64_t n = 0;
    if (!idx) {                                 /* the first pf rows (the loop fetches from q0 + pf on) at once */
        int64_t q1 = r0 + pf < r1 ? r0 + pf : r1;
        const char *pc = (const char *)(p->packed + r0 * rb);
        for (int64_t l = 0; l < (q1 - r0) * rb; l += 64)
            _mm_prefetch(pc + l, _MM_HINT_T0);
        const char *ps = (const char *)(p->scale + r0 * G), *pz = (const char *)(p->zero + r0 * G);
        for (int64_t l = 0; l < (q1 - r0) * 2 * G; l += 64)
            _mm_prefetch(ps + l, _MM_HINT_T0), _mm_prefetch(pz + l, _MM_HINT_T0);
    }
    for (int64_t q0 = r0; q0 < r1; q0 += 16) {
        int64_t left = r1 - q0;
        __m512 acc[8];
        if (!idx && q0 + pf + 16 <= r1) {       /* the rows pf ahead: codes, scales, zeros */
            const char *pc = (const char *)(p->packed + (q0 + pf) * rb);
            for (int64_t l = 0; l < 16 * rb; l += 64)
                _mm_prefetch(pc + l, _MM_HINT_T0);
            const char *ps = (const char *)(p->scale + (q0 + pf) * G), *pz = (const char *)(p->zero + (q0 + pf) * G);
            for (int64_t l = 0; l < 32 * G; l += 64)
                _mm_prefetch(ps + l, _MM_HINT_T0), _mm_prefetch(pz + l, _MM_HINT_T0);
        }
        for (int i = 0; i < 8; i++) {
            int64_t qa = q0 + 2 * i, qb = qa + 1;
            qa = qa < r1 ? qa : r1 - 1, qb = qb < r1 ? qb : r1 - 1;    /* past the end: a valid row, masked below */
            int64_t ra = idx ? idx[qa] : qa, rbw = idx ? idx[qb] : qb;
            const uint8_t *pa = p->packed + ra * rb, *pb = p->packed + rbw * rb;
            const uint16_t *sa = p->scale + ra * G, *sb = p->scale + rbw * G, *za = p->zero + ra * G, *zb = p->zero + rbw * G;
            __m512 f = _mm512_setzero_ps();
            for (int64_t c = 0; c < NC; c++) {        /* nk_pred_avx2's chain: acc = fma(s, f, acc); fma(z, xsum, acc) */
                __m512 d = _mm512_fmadd_ps(_mm512_cvtepi32_ps((bits == 2 ? SEL2(dots2)(pa, pb, c, xp) : SEL2(dots1)(pa, pb, c, xp))), XS[c], E[c]);
                __m256i sv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(sa + 8 * c))),
                                                     _mm_loadu_si128((const __m128i *)(sb + 8 * c)), 1);
                __m256i zv = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(za + 8 * c))),
                                                     _mm_loadu_si128((const __m128i *)(zb + 8 * c)), 1);
                f = _mm512_fmadd_ps(_mm512_cvtph_ps(sv), d, f);
                f = _mm512_fmadd_ps(_mm512_cvtph_ps(zv), XSUM[c], f);
            }
            acc[i] = f;
        }
        __m512 sc = sel2_rowsums(acc);
        __mmask16 live = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        if (score)
            _mm512_mask_storeu_ps(score + (q0 - r0), live, sc);
        if (out) {
            __mmask16 k = _mm512_mask_cmp_ps_mask(live, sc, thr, _CMP_GE_OQ);
            int cnt = __builtin_popcount((unsigned)k);
            __m512i pos = _mm512_add_epi32(_mm512_set1_epi32((int32_t)q0), step);
            _mm512_mask_storeu_epi32(out + n, (__mmask16)((1u << cnt) - 1), _mm512_maskz_compress_epi32(k, pos));
            n += cnt;
        } else {
            n += __builtin_popcount((unsigned)_mm512_mask_cmp_ps_mask(live, sc, thr, _CMP_GE_OQ));
        }
    }
    return n;
}

/* NC = G / 8 blocks; G = 8 (D 512) gets its own copies, the planes of xq held in eight registers */
SEL2_TARGET static int64_t SEL2(vnni)(const nk_pred *p, const nk_pred_x *px, const int32_t *idx, int64_t r0, int64_t r1,
                                      int32_t *out, float *score) {
    if (p->bits == 2)
        return p->G == 8 ? SEL2(run)(p, px, idx, r0, r1, out, score, 1, 2) : SEL2(run)(p, px, idx, r0, r1, out, score, p->G / 8, 2);
    return p->G == 8 ? SEL2(run)(p, px, idx, r0, r1, out, score, 1, 1) : SEL2(run)(p, px, idx, r0, r1, out, score, p->G / 8, 1);
}

/* The same select for 2 bits over the rows [r0, r1) of the blocked layout (p->blk, nk_pred_blk_new):
 * block b = rows 16b .. 16b + 15, 320 G bytes; its group g at 320 g: four 64-byte code loads j, whose
 * i32 lane i holds row 16b + i's code bytes 16g + 4j .. 16g + 4j + 3 (columns 64g + 16j .. + 15),
 * then the 16 rows' scales (float16), then their zeros. One load's plane k times the broadcast four
 * bytes of xq's plane k under it (vpdpbusd) adds to each row's own lane: no group-sum shuffles, no row
 * tree, and all three arrays come in one linear stream, which the hardware prefetcher keeps up with
 * (the row layout's six interleaved streams ran at ~18 GB/s from DRAM, even with software prefetch).
 * Floats: lane i of A[g % 8] is row i's chain of nk_pred_avx2's lane for group g, and the eight are
 * summed by its hsum8 tree, so scores and sets are bit-identical to it (tests/test_native.py). */
SEL2_TARGET static int64_t SEL2(blk)(const nk_pred *p, const nk_pred_x *px, int64_t r0, int64_t r1, int32_t *out,
                                     float *score) {
    const int64_t G = p->G, bs = 320 * G;
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512 thr = _mm512_set1_ps(p->thr);
    const __m512i step = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t n = 0;
    for (int64_t b = r0 / 16; 16 * b < r1; b++) {
        const uint8_t *B = p->blk + b * bs;
        __m512 A[8];
        for (int l = 0; l < 8; l++)
            A[l] = _mm512_setzero_ps();
        for (int64_t g8 = 0; g8 < G; g8 += 8)
            for (int l = 0; l < 8; l++) {
                int64_t g = g8 + l;
                const uint8_t *q = B + 320 * g;
                __m512i acc[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};    /* two dpbusd chains */
                for (int j = 0; j < 4; j++) {
                    __m512i raw = _mm512_loadu_si512((const void *)(q + 64 * j));
                    __asm__("" : "+v"(raw));
                    int32_t xb[4];                            /* plane k's four bytes under this load */
                    for (int k = 0; k < 4; k++)
                        memcpy(&xb[k], px->plane[k] + 16 * g + 4 * j, 4);
                    __m512i a = _mm512_dpbusd_epi32(acc[j & 1], _mm512_and_si512(raw, m3), _mm512_set1_epi32(xb[0]));
                    a = _mm512_dpbusd_epi32(a, SEL2_PLANE(raw, 1), _mm512_set1_epi32(xb[1]));
                    a = _mm512_dpbusd_epi32(a, SEL2_PLANE(raw, 2), _mm512_set1_epi32(xb[2]));
                    acc[j & 1] = _mm512_dpbusd_epi32(a, SEL2_PLANE(raw, 3), _mm512_set1_epi32(xb[3]));
                }
                __m512 d = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc[0], acc[1])), _mm512_set1_ps(px->xs[g]),
                                           _mm512_set1_ps(px->e[g]));
                A[l] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(q + 256))), d, A[l]);
                A[l] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(q + 288))),
                                       _mm512_set1_ps(px->xsum[g]), A[l]);
            }
        __m512 sc = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(A[0], A[1]), _mm512_add_ps(A[4], A[5])),
                                  _mm512_add_ps(_mm512_add_ps(A[2], A[3]), _mm512_add_ps(A[6], A[7])));
        int64_t q0 = 16 * b;                  /* the block's rows in [r0, r1) (a chunk may start mid-block) */
        uint32_t live = q0 < r0 ? 0xffffu << (r0 - q0) : 0xffffu;
        if (r1 - q0 < 16)
            live &= (1u << (r1 - q0)) - 1;
        if (score && q0 >= r0)
            _mm512_mask_storeu_ps(score + (q0 - r0), (__mmask16)live, sc);
        else if (score) {                     /* a chunk's first block that starts before r0 */
            float t[16];
            _mm512_storeu_ps(t, sc);
            for (int64_t i = r0 - q0; i < 16 && q0 + i < r1; i++)
                score[q0 + i - r0] = t[i];
        }
        __mmask16 k = _mm512_mask_cmp_ps_mask((__mmask16)live, sc, thr, _CMP_GE_OQ);
        int cnt = __builtin_popcount((unsigned)k);
        if (out) {
            __m512i pos = _mm512_add_epi32(_mm512_set1_epi32((int32_t)q0), step);
            _mm512_mask_storeu_epi32(out + n, (__mmask16)((1u << cnt) - 1), _mm512_maskz_compress_epi32(k, pos));
        }
        n += cnt;
    }
    return n;
}
