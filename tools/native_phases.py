"""Per-phase time and bytes of the native decode at 1.5B shapes (tools/bench.py --shape 1.5b files), from
a profiling build of csrc/ (-DNK_PROF: nk_pool.c times every pool call per tag, wall and busy time per
thread, and the worker's start delay; the shipped library has none of it):

    cd csrc && gcc -O3 -std=gnu11 -fno-math-errno -fno-trapping-math -pthread -fPIC -shared -DNK_PROF \\
        nk_kernels.c nk_rwkv7.c nk_ffn.c nk_q4.c nk_pred.c nk_prefill.c nk_prefill_kernels.c nk_prefill_elem.c \\
        nk_dense.c nk_head.c nk_lora.c nk_pool.c \\
        -o /tmp/_nk_prof.so -lm
    flock -x /work/wt/bench.lock python tools/native_phases.py --lib /tmp/_nk_prof.so --threads 2 --mode sparse

Prefill of the reference model instead (--prefill T: one forward of T tokens, median of --rounds; int8 or
int4 file, dense or --mode sparse with a bundle; the time-mix split in its token and head tasks, and the
serial spans between pool calls: rounding, layer norms + shifts, predictor prep, output sums):

    flock -x /work/wt/bench.lock python tools/native_phases.py --lib /tmp/_nk_prof.so --threads 2 \
        --prefill 512 --model /work/art/ref-int4h8.rwkve --predictors /work/art/q2.npz --mode sparse

Decode of a model file instead of the 1.5B shapes (--model FILE, a bundle for --mode sparse; --ffn dense for
the every-row FFN, --head-rescore K for the rescored head; "head" then covers both passes):

    flock -x /work/wt/bench.lock python tools/native_phases.py --lib /tmp/_nk_prof.so --threads 1 \
        --model /work/art/ref-int4h8.rwkve --predictors /work/art/q2.npz --mode sparse --tokens 128

Modes: rows (every key and value row: bench's "native dense"), dense (the default exact FFN), sets (the replayed active sets), sparse (the sets + the 2-bit predictor scored). GB/s per
phase = its weight bytes / its wall time (rkv, o, head: all rows; pred: codes + scales + zeros; ffn: the
key rows and value columns read (stats); tmix: the LoRAs, whose per-head wkv state traffic is not
counted; heads: the wkv state read and written). "serial" is the forward's time outside pool calls (a mean
over the tokens, as every phase: compare it with the mean step, not the median). Hold the bench lock.
"""
import argparse
import ctypes
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TAGS = {0: "rkv", 1: "o", 2: "pred", 3: "ffn", 4: "head", 7: "tmix", 9: "heads"}   # nk_pool.h NK_TAG
# (decode: "tmix" the LoRA pool call, "heads" the per-head elementwise + wkv + group norm after it)
PRE_TAGS = {0: "rkv", 1: "o", 3: "ffn", 4: "head", 8: "tm-tok", 9: "tm-head", 11: "ln+shift"}
FFN_PARTS = {14: "ffn keys", 15: "ffn active+pred", 16: "ffn values", 17: "tm-tok LoRAs",
             18: "tm-tok elementwise"}                             # busy per thread inside "ffn", "tm-tok"
SPANS = {10: "round", 12: "predprep", 13: "sums"}
DECODE_SPANS = {10: "rounding", 11: "norms + shifts", 12: "predictor prep + merge, set copy", 13: "sums + zeroing"}     # serial, wall only (older builds: 11 too)
GUARD = 19                                                              # nk_pool.h NK_PROF_GUARD
NTAGS = 20                                                              # nk_pool.h NK_PROF_TAGS


