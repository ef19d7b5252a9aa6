"""A/B of two builds of the native C library in one process: the same model files, the same tokens, the
rounds of each configuration interleaved (order rotated each round), so host noise (other jobs, memory
bandwidth that drifts minutes apart) hits both builds alike; prints median ms/token of each build and
the per-round paired difference, and whether the last logits are bit-identical.

    python tools/native_ab.py --base-lib /path/to/other/checkout/rwkv_edge/backends/_nk*.so \\
        --model-file int8=ref-int8.rwkve --model-file int4-h8=ref-int4h8.rwkve --predictors q2.npz \\
        [--modes dense,sparse] [--tokens 64] [--rounds 16]
    python tools/native_ab.py --base-lib ... --model-file int8=out/bench/synthetic-1.5b-int8.rwkve \
        --predictors out/bench/synthetic-1.5b-int8.rwkve.pred2.npz --replay-sets out/bench/ref58m-active-sets.npz \
        --tokens 16 --rounds 8     # 1.5B shapes (tools/bench.py --shape): "sets" rows run the replayed sets
                                   # alone, "sparse" rows also score the predictor (its cost paid)

--modes every: the every-row dense FFN (`ffn="dense"`); --head-rescore K adds each row's twin with the
rescored head ("... hK"). With "every" among the modes, each build's every-row row over each of its other
rows is printed too, as the median of the per-round ratios (the "sparse >= 1.5x our dense" figure):

    python tools/native_ab.py --base-lib ... --model-file int4-h8=ref-int4h8.rwkve --predictors q2.npz \
        --modes every,dense,sparse --head-rescore 768 --rounds 10

--prefill N: time one forward of N tokens (a prompt eval: the last token's logits) per round instead of
the steps, and print tok/s of the prefill.

"dense" rows are the backend's default FFN without predictor, i.e. the exact one (value rows only where
relu(k)^2 > 0); the every-row dense FFN is `NativeRWKV7.open(path, ffn="dense")` (tools/bench.py --native).
"new" is this checkout's build (rwkv_edge.backends._nk), "base" the library given. Build the other
checkout in place first (`python setup.py build_ext --inplace` there). --threads N (default 1). Hold the bench lock.
"""
import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _open(path, predictors, replay):
    """A native model of the file (sparse with a bundle), on its own replayed sets when replay is given."""
    from rwkv_edge.runtime import open_model
    m = open_model(path, backend="native", predictors=predictors)
    if replay:
        from rwkv_edge.replay import ReplayedSets
        m = m.with_sets(ReplayedSets.from_file(replay, m))
    return m


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-lib", required=True, help="the other build's _nk shared library")
    ap.add_argument("--model-file", action="append", required=True, help="DTYPE=PATH of an int8/int4 model file")
    ap.add_argument("--predictors", help="predictor bundle for the sparse rows")
    ap.add_argument("--modes", default="dense,sparse")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="threads of both builds (default 1)")
    ap.add_argument("--replay-sets", help="active sets (replay.ActiveSets) the FFN runs instead of the predicted ones "
                    "(the predictor is still scored: tools/bench.py --shape --shape-predictor-bits)")
    ap.add_argument("--prefill", type=int, default=0, help="time a prefill of this many tokens instead of the steps")
    ap.add_argument("--head-rescore", type=int, default=0, metavar="K", help="also each row with the rescored head")
    args = ap.parse_args(argv)
    from rwkv_edge.backends import native
    native.set_num_threads(args.threads)
    base = native.bind_library(args.base_lib)
    cfgs = {}
    for spec in args.model_file:
        dtype, path = spec.split("=", 1)
        for mode in args.modes.split(","):
            if mode == "sparse" and not args.predictors:
                continue
            tag = "sets" if mode == "dense" and args.replay_sets else mode    # replayed sets, no predictor
            m = _open(path, args.predictors if mode == "sparse" else None, args.replay_sets)
            if mode == "every":
                m = m.with_ffn_mode("dense")
            for t, mm in [(tag, m)] + ([(f"{tag}+h{args.head_rescore}", m.with_head_rescore(args.head_rescore))]
                                       if args.head_rescore else []):
                cfgs[f"{t} {dtype} new"] = mm
                cfgs[f"{t} {dtype} base"] = mm.with_library(base)
    names = list(cfgs)
    rng = np.random.default_rng(2)
    V = cfgs[names[0]].config.vocab_size
    prompt, toks = rng.integers(0, V, 16).tolist(), rng.integers(0, V, args.tokens).tolist()
    long = rng.integers(0, V, args.prefill).tolist()
    res, last = {k: [] for k in names}, {}
    for m in cfgs.values():                     # warm-up: pages, caches
        _, s = m.forward(prompt)
        for t in toks[:4]:
            _, s = m.step(t, s)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in (order if r % 2 == 0 else order[::-1]):
            m = cfgs[k]
            if args.prefill:
                t0 = time.perf_counter()
                out, _ = m.forward(long)
                res[k].append((time.perf_counter() - t0) / len(long) * 1e3)
                last[k] = out
                continue
            _, s = m.forward(prompt)
            t0 = time.perf_counter()
            for t in toks:
                out, s = m.step(t, s)
            res[k].append((time.perf_counter() - t0) / len(toks) * 1e3)
            last[k] = out
    for k in names:
        print(f"{k:24s} {np.median(res[k]):.3f} ms/token  {1e3 / np.median(res[k]):6.1f} tok/s  "
              f"[{min(res[k]):.3f}-{max(res[k]):.3f}]")
    for k in names[::2]:
        b = k[:-3] + "base"
        d = np.array(res[b]) - np.array(res[k])
        print(f"{k[:-4]:18s} base - new per round: median {np.median(d):+.3f} ms ({np.median(res[b]) / np.median(res[k]):.3f}x)"
              f"  logits bit-identical: {np.array_equal(last[k], last[b])}")
    for k in names:                              # every-row dense over this row, per build
        mode, dtype, build = k.split(" ")
        e = f"every {dtype} {build}"
        if e in res and k != e:
            print(f"{k:24s} every-row dense / this, per-round median: {np.median(np.array(res[e]) / np.array(res[k])):.3f}")


if __name__ == "__main__":
    main()
