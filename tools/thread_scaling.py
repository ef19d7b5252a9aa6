"""Thread scaling of the native decode in ONE process: the same model file opened with a 1-thread and an
N-thread pool (and, with --base-lib, the same two on another build of the C library), rounds of each
configuration interleaved (order rotated each round) so host noise hits all alike; prints per
configuration the median and mean ms/token (per-token times over all rounds: a mean far above the
median is stalls), and NT / 1T as the ratio of medians and the median of the per-round ratios.

    flock -x /work/wt/bench.lock python tools/thread_scaling.py --workdir /work/art/shape \\
        [--modes dense,exact,sets,sparse] [--threads 2] [--tokens 16] [--rounds 8] [--base-lib OTHER/_nk*.so] \\
        [--probe /tmp/host_probe]       # tools/host_probe.c: rounds on a host that gave 2 CPUs, and the others

Files: tools/bench.py --shape 1.5b --native --shape-predictor-bits 2 --workdir W builds them
(W/synthetic-1.5b-int8.rwkve, its .pred2.npz, W/ref58m-active-sets.npz). Modes as the bench's native rows:
dense (every key and value row), exact (every key row, the replayed sets' value rows), sets (the
replayed sets alone), sparse (the sets + the 2-bit predictor scored every token). Hold the bench lock.
"""
import argparse
import ctypes
import os
import re
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _open(workdir, shape, mode, threads):
    """The native model of bench.py's row `mode` on the shape's files, with a pool of `threads`."""
    from rwkv_edge.backends import native
    from rwkv_edge.replay import ReplayedSets
    from rwkv_edge.runtime import open_model
    native.set_num_threads(threads)
    path = os.path.join(workdir, f"synthetic-{shape}-int8.rwkve")
    m = open_model(path, backend="native", predictors=path + ".pred2.npz" if mode == "sparse" else None)
    if mode == "dense":
        return m.with_ffn_mode("dense")
    sets = ReplayedSets.from_file(os.path.join(workdir, "ref58m-active-sets.npz"), m)
    return m.with_sets(sets, all_keys=mode == "exact")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/work/art/shape")
    ap.add_argument("--shape", default="1.5b")
    ap.add_argument("--modes", default="dense,exact,sets,sparse")
    ap.add_argument("--threads", type=int, default=2, help="the pool compared with one thread")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--base-lib", help="also run every configuration on this build of the C library")
    ap.add_argument("--lib", help="run this build as 'new' instead of the checkout's (a -DNK_PROF build: the "
                    "pool's contention guard counted per configuration, see tools/native_phases.py)")
    ap.add_argument("--probe", help="a build of tools/host_probe.c: before each round it spins two threads 0.1 s "
                    "(jitter); rounds where a CPU lost more than --capped %% of it are counted apart")
    ap.add_argument("--capped", type=float, default=5.0)
    args = ap.parse_args(argv)
    from rwkv_edge.backends import native
    libs = {"new": native.bind_library(args.lib) if args.lib else None}
    if args.base_lib:
        libs["base"] = native.bind_library(args.base_lib)
    cfgs = {}
    for mode in args.modes.split(","):
        for t in (1, args.threads):
            for lname, lib in libs.items():
                m = _open(args.workdir, args.shape, mode, t)
                cfgs[(mode, t, lname)] = m.with_library(lib) if lib is not None else m
    names = list(cfgs)
    rng = np.random.default_rng(2)
    V = cfgs[names[0]].config.vocab_size
    prompt, toks = rng.integers(0, V, 16).tolist(), rng.integers(0, V, args.tokens).tolist()
    for m in cfgs.values():                     # warm-up: pages, caches
        _, s = m.forward(prompt)
        for t in toks[:4]:
            _, s = m.step(t, s)
    per_tok = {k: [] for k in names}
    guard, prof = {k: np.zeros(7) for k in names}, np.zeros((20, 18))     # nk_pool.h NK_PROF_TAGS, NK_PROF_GUARD
    counted = {n: ctypes.CDLL(os.path.abspath(p)) for n, p in (("new", args.lib), ("base", args.base_lib))
               if p and hasattr(ctypes.CDLL(os.path.abspath(p)), "nk_prof_get")}
    per_round = {k: [] for k in names}
    lost = {k: [] for k in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in (order if r % 2 == 0 else order[::-1]):
            m = cfgs[k]
            if args.probe and k[1] > 1:     # the host's 2-thread capacity now: % of 0.1 s a CPU ran something else
                out = subprocess.run([args.probe, "jitter", "0.1"], capture_output=True, text=True).stdout
                lost[k].append(max(float(x) for x in re.findall(r"\(([0-9.]+)%\)", out)))
            _, s = m.forward(prompt)
            if k[2] in counted:
                counted[k[2]].nk_prof_get(ctypes.c_void_p(prof.ctypes.data))         # reset
            t0 = time.perf_counter()
            for t in toks:
                t1 = time.perf_counter()
                _, s = m.step(t, s)
                per_tok[k].append((time.perf_counter() - t1) * 1e3)
            per_round[k].append((time.perf_counter() - t0) / len(toks) * 1e3)
            if k[2] in counted:
                counted[k[2]].nk_prof_get(ctypes.c_void_p(prof.ctypes.data))
                guard[k] += prof[19][:7]
    for k in names:
        a = np.array(per_tok[k])
        print(f"{k[0]:6s} {k[1]}T {k[2]:4s}  median {np.median(a):7.2f} ms/token  mean {a.mean():7.2f}  "
              f"p90 {np.percentile(a, 90):7.2f}  max {a.max():7.2f}  ({1e3 / np.median(a):5.1f} tok/s; rounds' "
              f"median {1e3 / np.median(per_round[k]):5.1f} tok/s)")
        if k[2] in counted and k[1] > 1:
            g = guard[k]
            print(f"    guard: {g[0]:.0f} stalls, {g[1]:.0f} solo stretches, {g[2] / len(a):.1f} calls alone a token, "
                  f"caller waited on claimed chunks {g[3] / len(a) * 1e3:.3f} ms a token ({g[6] / len(a) * 1e3:.3f} "
                  f"in stalls); stalls on one CPU {g[5]:.0f}; worker sleeps {g[4] / len(a):.2f} a token")
    T = args.threads
    for mode in args.modes.split(","):
        for lname in libs:
            one, many = (mode, 1, lname), (mode, T, lname)
            pr = np.array(per_round[one]) / np.array(per_round[many])
            split = ""
            if args.probe:
                print(f"{mode:6s} {lname:4s} host probe before each {T}T round, % lost by the worse CPU: "
                      f"{' '.join(f'{x:.1f}' for x in lost[many])}")
                ok = np.array(lost[many]) <= args.capped
                split = (f"; rounds with both CPUs (<= {args.capped:g}% lost) {np.median(pr[ok]) if ok.any() else float('nan'):.3f}"
                         f" ({ok.sum()}), the others {np.median(pr[~ok]) if (~ok).any() else float('nan'):.3f} ({(~ok).sum()})")
            print(f"{mode:6s} {lname:4s} {T}T / 1T: medians of tokens {np.median(per_tok[one]) / np.median(per_tok[many]):.3f}"
                  f"  median of per-round ratios {np.median(pr):.3f} [{pr.min():.2f}-{pr.max():.2f}]{split}")
        if "base" in libs:
            for t in (1, T):
                d = np.median(per_round[(mode, t, "base")]) / np.median(per_round[(mode, t, "new")])
                print(f"{mode:6s} {t}T base / new (rounds' medians): {d:.3f}x")


if __name__ == "__main__":
    main()
