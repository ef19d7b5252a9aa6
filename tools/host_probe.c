/* What this host gives two threads, measured outside the model (issue 14: "2 threads >= 1.6x one thread
 * at 1.5B shapes"): read bandwidth at 1 and 2 threads for the access patterns of the native decode, and
 * how much of each CPU other work takes away (jitter).
 *
 *   cd csrc && gcc -O3 -std=gnu11 -march=native -pthread -I. ../tools/host_probe.c nk_kernels.c nk_pred.c \
 *       nk_q4.c nk_prefill_kernels.c nk_lora.c -o /tmp/host_probe -lm
 *   flock -x /work/wt/bench.lock /tmp/host_probe bw 7          # median / best of 7 passes, 1 vs 2 threads
 *   /tmp/host_probe alu 3                                   # 1 vs 2 threads of register-only FMAs
 *   flock -x /work/wt/bench.lock /tmp/host_probe jitter 5 [max% [threads]]   # 5 s; exit 1 if a CPU lost > max%
 *
 * bw, over a 768 MiB buffer (far above the 32 MiB L3), each thread its own half:
 *   plain read      512-bit loads, the ceiling;
 *   int8 dots rows  the library's decode mat-vec (nk_kern.dots, T = 1, I = 2048, contiguous rows: r/k/v/o, head);
 *   sparse kv       30% of 4 KiB neuron pairs (key row 2 KiB, value column 2 KiB, as the FFN's kv (F, 2, D)):
 *                   their key dots via idx, then their value columns by axpy4 (the sparse FFN's pattern).
 * alu: a register-only AVX-512 FMA loop (8 independent chains, no memory traffic) on 1 then 2 threads: if
 *   two threads do ~2x the work of one, the vCPUs are separate cores and what fails to scale in bw is memory.
 * jitter: a thread pinned on each CPU reads the clock in a loop; every gap > 20 us is time the CPU ran
 * something else (interrupts, kernel threads, other processes, or the hypervisor: in a VM the guest's
 * steal counter may stay 0 while its vCPUs are descheduled). A 2-thread decode waits at every pool call for
 * the slower thread, so it loses the gaps of both CPUs; one thread loses only its own. */
#define _GNU_SOURCE
#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "nk.h"

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

#define D 2048
static int8_t *buf, X[D];
static float xs[D / 32];
static size_t NB;
static int mode, nthr;
static int32_t *idx;
static int64_t nidx;
static pthread_barrier_t bar;
static double tstart[2], tend[2];
static volatile float sink[2];

