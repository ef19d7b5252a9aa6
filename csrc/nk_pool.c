/* A tiny thread pool for the native backend: nk_pool_run(pool, fn, ctx, n) cuts [0, n) into chunks
 * (multiples of 4 rows), every thread claims chunks until none is left, and the call returns when
 * all chunks are done. fn(ctx, tid, lo, hi) may run several times per thread (tasks accumulate).
 *
 * Why chunks that are claimed, not one share per thread: on a shared machine a worker may not be
 * running when a call starts; the calling thread then takes its chunks instead of waiting for it.
 * The claim counter packs (job generation, number of chunks, next chunk) in one 64-bit atomic, so a
 * worker that wakes late can never take a chunk of a later job with an earlier job's arguments: its
 * compare-and-swap fails. A decode step makes ~5 calls per layer, microseconds apart, so workers
 * spin (with pause) for a while before sleeping on a condition variable. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "nk_pool.h"

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

#ifdef NK_PROF
#include <string.h>
#include <time.h>
int nk_prof_tag;
static double nk_prof_ev[4096][8];
static int nk_prof_nev;
/* out (4096, 8): waits > 50 us (start s, wait s, caller's own work s, tag, worker cpu, caller cpu, call, worker
 * woke from sleep at its call); returns the count, then cleared */
int nk_prof_events(double *out) {
    int n = nk_prof_nev;
    memcpy(out, nk_prof_ev, n * sizeof nk_prof_ev[0]);
    nk_prof_nev = 0;
    return n;
}
static double prof[NK_PROF_TAGS][2 + NK_MAXT];   /* per tag: calls, wall s, busy s per thread */
double nk_prof_now(void) { return now_s(); }
void nk_prof_add(int tag, int tid, double wall, double busy) {
    if (wall > 0)
        prof[tag][0] += 1, prof[tag][1] += wall;
    if (tid >= 0)
        prof[tag][2 + tid] += busy;         /* each thread its own slot */
}
/* out (NK_PROF_TAGS, 2 + NK_MAXT) doubles; then zeroed */
void nk_prof_get(double *out) {
    memcpy(out, prof, sizeof prof);
    memset(prof, 0, sizeof prof);
}
#define PROF_T0() double pt0 = nk_prof_now()
#define PROF_BUSY(tag, tid) nk_prof_add(tag, tid, 0, nk_prof_now() - pt0)
#else
#define PROF_T0() ((void)0)
#define PROF_BUSY(tag, tid) ((void)0)
#endif

#ifndef NK_CPT
#define NK_CPT 4            /* chunks per thread of a call (shrinking chunks, the last 1/16 of a thread's share,
                             * waited no less: 0.41-0.45 vs 0.40-0.50 ms a 1.5B step in claimed chunks at 2
                             * threads, and the neurons' split varied more between runs) */
#endif
#ifndef NK_SOLO
#define NK_SOLO 256         /* calls the caller runs alone after a stall (0: never); doubled per stall that
                             * follows within NK_SOLO_CLEAN calls, up to NK_SOLO_MAX */
#endif
#define NK_SOLO_MAX 4096
#define NK_SOLO_GRACE 64    /* calls after a solo stretch that count no stall (a sleeping worker wakes slowly) */
#define NK_SOLO_CLEAN 4096
#ifndef NK_SOLO_PAIR
#define NK_SOLO_PAIR 128    /* NK_SOLO_STALLS stalls within this many calls: the caller runs alone */
#endif
#ifndef NK_SOLO_STALLS
#define NK_SOLO_STALLS 2    /* >= 2 */
#endif
#define NK_STALL 200e-6     /* s: a wait for claimed chunks longer than this (and than half the caller's
                             * own work in the call) is a stall */
#ifndef NK_SPIN_S
#define NK_SPIN_S 0.45e-3   /* s a worker spins (with pause) before sleeping: a clock, not a count of pauses
                             * (20000 were 0.45 ms on this AMD host, a pause lasts ~3x longer on some Intel) */
#endif
#define IDX_BITS 20
#define IDX_MASK ((1ull << IDX_BITS) - 1)

