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
void nk_pool_free(nk_pool *p);

#endif
