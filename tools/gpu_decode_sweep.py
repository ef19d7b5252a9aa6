"""Captured decode tok/s of the fused decode under several launch settings, in one process (one
model load, every mode): the A/B table of tools/gpu_decode_run.sh sweep.

    python3 tools/gpu_decode_sweep.py --shape 24,2048,8192,65536 --density 0.13 --out /tmp/big \\
        --set old='{"gather_na":0,"fuse_ffn_mix":false}' --set new='{}' [--modes dense,exact,predicted]

--shape/--density/--calib build (or with an existing --out, reuse) the random checkpoint and the
2-bit bundle as tools/gpu_decode_bench.py does. Each --set NAME=JSON (cuda_decode.TUNE overrides;
"modes": [...] inside limits it to those modes) is timed as the bench times a row: median of
--rounds runs of --tokens tokens from one state, graph on. Sets are run in rounds (every set once,
then again) so that clock drift spreads over all of them; the table gives each set's median over
the rounds, % of the 4.8 TB/s roof over the bytes the step reads, densities and the ratio to the
first set's dense row. One JSON line per measurement.
A set with "early_scores" > 0 (cuda_decode_early.py) runs with a copy of the bundle whose per-layer
thresholds select, on layer L's LN1 output, the share of rows the bundle's own threshold selects on
the FFN input (both over the first --early-calib tokens): the same read density, for speed only (the
quality of such predictors is not what this measures); "early_share": S in the set selects a share S
of the rows in every layer instead; "early_diag": true: an early bundle (predictors.early.EarlyPredictor,
diagonal map d = 1 - mix, c = 0: the crude xk ~ (1 - mix) ln1 + mix prev) whose thresholds select the same
share on z = ln1 * d + c + mix * prev, which the LN1 mix launch then computes (speed only)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def timed_rounds(dec, st, toks, rounds: int) -> list:
    """Seconds per token of `rounds` timed runs of dec.step over toks, each from state st (a first,
    untimed run warms up); device synchronised around each run."""
    import torch
    out = []
    for r in range(rounds + 1):
        dec.reset(st)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for tok in toks:
            dec.step(tok)
        torch.cuda.synchronize()
        if r:
            out.append((time.perf_counter() - t) / len(toks))
    return out


def early_bundle(m, bundle, toks, target=None, diag=False):
    """A copy of `bundle` (a namespace with .predictors) whose thresholds are the quantiles of the scores
    of the LN1 outputs (the state's att_x after each token) at each layer's predicted share on the FFN
    inputs of the same tokens (generic path of model m, one token at a time), or at share `target`."""
    import copy
    import dataclasses
    import types

    import numpy as np
    import torch

    host = lambda t: torch.as_tensor(t).float().cpu().numpy()  # noqa: E731
    from rwkv_edge.predictors.early import EarlyPredictor

    xk, x1, pv, st = {}, [], [], None
    m.hooks.ffn_input.append(lambda i, x: xk.setdefault(i, []).append(host(x).reshape(-1)))
    try:
        for t in toks:
            pv.append(host(st.ffn_x) if st is not None else None)   # (L, D): the FFN shift state before t
            _, st = m.forward([t], st)
            x1.append(host(st.att_x))                             # (L, D): ln1(x) of every layer
    finally:
        m.hooks.ffn_input.pop()
    preds, shares = [], []
    for i, p in enumerate(bundle.predictors):
        share = float(np.mean(p.score(np.stack(xk[i])) >= p.calib.threshold)) if target is None else target
        q = copy.copy(p)
        e = np.stack([x[i] for x in x1])
        if diag:
            mix = host(m.blocks[i].ffn_xk).reshape(-1)
            q = EarlyPredictor(1.0 - mix, np.zeros_like(mix), mix, p.qm)
            e = np.concatenate([e, np.stack([np.zeros_like(mix) if v is None else v[i] for v in pv])], 1)
        thr = float(np.quantile(q.score(e), 1.0 - share))
        q.calib = dataclasses.replace(p.calib, threshold=thr)
        preds.append(q)
        shares.append(share)
    print(f"# early thresholds: predicted share per layer {np.round(shares, 3).tolist()}", flush=True)
    return types.SimpleNamespace(predictors=preds, input="early" if diag else "ffn")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True)
    ap.add_argument("--density", type=float, default=0.13)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], help="NAME=JSON tune overrides")
    ap.add_argument("--modes", default="dense,exact,predicted")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--passes", type=int, default=2, help="rounds over all sets")
    ap.add_argument("--early-calib", type=int, default=64, help="tokens for the early-score thresholds")
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no further pass after this many seconds (0: no limit)")
    args = ap.parse_args()
    import numpy as np
    import torch

    import gpu_decode_bench as B
    from rwkv_edge.backends.cuda_decode import FusedDecode
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.runtime import open_model

    L, D, F, V = (int(v) for v in args.shape.split(","))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"shape_{L}x{D}.pth")
    t = time.perf_counter()
    if not os.path.exists(path):
        B.make_shaped(path, L, D, F, V, args.density)
    bpath = os.path.join(args.out, "bundle.npz")
    if not os.path.exists(bpath):
        ids = np.random.default_rng(5).integers(1, V, args.calib)
        B.fit_bundle(path, bpath, [int(v) for v in ids])
    print(f"# model and bundle ready in {time.perf_counter() - t:.0f}s", flush=True)
    m = open_model(path, device="cuda", dtype="fp16")
    bundle = PredictorBundle.load(bpath, model=m)
    toks = [int(v) for v in np.random.default_rng(2).integers(1, V, args.tokens)]
    _, st = m.forward(toks[:16])
    sets = [(s.split("=", 1)[0], json.loads(s.split("=", 1)[1])) for s in args.set] or [("default", {})]
    ebundles = {(sh, dg): early_bundle(m, bundle, toks[:args.early_calib], sh, dg)
                for sh, dg in {(t.get("early_share"), bool(t.get("early_diag"))) for _, t in sets
                               if t.get("early_scores")}}
    res: dict = {}
    t_start = time.perf_counter()
    for ps in range(args.passes):
        if ps and args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"# budget: stopped after {ps} pass(es)", flush=True)
            break
        for name, tune in sets:
            tune = dict(tune)
            modes = tune.pop("modes", args.modes.split(","))
            share = tune.pop("early_share", None), bool(tune.pop("early_diag", False))
            for mode in modes:
                try:
                    b = (ebundles[share] if tune.get("early_scores") else bundle) if mode == "predicted" else None
                    dec = FusedDecode(m, mode, bundle=b, tune=tune)
                except Exception as e:   # one broken setting must not end the table
                    print(json.dumps(dict(set=name, mode=mode, error=repr(e)[:400])), flush=True)
                    continue
                rates = [1.0 / s for s in timed_rounds(dec, st, toks, args.rounds)]
                dens = dec.stats()
                row = dict(set=name, mode=mode, tok_s=round(float(np.median(rates)), 1),
                           bytes=dec.bytes_per_token(), gather=dec.gather, mixin=dec.mixin, **dens)
                row["t_s"] = round(time.perf_counter() - t_start, 1)
                print(json.dumps(row), flush=True)
                res.setdefault((name, mode), []).append(row)
                del dec
    base = None
    print(f"\n| {L}x{D} F{F} V{V} | mode | tok/s | x dense[{sets[0][0]}] | % 4.8 TB/s roof | read/active density |")
    for (name, mode), rows in res.items():
        v = float(np.median([r["tok_s"] for r in rows]))
        base = v if base is None and mode == "dense" else base
        r0 = rows[-1]
        print(f"| {name} | {mode} | {v:.1f} | {v / base if base else float('nan'):.3f} | "
              f"{100 * v * r0['bytes'] / 4.8e12:.1f} | {r0['read_density']}/{r0['active_density']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