def prefill(args):
    """Per-phase wall and per-thread busy ms of one prefill forward of --prefill tokens (medians of rounds)."""
    import ctypes
    from rwkv_edge.backends import native
    from rwkv_edge.runtime import open_model
    native.set_num_threads(args.threads)
    m = open_model(args.model, backend="native", predictors=args.predictors if args.mode == "sparse" else None)
    m = m.with_library(native.bind_library(args.lib))
    lib = ctypes.CDLL(os.path.abspath(args.lib))
    lib.nk_prof_get.argtypes = [ctypes.c_void_p]
    prof = np.zeros((NTAGS, 18))
    rng = np.random.default_rng(3)
    toks = rng.integers(0, m.config.vocab_size, args.prefill).tolist()
    m.forward(toks)
    profs, ts = [], []
    for _ in range(args.rounds):
        lib.nk_prof_get(prof.ctypes.data)
        t0 = time.perf_counter()
        m.forward(toks)
        ts.append(time.perf_counter() - t0)
        lib.nk_prof_get(prof.ctypes.data)
        profs.append(prof.copy())
    P = np.median(np.array(profs), axis=0) * 1e3
    n = args.prefill
    print(f"threads {args.threads} {args.mode} prefill {n}: median {np.median(ts) * 1e3:.1f} ms "
          f"({n / np.median(ts):.0f} tok/s)")
    for i, name in PRE_TAGS.items():
        if P[i][0]:
            busy = " ".join(f"{b:6.2f}" for b in P[i][2:2 + args.threads])
            print(f"  {name:8s} {P[i][0] / 1e3:5.0f} calls {P[i][1]:7.2f} ms  busy per thread ms {busy}  "
                  f"worker start delay {P[i][17]:.2f} ms")
    for i, name in FFN_PARTS.items():
        busy = " ".join(f"{b:6.2f}" for b in P[i][2:2 + args.threads])
        print(f"    {name:18s} busy per thread ms {busy}")
    for i, name in SPANS.items():
        if P[i][0]:
            print(f"  {name:8s} serial {P[i][1]:7.2f} ms")
    pooled = sum(P[i][1] for i in list(PRE_TAGS) + list(SPANS))
    print(f"  other serial {P[5][1] - pooled:.2f} ms of {P[5][1]:.2f} ms per forward")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lib", required=True, help="a -DNK_PROF build of csrc/")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=["rows", "dense", "sets", "sparse"], default="sparse")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--workdir", default="/work/art/shape")
    ap.add_argument("--prefill", type=int, default=0, help="time a prefill of this many tokens instead")
    ap.add_argument("--model", help="--prefill: the model file")
    ap.add_argument("--predictors", help="--prefill --mode sparse: the bundle")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--ffn", choices=["exact", "dense"], default="exact", help="decode of --model: the FFN without bundle")
    ap.add_argument("--head-rescore", type=int, default=0, help="decode of --model: the rescored head's K")
    ap.add_argument("--events", action="store_true", help="decode: list every wait > 50 us for claimed chunks")
    args = ap.parse_args(argv)
    if args.prefill:
        return prefill(args)
    from rwkv_edge.backends import native
    from rwkv_edge.replay import ReplayedSets
    from rwkv_edge.runtime import open_model
    w = args.workdir
    native.set_num_threads(args.threads)
    if args.model:                                         # a model file's decode: its own sets
        m = open_model(args.model, backend="native", predictors=args.predictors if args.mode == "sparse" else None)
        if args.ffn == "dense" and args.mode != "sparse":
            m = m._variant(ffn="dense")
        if args.head_rescore:
            m = m.with_head_rescore(args.head_rescore)
    else:
        path = os.path.join(w, "synthetic-1.5b-int8.rwkve")
        m = open_model(path, backend="native", predictors=path + ".pred2.npz" if args.mode == "sparse" else None)
    if args.mode == "rows":                                # every key and value row (csrc/nk_dense.c)
        m = m.with_ffn_mode("dense")
    elif args.mode != "dense" and not args.model:
        m = m.with_sets(ReplayedSets.from_file(os.path.join(w, "ref58m-active-sets.npz"), m))
    m = m.with_library(native.bind_library(args.lib))
    lib = ctypes.CDLL(os.path.abspath(args.lib))          # the same loaded object: its counters
    lib.nk_prof_get.argtypes = [ctypes.c_void_p]
    prof = np.zeros((NTAGS, 18))                           # NK_PROF_TAGS x (calls, wall, busy[16])
    rng = np.random.default_rng(2)
    V, n = m.config.vocab_size, args.tokens
    toks = rng.integers(0, V, n).tolist()
    _, s = m.forward(rng.integers(0, V, 16).tolist())
    for t in toks[:3]:
        _, s = m.step(t, s)
    lib.nk_prof_get(prof.ctypes.data)                      # reset
    ev = np.zeros((4096, 8))
    lib.nk_prof_events(ctypes.c_void_p(ev.ctypes.data))
    ts, rows, out = [], 0, []
    acc, one = np.zeros_like(prof), np.zeros_like(prof)
    for t in toks:                                         # counters read (and reset) per token: the
        t0 = time.perf_counter()                           # time outside the C forward, token by token
        _, s = m.step(t, s)
        ts.append(time.perf_counter() - t0)
        lib.nk_prof_get(one.ctypes.data)
        acc += one
        out.append(ts[-1] - one[5][1])
        rows += int(m.last_stats.sum())
    prof = acc
    c = m.config
    D, L, F = c.n_embd, c.n_layer, c.ffn_dim
    q = 0.5625 if str(getattr(m, "modelfile_dtype", "int8")).startswith("int4") else 1.0   # bytes a weight
    head = c.vocab_size * D * (0.5625 if args.head_rescore else 1.0) + min(args.head_rescore, c.vocab_size) * D
    byts = {0: 3 * D * D * L * q, 1: D * D * L * q, 2: F * (D // 4 + 4 * (D // 64)) * L if args.mode == "sparse" else 0,
            3: rows / n * D * q, 4: head, 7: 2 * D * (96 + 96 + 256 + 64) * L,
            9: 2 * L * D * c.head_size * 4}                # the wkv state read and written
    if args.model:                                         # its own LoRAs (the line above: 1.5B shapes)
        byts[7] = sum(a.nbytes for k, a in m._t.items() if k.endswith(".qc") and ".att." in k)
    print(f"threads {args.threads} {args.mode}: median {np.median(ts) * 1e3:.2f} ms/token (mean {np.mean(ts) * 1e3:.2f}); "
          f"outside the C forward (Python, ctypes): median {np.median(out) * 1e6:.0f} us a token (mean {np.mean(out) * 1e6:.0f})")
    for i, name in TAGS.items():
        calls, wall = prof[i][0] / n, prof[i][1] / n
        if calls:
            busy = " ".join(f"{b * 1e3:6.2f}" for b in prof[i][2:2 + args.threads] / n)
            print(f"  {name:5s} {calls:4.0f} calls {wall * 1e3:6.2f} ms {byts[i] / 1e6:6.1f} MB "
                  f"{byts[i] / wall / 1e9:5.1f} GB/s  busy per thread ms {busy}  worker start delay "
                  f"{prof[i][17] / n * 1e3:.2f} ms")
    tot = prof[5][1] / n
    pooled = sum(prof[i][1] for i in TAGS) / n
    print(f"  serial {(tot - pooled) * 1e3:.2f} ms of {tot * 1e3:.2f} ms per forward")
    spans = {10: prof[10][1], 11: prof[11][1], 12: prof[12][1] - prof[2][1], 13: prof[13][1]}
    print("    of it: " + ", ".join(f"{DECODE_SPANS[i]} {v / n * 1e3:.3f} ms" for i, v in spans.items()))
    _guard(prof, n)
    ne = lib.nk_prof_events(ctypes.c_void_p(ev.ctypes.data))
    if args.events:
        for e in ev[:ne]:
            print(f"    at {(e[0] - ev[0][0]) * 1e3:8.2f} ms waited {e[1] * 1e6:6.0f} us (own chunks {e[2] * 1e6:5.0f} us) "
                  f"tag {e[3]:.0f} call {e[6]:.0f}: worker on cpu {e[4]:.0f}, caller {e[5]:.0f}, woke from sleep {e[7]:.0f}")


def _guard(prof, n):
    """the pool's contention guard over the run (nk_pool.h NK_PROF_GUARD): stalls, solo stretches, calls alone"""
    g = prof[GUARD]
    print(f"  guard: {g[0]:.0f} stalls, {g[1]:.0f} solo stretches, {g[2]:.0f} calls run alone "
          f"({g[2] / n:.1f} a token), caller waited on claimed chunks {g[3] / n * 1e3:.3f} ms a token "
          f"({g[6] / n * 1e3:.3f} in stalls; {g[5]:.0f} stalls with both threads on one CPU), worker sleeps "
          f"{g[4] / n:.2f} a token")


if __name__ == "__main__":
    main()
