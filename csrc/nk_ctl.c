/* The decode's thread controller of the native backend (nk_forward in nk_rwkv7.c calls it around each
 * one-token step; the pool is nk_pool.c). */
#include <time.h>

#include "nk_model.h"

/* A host may not give two threads two CPUs: a VM whose vCPUs share cores with other guests ran two
 * spinning threads at ~1.3 CPUs in some minutes and at 2.0 in others (tools/host_probe.c jitter: 1 thread
 * lost ~1% of its time, 2 threads 20-50% each), and then a 2-thread 1.5B-shape step was 0.7-0.9x of one
 * thread's: every pool call waits for the thread that is off its CPU. The pool's stall guard (nk_pool.c)
 * reacts to single calls; this one measures whole steps: it keeps a running mean of the step time of the
 * mode in use (threads, or the caller alone), tries the other mode for CTL_TRY steps every `gap` steps
 * (gap doubles, CTL_GAP0 to CTL_GAP1, while tries lose by > 30%: ~0.5% of the steps run the slower mode
 * in a steady state) or at once when the mode in use has become slower than the other's last try, and
 * switches when a try (its best step) beats the running mean. Alone, the steps are one thread's floats. */
#define CTL_TRY 2
#define CTL_GAP0 32
#define CTL_GAP1 256

int nk_ctl_begin(nk_model *m) {
    if (!m->ctl.on || nk_pool_size(m->pool) == 1)
        return 0;
    if (!m->ctl.probing && (m->ctl.step >= m->ctl.next || (m->ctl.ew[!m->ctl.mode] > 0
                                                         && m->ctl.ew[m->ctl.mode] > m->ctl.ew[!m->ctl.mode])))
        m->ctl.probing = CTL_TRY, m->ctl.best = 1e30;
    int mode = m->ctl.probing ? !m->ctl.mode : m->ctl.mode;
    nk_pool_set_solo(m->pool, mode);
    return 1;
}

void nk_ctl_end(nk_model *m, double t) {
    int cur = m->ctl.mode;
    m->ctl.step++;
    if (!m->ctl.probing) {
        double *e = &m->ctl.ew[cur];
        *e = *e > 0 ? 0.75 * *e + 0.25 * t : t;
        return;
    }
    m->ctl.best = t < m->ctl.best ? t : m->ctl.best;
    if (--m->ctl.probing)
        return;
    m->ctl.ew[!cur] = m->ctl.best;
    if (m->ctl.best < m->ctl.ew[cur] || m->ctl.ew[cur] <= 0) {
        m->ctl.mode = !cur, m->ctl.gap = CTL_GAP0;
    } else if (m->ctl.best > 1.3 * m->ctl.ew[cur]) {
        m->ctl.gap = 2 * m->ctl.gap < CTL_GAP1 ? 2 * m->ctl.gap : CTL_GAP1;
    } else {
        m->ctl.gap = CTL_GAP0;
    }
    m->ctl.next = m->ctl.step + m->ctl.gap;
}

double nk_ctl_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

void nk_ctl_init(nk_model *m) { m->ctl.on = 1, m->ctl.next = 8, m->ctl.gap = CTL_GAP0; }   /* first try: step 8 */

/* on: the controller decides the decode steps' threads (the default); off: always the pool's threads */
void nk_model_adaptive(void *mp, int on) {
    nk_model *m = (nk_model *)mp;
    m->ctl.on = on;
    if (!on)
        nk_pool_set_solo(m->pool, 0);
}

