/* A tiny thread pool for the native backend: nk_pool_run(pool, fn, ctx, n) runs fn(ctx, tid, lo, hi)
 * on every thread over a split of [0, n) (cut at multiples of 4 rows) and returns when all are done.
 *
 * A decode step makes ~5 parallel calls per layer, tens of microseconds apart, so workers spin
 * (with pause) on a generation counter for a while after each call before sleeping on a condition
 * variable: a wake-up through the kernel costs more than the work of one call at 58M. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "nk_pool.h"

#define NK_SPIN 200000

struct nk_pool {
    int n;
    pthread_t th[NK_MAXT];
    atomic_int gen, done, quit;
    nk_task fn;
    void *ctx;
    int64_t total;
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void split(int64_t n, int nt, int tid, int64_t *lo, int64_t *hi) {
    *lo = (n * tid / nt) / 4 * 4;
    *hi = tid == nt - 1 ? n : (n * (tid + 1) / nt) / 4 * 4;
}

typedef struct {
    nk_pool *p;
    int tid;
} worker_arg;

static void *worker(void *arg) {
    worker_arg *wa = (worker_arg *)arg;
    nk_pool *p = wa->p;
    int tid = wa->tid, seen = 0;
    free(wa);
    for (;;) {
        int g = atomic_load(&p->gen);
        for (int s = 0; s < NK_SPIN && g == seen; s++) {
            cpu_relax();
            g = atomic_load(&p->gen);
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (atomic_load(&p->quit))
            return NULL;
        int64_t lo, hi;
        split(p->total, p->n, tid, &lo, &hi);
        if (lo < hi)
            p->fn(p->ctx, tid, lo, hi);
        atomic_fetch_add(&p->done, 1);
    }
}

nk_pool *nk_pool_new(int n) {
    nk_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->n = n < 1 ? 1 : (n > NK_MAXT ? NK_MAXT : n);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    for (int t = 1; t < p->n; t++) {
        worker_arg *wa = malloc(sizeof *wa);
        wa->p = p, wa->tid = t;
        if (pthread_create(&p->th[t], NULL, worker, wa) != 0) {   /* fewer threads, still correct */
            free(wa);
            p->n = t;
            break;
        }
    }
    return p;
}

int nk_pool_size(const nk_pool *p) { return p ? p->n : 1; }

void nk_pool_run(nk_pool *p, nk_task fn, void *ctx, int64_t n) {
    if (!p || p->n == 1 || n < 8 * p->n) {
        if (n > 0)
            fn(ctx, 0, 0, n);
        return;
    }
    pthread_mutex_lock(&p->mu);
    p->fn = fn, p->ctx = ctx, p->total = n;
    atomic_store(&p->done, 0);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    int64_t lo, hi;
    split(n, p->n, 0, &lo, &hi);
    if (lo < hi)
        fn(ctx, 0, lo, hi);
    while (atomic_load(&p->done) < p->n - 1)
        cpu_relax();
}

void nk_pool_free(nk_pool *p) {
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->quit, 1);
    atomic_fetch_add(&p->gen, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int t = 1; t < p->n; t++)
        pthread_join(p->th[t], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p);
}
