"""Resident memory per configuration over a long decode: dense, sparse, and sparse whose FFN pages follow
the active set (rwkv_edge.residency), on held-out text.

    python tools/bench_resident.py --model M.rwkve --predictors B.npz [--tokens 1000] [--window 8]
                                   [--max-resident-mb N] [--text ../shared/data/heldout.txt]
    python tools/bench_resident.py --model synthetic-1.5b-int8.rwkve --sets active-sets.npz [--modes ...]

Each configuration runs in its own process (its own peak RSS), teacher-forced on the first --tokens
tokens of --text, one token per step. Reported: peak RSS; resident MiB of the model-file mapping
(smaps) and of the FFN bundles (pagemap), sampled every 50 tokens (mean, max) and at the end; for the
resident mode the hit rate (active neurons whose page was resident by the policy) and MiB loaded per
token. One JSON line per configuration, then a markdown table.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def run_one(cfg) -> dict:
    import numba
    numba.set_num_threads(1)
    import numpy as np

    from rwkv_edge import memstat
    from rwkv_edge.runtime import open_model
    from rwkv_edge.sparse import layer_bundles

    mode = cfg["mode"]
    budget = None
    if mode == "sparse-resident":        # no --max-resident-mb: the window alone decides
        budget = cfg["max_resident_mb"] if cfg.get("max_resident_mb") is not None else float("inf")
    if cfg.get("sets"):                  # a synthetic shape: active sets replayed from a real model
        from rwkv_edge.replay import ReplayedSets
        from rwkv_edge.residency import resident_sparse_ffn
        m = open_model(cfg["model"], backend="numba")
        rep = ReplayedSets.from_file(cfg["sets"], m)
        if mode == "sparse":
            from rwkv_edge.sparse import SparseFFN
            m = m.with_ffn(SparseFFN(m, rep))
        elif mode == "sparse-resident":
            m = m.with_ffn(resident_sparse_ffn(m, rep, cfg["window"], budget))
    else:
        m = open_model(cfg["model"], backend="numba", predictors=cfg["predictors"] if mode != "dense" else None,
                       max_resident_mb=budget, resident_window=cfg["window"])
    ids = [int(t) for t in np.load(cfg["ids"])]     # tokenized by the parent: no tokenizer in this process
    bundles = layer_bundles(m)
    ffn_samples, map_samples, st = [], [], None
    t0 = time.perf_counter()
    for i, t in enumerate(ids):
        _, st = m.step(t, st)
        if (i + 1) % 50 == 0:
            ffn_samples.append(sum(memstat.resident_bytes(b.kv) or 0 for b in bundles) / 2**20)
            map_samples.append((memstat.mapping_resident(cfg["model"]) or 0) / 2**20)
    dt = time.perf_counter() - t0
    out = {"mode": mode, "tokens": len(ids), "decode_tok_s": round(len(ids) / dt, 1),
           "peak_rss_mib": round(memstat.peak_rss_mib() or 0, 1), "rss_end_mib": round(memstat.rss_mib() or 0, 1),
           "model_mapping_resident_mib": round(map_samples[-1], 1), "ffn_total_mib": round(sum(b.kv.nbytes for b in bundles) / 2**20, 1),
           "ffn_resident_mean_mib": round(float(np.mean(ffn_samples)), 1), "ffn_resident_max_mib": round(max(ffn_samples), 1)}
    ffn = getattr(m, "ffn", None)
    if getattr(ffn, "density", None):
        out["ffn_density"] = round(float(ffn.density), 3)
    res = getattr(ffn, "residency", None)
    if res is not None:
        s = res.stats()
        out.update(hit_rate=s["hit_rate"], loaded_mib_per_token=s["loaded_mib_per_token"], window=cfg["window"],
                   ffn_resident_policy_mib=s["ffn_resident_policy_mib"])
        if cfg.get("max_resident_mb") is not None:
            out["max_resident_mb"] = cfg["max_resident_mb"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_resident.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model file (.rwkve, rwkv-edge convert)")
    ap.add_argument("--predictors", help="predictor bundle")
    ap.add_argument("--sets", help="instead of --predictors: active sets to replay (tools/active_sets.py), for "
                                   "synthetic official shapes (random token ids)")
    ap.add_argument("--modes", default="dense,sparse,sparse-resident")
    ap.add_argument("--tokens", type=int, default=1000)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--max-resident-mb", type=float, default=None)
    ap.add_argument("--text", default=os.path.join(ROOT, "..", "shared", "data", "heldout.txt"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    for p in (args.model, args.sets or args.predictors, args.text):
        if not p or not os.path.isfile(p):
            ap.error(f"{p}: no such file")
    if args.tokens < 50 or args.window <= 0:
        ap.error("--tokens must be >= 50 and --window > 0")
    import tempfile

    import numpy as np

    from rwkv_edge.modelfile import read_header
    from rwkv_edge.tokenizer import load_tokenizer
    V = read_header(args.model)["config"]["vocab_size"]
    if args.sets:
        ids = [int(t) for t in np.random.default_rng(0).integers(1, V, args.tokens)]
    else:
        with open(args.text, encoding="utf-8") as f:
            ids = load_tokenizer(None, args.model, V).encode(f.read(40 * args.tokens))[: args.tokens]
    if len(ids) < args.tokens:
        ap.error(f"--text {args.text}: only {len(ids)} tokens")
    tmp = tempfile.TemporaryDirectory(prefix="bench-resident-")
    np.save(os.path.join(tmp.name, "ids.npy"), np.asarray(ids, np.int32))
    base = dict(model=args.model, predictors=args.predictors, sets=args.sets, tokens=args.tokens, window=args.window,
                ids=os.path.join(tmp.name, "ids.npy"), max_resident_mb=args.max_resident_mb)
    rows = []
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    for mode in [x.strip() for x in args.modes.split(",") if x.strip()]:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(dict(base, mode=mode))],
                           capture_output=True, text=True, env=env)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            if r.returncode == 2 or "minimum" in err:
                print(err, file=sys.stderr)
                return 2
            print(json.dumps({"mode": mode, "error": err}), flush=True)
            continue
        rows.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    src = "random token ids, replayed active sets" if args.sets else os.path.basename(args.text)
    print(f"\n{os.path.basename(args.model)}, {args.tokens} tokens ({src}), window {args.window}, 1 thread\n")
    print("| mode | peak RSS MiB | model mapping resident MiB (end) | FFN resident MiB mean / max (of total) "
          "| hit rate | MiB loaded/token | tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['peak_rss_mib']} | {r['model_mapping_resident_mib']} | "
              f"{r['ffn_resident_mean_mib']} / {r['ffn_resident_max_mib']} (of {r['ffn_total_mib']}) | "
              f"{r.get('hit_rate', '')} | {r.get('loaded_mib_per_token', '')} | {r['decode_tok_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