struct nk_pool {
    int n;
    pthread_t th[NK_MAXT];
    atomic_uint_fast64_t claim;       /* gen << 40 | nchunks << 20 | next chunk */
    atomic_int done, quit;
    atomic_uint gen;                  /* bumped per job: wakes the workers */
    nk_task fn;
    void *ctx;
    int64_t total, csize;
    uint64_t calls, solo_until, solo_len;   /* contention guard (run): calls made; alone until this one; for how long */
    uint64_t stalls[NK_SOLO_STALLS - 1];    /* the calls of the last stalls (a ring) */
    int nstall;
    int tag, wcpu;                    /* NK_PROF: the call's tag; the CPU of a worker's last chunk */
    unsigned wsleep;                  /* NK_PROF: the job a worker last woke from sleep for */
    double t0;
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

/* claim and run chunks of the current job until none is left */
static void work(nk_pool *p, int tid) {
#ifdef NK_PROF
    int first = tid > 0;
#endif
    for (;;) {
        uint64_t v = atomic_load(&p->claim);
        uint64_t nch = (v >> IDX_BITS) & IDX_MASK, i = v & IDX_MASK;
        if (i >= nch)
            return;
        if (!atomic_compare_exchange_weak(&p->claim, &v, v + 1))
            continue;
        /* the job cannot change before this chunk is counted done: its fields are stable */
        int64_t lo = (int64_t)i * p->csize, hi = lo + p->csize < p->total ? lo + p->csize : p->total;
        PROF_T0();
#ifdef NK_PROF
        if (first)      /* a worker's start delay after the call began (slot NK_MAXT + 1) */
            prof[p->tag][1 + NK_MAXT] += pt0 - p->t0, first = 0;
        p->wcpu = sched_getcpu();            /* where the worker ran its chunk (nk_prof_events) */
#endif
        p->fn(p->ctx, tid, lo, hi);
        PROF_BUSY(p->tag, tid);
        atomic_fetch_add(&p->done, 1);
    }
}

typedef struct {
    nk_pool *p;
    int tid;
} worker_arg;

static void *worker(void *arg) {
    worker_arg *wa = (worker_arg *)arg;
    nk_pool *p = wa->p;
    int tid = wa->tid;
    unsigned seen = 0;
    free(wa);
    for (;;) {
        unsigned g = atomic_load(&p->gen);
        if (g == seen) {
            double t0 = now_s();
            for (int s = 1; g == seen; s++) {
                cpu_relax();
                g = atomic_load(&p->gen);
                if (!(s & 255) && now_s() - t0 > NK_SPIN_S)
                    break;
            }
        }
        if (g == seen) {
#ifdef NK_PROF
            prof[NK_PROF_GUARD][4] += 1;        /* a worker's sleeps */
#endif
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load(&p->gen)) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            pthread_mutex_unlock(&p->mu);
#ifdef NK_PROF
            p->wsleep = g;
#endif
        }
        seen = g;
        if (atomic_load(&p->quit))
            return NULL;
        work(p, tid);
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

/* [0, n) in chunks of cs (cs 0: about four chunks per thread, multiples of 4 rows) */
static void run(nk_pool *p, nk_task fn, void *ctx, int64_t n, int64_t cs) {
    if (n <= 0)
        return;
#ifdef NK_PROF
    double w0 = nk_prof_now();
#endif
    /* Contention guard: when another process holds a core, a worker that claimed a chunk can be
     * descheduled for a whole time slice (ms) and every call waits for it; 2 threads then ran a
     * 1.5B-shape decode step in 40-50 ms against 18 quiet and 31 on one thread. After such a stall
     * the caller runs the next NK_SOLO calls alone (the worker sleeps and leaves its core to the
     * other process), then tries the threads again; stalls in a row double the calls alone (a
     * process that stays: mostly one thread), a clean stretch resets them. */
    int solo = p && p->n > 1 && ++p->calls < p->solo_until;
    if (!p || p->n == 1 || n < (cs ? 2 : 16) || solo) {
        fn(ctx, 0, 0, n);
#ifdef NK_PROF
        nk_prof_add(nk_prof_tag, 0, nk_prof_now() - w0, nk_prof_now() - w0);
        if (solo)
            prof[NK_PROF_GUARD][2] += 1;        /* calls run alone by the guard */
#endif
        return;
    }
    int64_t nch = NK_CPT * p->n;
    if (!cs)
        cs = ((n + nch - 1) / nch + 3) / 4 * 4;     /* ~NK_CPT chunks per thread */
    nch = (n + cs - 1) / cs;
    pthread_mutex_lock(&p->mu);
    p->fn = fn, p->ctx = ctx, p->total = n, p->csize = cs;
#ifdef NK_PROF
    p->tag = nk_prof_tag, p->t0 = w0;
#endif
    atomic_store(&p->done, 0);
    unsigned g = atomic_fetch_add(&p->gen, 1) + 1;
    atomic_store(&p->claim, ((uint64_t)(g & 0xffffff) << 40) | ((uint64_t)nch << IDX_BITS));
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    double t0 = NK_SOLO ? now_s() : 0;
    work(p, 0);
    /* only chunks already claimed are left: a worker descheduled in one needs a core, so after a
     * short spin give ours up */
    if (atomic_load(&p->done) < nch) {
        double t1 = NK_SOLO ? now_s() : 0;
        for (int s = 0; atomic_load(&p->done) < nch; s++) {
            if (s < 2000)
                cpu_relax();
            else
                sched_yield();
        }
        if (NK_SOLO) {
            double w = now_s() - t1;
            /* NK_SOLO_STALLS stalls within NK_SOLO_PAIR calls: one alone is often a worker waking from sleep */
            int stalled = w > NK_STALL && w > 0.5 * (t1 - t0)
                          && (!p->solo_len || p->calls > p->solo_until + NK_SOLO_GRACE);
#ifdef NK_PROF
            prof[NK_PROF_GUARD][0] += stalled;  /* stalls counted */
            prof[NK_PROF_GUARD][3] += w;        /* time waited on claimed chunks */
            prof[NK_PROF_GUARD][5] += stalled && p->wcpu == sched_getcpu();   /* stalls with both on one CPU */
            prof[NK_PROF_GUARD][6] += stalled ? w : 0;                       /* time waited in stalls */
            if (w > 50e-6 && nk_prof_nev < 4096) {   /* the long waits, for nk_prof_events */
                double *e = nk_prof_ev[nk_prof_nev++];
                e[0] = t1, e[1] = w, e[2] = t1 - t0, e[3] = p->tag, e[4] = p->wcpu, e[5] = sched_getcpu(), e[6] = p->calls;
                e[7] = p->wsleep == g;
            }
#endif
            /* the stall NK_SOLO_STALLS - 1 before this one (0: none yet) */
            uint64_t prev = p->stalls[(p->nstall + 1) % (NK_SOLO_STALLS - 1)];
            if (stalled && prev && p->calls - prev < NK_SOLO_PAIR) {
#ifdef NK_PROF
                prof[NK_PROF_GUARD][1] += 1;    /* solo stretches started */
#endif
                uint64_t len = p->solo_len && p->calls < p->solo_until + NK_SOLO_CLEAN ? 2 * p->solo_len : NK_SOLO;
                p->solo_len = len < NK_SOLO_MAX ? len : NK_SOLO_MAX;
                p->solo_until = p->calls + p->solo_len;
            }
            if (stalled)
                p->stalls[p->nstall = (p->nstall + 1) % (NK_SOLO_STALLS - 1)] = p->calls;
        }
    }
#ifdef NK_PROF
    nk_prof_add(p->tag, -1, nk_prof_now() - w0, 0);
#endif
}

void nk_pool_run(nk_pool *p, nk_task fn, void *ctx, int64_t n) { run(p, fn, ctx, n, 0); }

void nk_pool_run_items(nk_pool *p, nk_task fn, void *ctx, int64_t n) { run(p, fn, ctx, n, 1); }

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

/* ---- for the tests (tests/test_native_threads.py): the contention guard ---------------------------- */
typedef struct {
    int64_t *owner;            /* (n,) the thread that ran each item */
    int stall;                 /* a worker's chunk sleeps 2 ms: a descheduled worker */
} guard_ctx;

static void guard_task(void *c, int tid, int64_t lo, int64_t hi) {
    guard_ctx *g = (guard_ctx *)c;
    if (g->stall && tid > 0) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    for (int64_t i = lo; i < hi; i++) {
        double t = now_s();
        while (now_s() - t < 1e-6)      /* ~1 us an item: a worker awake has time to take chunks */
            ;
        g->owner[i] = tid;
    }
}

/* calls: that many pool calls over n items on a pool of `threads`; the first two with a stalling worker.
 * owner (calls, n): the thread that ran each item of each call (-1: none). Returns 0. */
int nk_test_pool_guard(int threads, int64_t calls, int64_t n, int64_t *owner) {
    nk_pool *p = nk_pool_new(threads);
    if (!p)
        return -1;
    for (int64_t c = 0; c < calls; c++) {
        guard_ctx g = {owner + c * n, c < 2};
        for (int64_t i = 0; i < n; i++)
            g.owner[i] = -1;
        if (c < 2)                  /* a worker must take a chunk of these calls: wait until one did */
            for (int tries = 0; tries < 100; tries++) {
                nk_pool_run(p, guard_task, &g, n);
                int any = 0;
                for (int64_t i = 0; i < n; i++)
                    any |= g.owner[i] > 0;
                if (any)
                    break;
            }
        else
            nk_pool_run(p, guard_task, &g, n);
    }
    nk_pool_free(p);
    return 0;
}
