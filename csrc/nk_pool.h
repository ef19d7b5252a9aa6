/* Thread pool of the native backend (see nk_pool.c). */
#ifndef NK_POOL_H
#define NK_POOL_H

#include <stdint.h>

#define NK_MAXT 16

typedef struct nk_pool nk_pool;
/* fn(ctx, thread id, lo, hi): one thread's share [lo, hi) of a parallel call */
typedef void (*nk_task)(void *ctx, int tid, int64_t lo, int64_t hi);

nk_pool *nk_pool_new(int n);          /* n threads in all (the caller's counts as thread 0) */
int nk_pool_size(const nk_pool *p);
void nk_pool_run(nk_pool *p, nk_task fn, void *ctx, int64_t n);
/* the same over n items that are each one task (chunks of one: fn(ctx, tid, i, i + 1)), claimed in
 * order: a few unequal jobs (the decode's LoRA pairs), the largest first */
void nk_pool_run_items(nk_pool *p, nk_task fn, void *ctx, int64_t n);
void nk_pool_free(nk_pool *p);

/* Profiling build only (-DNK_PROF; never in the shipped library): the pool calls are timed per tag
 * (NK_TAG before a call: 0 r/k/v, 1 o, 2 predictor, 3 FFN, 4 head; 5 is a whole nk_forward, 6 the decode
 * time-mix between the r/k/v and o mat-vecs, 7 its LoRA and head calls), wall
 * time per call and busy time per thread, read with nk_prof_get (see nk_pool.c). Prefill only: 8 the
 * time-mix's token task (LoRAs, elementwise), 9 its head task (wkv, group norm); serial spans (wall only,
 * no pool call): 10 activation rounding, 11 layer norms + token shifts, 12 the predictor's per-token
 * prep, 13 the FFN's zeroing and summing of the threads' outputs; busy per thread inside the prefill
 * FFN's task: 14 key dots, 15 active neurons + predictor select, 16 value columns; in the time-mix's
 * token task: 17 LoRAs, 18 elementwise. 19 (NK_PROF_GUARD) the contention guard: stalls counted, solo
 * stretches started, calls run alone, s the caller waited on claimed chunks, worker sleeps, stalls with
 * the worker on the caller's CPU, s waited in stalls. nk_prof_events: every wait > 50 us (nk_pool.c). */
#define NK_PROF_GUARD 19
#define NK_PROF_TAGS 20
#ifdef NK_PROF
extern int nk_prof_tag;
double nk_prof_now(void);
void nk_prof_add(int tag, int tid, double wall, double busy);
int nk_prof_events(double *out);
#define NK_TAG(t) (nk_prof_tag = (t))
#define NK_SPAN0() double nk_span0 = nk_prof_now()
#define NK_SPAN(tag) (nk_prof_add((tag), -1, nk_prof_now() - nk_span0, 0), nk_span0 = nk_prof_now())
#define NK_SPAN_RESET() (nk_span0 = nk_prof_now())
#define NK_BUSY0() double nk_busy0 = nk_prof_now()
#define NK_BUSY(tag, tid) (nk_prof_add((tag), (tid), 0, nk_prof_now() - nk_busy0), nk_busy0 = nk_prof_now())
#else
#define NK_BUSY0() ((void)0)
#define NK_BUSY(tag, tid) ((void)0)
#define NK_SPAN_RESET() ((void)0)
#define NK_TAG(t) ((void)0)
#define NK_SPAN0() ((void)0)
#define NK_SPAN(tag) ((void)0)
#endif

#endif
