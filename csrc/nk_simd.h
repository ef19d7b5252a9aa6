/* x86-64 SIMD set-up shared by the kernel files (nk_kernels.c: int8, nk_q4.c: int4).
 *
 * NK_X86 is defined where GCC/Clang target x86-64 (and NK_NO_SIMD is not set): the AVX2 / VNNI
 * functions are then compiled with per-function target attributes, so the library is built for the
 * baseline target and picks its kernels at run time (nk_kern_get). Elsewhere only plain C is built.
 */
#ifndef NK_SIMD_H
#define NK_SIMD_H

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(NK_NO_SIMD)
#define NK_X86 1
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* the sum of the eight lanes of v */
AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif
