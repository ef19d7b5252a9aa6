"""Prefill tok/s of two checkouts' native backend and llama.cpp, interleaved: each round runs every row once
(order reversed every other round) through tools/bench.py --one (one process per row, bench's own timing: the
median of three prefills of --prefill-tokens), so a neighbour's burst on a shared machine hits all rows of
a round alike; prints each row's per-round figures and median, and the ratios of the medians against
llama.cpp Q4_0 (int4 rows) and Q8_0 (int8 rows). Rows as tools/bench.py --native names them: dense (every
key and value row), exact (the default: value rows only where relu(k)^2 > 0), sparse (with the bundle).

    flock -x /work/wt/bench.lock python tools/prefill_peer.py --base OTHER_CHECKOUT --threads 2 --rounds 5 \\
        --model-file int4-h8=/work/art/ref-int4h8.rwkve --model-file int8=/work/art/ref-int8.rwkve \\
        --predictors /work/art/q2.npz --gguf-dir /work/art/llama/gguf

"new" is this checkout, "base" the other one (its extension built in place: `python setup.py build_ext
--inplace` there); the GGUFs as tools/bench.py --llama-cpp writes them (--workdir DIR: DIR/gguf).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, help="the other checkout (its rwkv_edge runs the base rows)")
    ap.add_argument("--model", default="/work/shared/models/rwkv7-ref-58m.pth")
    ap.add_argument("--model-file", action="append", required=True, help="DTYPE=PATH (int8 or int4-h8 ...)")
    ap.add_argument("--predictors", help="bundle: adds the sparse rows")
    ap.add_argument("--gguf-dir", required=True, help="the Q4_0 / Q8_0 GGUFs of the model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    args = ap.parse_args(argv)
    base = dict(model=args.model, device="cpu", threads=args.threads, tokens=8, rounds=1,
                prefill_tokens=args.prefill_tokens)
    ggufs = {q: os.path.join(args.gguf_dir, f) for f in sorted(os.listdir(args.gguf_dir))
             for q in ("Q4_0", "Q8_0") if f.endswith(f"-{q}.gguf")}
    rows = []
    for who, root in (("new", os.path.dirname(HERE)), ("base", os.path.abspath(args.base))):
        for spec in args.model_file:
            d, path = spec.split("=", 1)
            one = dict(base, name="x", impl="rwkv-edge", dtype=d, file=path, backend="native")
            rows.append((f"{who} dense {d}", root, dict(one, dense=True, native_ffn="dense")))   # every row
            rows.append((f"{who} exact {d}", root, dict(one, dense=True)))    # value rows where relu(k) > 0
            if args.predictors:
                rows.append((f"{who} sparse {d}", root, dict(one, predictors=args.predictors)))
    for q, f in ggufs.items():
        rows.append((f"llama {q}", os.path.dirname(HERE), dict(base, name=f"llama.cpp {q}", impl="llama.cpp", file=f)))
    res = {r[0]: [] for r in rows}
    for r in range(args.rounds):
        for name, root, cfg in (rows if r % 2 == 0 else rows[::-1]):
            env = dict(os.environ, PYTHONPATH=root, OPENBLAS_NUM_THREADS=str(args.threads),
                       OMP_NUM_THREADS=str(args.threads))
            out = subprocess.run([sys.executable, os.path.join(root, "tools", "bench.py"), "--one", json.dumps(cfg)],
                                 capture_output=True, text=True, env=env, cwd=root)
            lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if out.returncode != 0 or not lines:
                print(f"{name}: failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
                continue
            res[name].append(json.loads(lines[-1])["prefill_tok_s"])
    med = {k: statistics.median(v) for k, v in res.items() if v}
    for k, v in res.items():
        print(f"{k:22s} prefill tok/s median {med.get(k, float('nan')):7.1f}  {v}")
    for who in ("new", "base"):
        parts = []
        for k in med:
            if k.startswith(who + " "):
                peer = "llama Q4_0" if k.split()[-1].startswith("int4") else "llama Q8_0"
                if peer in med:
                    parts.append(f"{k[len(who) + 1:]}/{peer[6:]}={med[k] / med[peer]:.2f}")
        print(who, " ".join(parts))


if __name__ == "__main__":
    main()
