/* The decode's thread controller of the native backend (nk_forward in nk_rwkv7.c calls it around each
 * one-token step; the pool is nk_pool.c). */
#include <time.h>

#include "nk_model.h"

/* A host may not give two threads two CPUs: a VM whose vCPUs share cores with other guests ran two
 * spinning threads at ~1.3 CPUs in some minutes and at 2.0 in others (tools/host_probe.c jitter: 1 thread
 * lost ~1% of its time, 2 threads 20-50% each), and then a 2-thread 1.5B-shape step was 0.7-0.9x of one
 * thread's: every pool call waits for the thread that is off its CPU. The pool's stall guard (nk_pool.c)
 * reacts to single calls; this one measures whole steps. It keeps a running mean of the step time of the
 * mode in use (threads, or the caller alone; a step longer than 1.5x the mean counts as 1.5x: a stall
 * must not decide alone), tries the other mode for CTL_TRY steps (their median) every `gap` steps (gap
 * doubles, CTL_GAP0 to CTL_GAP1, while tries lose by > 30%: ~1% of the steps run the slower mode in a
 * steady state) or at once when the mean of the mode in use exceeds the other's last try by 10%, and
 * switches when a try beats the mean by 5%. Alone, the steps are one thread's floats. */
#define CTL_TRY 3
#define CTL_GAP0 32
#define CTL_GAP1 256

int nk_ctl_begin(nk_model *m) {
    if (!m->ctl.on || nk_pool_size(m->pool) == 1)
        return 0;
    int cur = m->ctl.mode;
    if (!m->ctl.probing && (m->ctl.step >= m->ctl.next || (m->ctl.ew[!cur] > 0 && m->ctl.ew[cur] > 1.1 * m->ctl.ew[!cur])))
        m->ctl.probing = CTL_TRY;
    nk_pool_set_solo(m->pool, m->ctl.probing ? !cur : cur);
    return 1;
}

void nk_ctl_end(nk_model *m, double t) {
    int cur = m->ctl.mode;
    m->ctl.step++;
    if (!m->ctl.probing) {
        double *e = &m->ctl.ew[cur];
        *e = *e > 0 ? 0.75 * *e + 0.25 * (t < 1.5 * *e ? t : 1.5 * *e) : t;
        return;
    }
    m->ctl.try[CTL_TRY - m->ctl.probing] = t;
    if (--m->ctl.probing)
        return;
    double *a = m->ctl.try, med = a[0] > a[1] ? (a[1] > a[2] ? a[1] : (a[0] < a[2] ? a[0] : a[2]))
                                                : (a[0] > a[2] ? a[0] : (a[1] < a[2] ? a[1] : a[2]));
    m->ctl.ew[!cur] = med;
    if (m->ctl.ew[cur] <= 0 || med < 0.95 * m->ctl.ew[cur]) {
        m->ctl.mode = !cur, m->ctl.gap = CTL_GAP0;
    } else if (med > 1.3 * m->ctl.ew[cur]) {
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