static void *bw_thread(void *a) {
    int tid = (int)(long)a;
    const nk_kern *k = nk_kern_get(nk_cpu_level());
    pthread_barrier_wait(&bar);
    tstart[tid] = now();
    if (mode == 0) {
        size_t lo = NB / nthr * tid, hi = NB / nthr * (tid + 1);
        __m512i acc = _mm512_setzero_si512();
        for (size_t i = lo; i < hi; i += 128)
            acc = _mm512_add_epi64(acc, _mm512_add_epi64(_mm512_load_si512(buf + i), _mm512_load_si512(buf + i + 64)));
        sink[tid] = (float)_mm512_reduce_add_epi64(acc);
    } else if (mode == 1) {
        int64_t rows = NB / D, lo = rows / nthr * tid, hi = rows / nthr * (tid + 1);
        float *y = malloc((hi - lo) * sizeof(float));
        for (int64_t r = lo; r < hi; r += 4096)
            k->dots(buf + r * D, D, NULL, hi - r < 4096 ? hi - r : 4096, D, X, xs, 1, y + (r - lo), 0);
        sink[tid] = y[0];
        free(y);
    } else {
        int64_t lo = nidx / nthr * tid, hi = nidx / nthr * (tid + 1);
        float *y = malloc(2048 * sizeof(float)), out[D];
        memset(out, 0, sizeof out);
        for (int64_t c = lo; c < hi; c += 2048) {
            int64_t n = hi - c < 2048 ? hi - c : 2048;
            k->dots(buf, 2 * D, idx + c, n, D, X, xs, 1, y, 0);
            for (int64_t q = 0; q + 4 <= n; q += 4) {
                const int8_t *v[4];
                float h[4];
                for (int j = 0; j < 4; j++)
                    v[j] = buf + (int64_t)idx[c + q + j] * 2 * D + D, h[j] = y[q + j] * 1e-6f;
                for (int64_t p = q + 8; p < q + 12 && p < n; p++)       /* as nk_ffn.c: two passes ahead */
                    for (int l = 0; l < D; l += 64)
                        _mm_prefetch((const char *)(buf + (int64_t)idx[c + p] * 2 * D + D + l), _MM_HINT_T0);
                k->axpy4(out, D, v, h);
            }
        }
        sink[tid] = out[0];
        free(y);
    }
    tend[tid] = now();
    return NULL;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int bw(int reps) {
    NB = (size_t)768 << 20;
    buf = aligned_alloc(4096, NB);
    for (size_t i = 0; i < NB; i++)
        buf[i] = (int8_t)(i * 2654435761u >> 24);
    for (int i = 0; i < D; i++)
        X[i] = (int8_t)(i % 200 - 100);
    for (int i = 0; i < D / 32; i++)
        xs[i] = 0.01f;
    int64_t F = NB / (2 * D);
    idx = malloc(F * sizeof(int32_t));
    srand(1);
    for (int64_t j = 0; j < F; j++)
        if (rand() % 100 < 30)
            idx[nidx++] = (int32_t)j;
    const char *names[3] = {"plain read", "int8 dots rows", "sparse kv (30%)"};
    double g[2][64];
    reps = reps < 1 ? 1 : reps > 64 ? 64 : reps;
    for (mode = 0; mode < 3; mode++) {
        double bytes = mode < 2 ? (double)NB : (double)nidx * 2 * D;
        for (int r = 0; r < reps; r++)
            for (nthr = 1; nthr <= 2; nthr++) {       /* 1 and 2 threads alternate: drift hits both */
                pthread_t th;
                pthread_barrier_init(&bar, NULL, nthr);
                if (nthr == 2)
                    pthread_create(&th, NULL, bw_thread, (void *)1L);
                bw_thread(NULL);
                if (nthr == 2)
                    pthread_join(th, NULL);
                double s = tstart[0], e = tend[0];
                if (nthr == 2)
                    s = tstart[1] < s ? tstart[1] : s, e = tend[1] > e ? tend[1] : e;
                g[nthr - 1][r] = bytes / (e - s) / 1e9;
                pthread_barrier_destroy(&bar);
            }
        qsort(g[0], reps, sizeof(double), cmp);
        qsort(g[1], reps, sizeof(double), cmp);
        printf("%-16s 1 thread median %5.1f best %5.1f GB/s | 2 threads median %5.1f best %5.1f GB/s | %.2fx\n",
               names[mode], g[0][reps / 2], g[0][reps - 1], g[1][reps / 2], g[1][reps - 1], g[1][reps / 2] / g[0][reps / 2]);
    }
    return 0;
}

/* ---- alu: 1 vs 2 threads of pure arithmetic ------------------------------------------------------ */
static void *alu_thread(void *a) {
    (void)a;
    __m512 x[8], m = _mm512_set1_ps(0.99999f), c = _mm512_set1_ps(1e-6f);
    for (int j = 0; j < 8; j++)
        x[j] = _mm512_set1_ps(1.0f + j);
    for (long i = 0; i < 200000000L; i++)              /* 1.6e9 FMA vectors, ~0.25 s on one core */
        for (int j = 0; j < 8; j++)
            x[j] = _mm512_fmadd_ps(x[j], m, c);
    for (int j = 1; j < 8; j++)
        x[0] = _mm512_add_ps(x[0], x[j]);
    sink[0] = _mm512_reduce_add_ps(x[0]);
    return NULL;
}

static int alu(int reps) {
    double best[2] = {1e9, 1e9};
    for (int r = 0; r < reps; r++)
        for (int n = 1; n <= 2; n++) {
            pthread_t th;
            double t0 = now();
            if (n == 2)
                pthread_create(&th, NULL, alu_thread, NULL);
            alu_thread(NULL);
            if (n == 2)
                pthread_join(th, NULL);
            double dt = now() - t0;
            best[n - 1] = dt < best[n - 1] ? dt : best[n - 1];
            printf("alu pass %d, %d thread(s): %.3f s (each thread the same work)\n", r, n, dt);
        }
    printf("alu: 2 threads do %.2fx the work of 1 (best of %d passes each)\n", 2 * best[0] / best[1], reps);
    return 0;
}

static double dur, lostpct[2];
static void *jitter_thread(void *a) {
    int cpu = (int)(long)a;
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof s, &s);
    double t0 = now(), last = t0, lost = 0, mx = 0;
    long n = 0, n1 = 0;
    for (;;) {
        double t = now(), gap = t - last;
        last = t;
        if (gap > 20e-6)
            n++, lost += gap, mx = gap > mx ? gap : mx, n1 += gap > 1e-3;
        if (t - t0 > dur)
            break;
    }
    lostpct[cpu] = 100 * lost / dur;
    printf("cpu %d: %ld gaps > 20 us (%ld > 1 ms), lost %.1f ms of %.0f (%.1f%%), longest %.2f ms\n", cpu, n, n1,
           lost * 1e3, dur * 1e3, lostpct[cpu], mx * 1e3);
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "bw"))
        return bw(argc > 2 ? atoi(argv[2]) : 7);
    if (argc > 1 && !strcmp(argv[1], "alu"))
        return alu(argc > 2 ? atoi(argv[2]) : 3);
    if (argc > 1 && !strcmp(argv[1], "jitter")) {
        dur = argc > 2 ? atof(argv[2]) : 5;
        int n = argc > 4 ? atoi(argv[4]) : 2;          /* 1: CPU 0 alone (does a lone thread lose as much?) */
        pthread_t t[2];
        for (long i = 0; i < n && i < 2; i++)
            pthread_create(&t[i], NULL, jitter_thread, (void *)i);
        for (int i = 0; i < n && i < 2; i++)
            pthread_join(t[i], NULL);
        double lim = argc > 3 ? atof(argv[3]) : 100;
        return lostpct[0] > lim || lostpct[1] > lim;
    }
    fprintf(stderr, "usage: host_probe bw [passes] | alu [passes] | jitter [seconds] [max lost %% [threads 1|2]]\n");
    return 2;
}
