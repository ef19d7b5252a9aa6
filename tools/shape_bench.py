"""`tools/bench.py --shape 0.1b|0.4b|1.5b`: our dense and sparse decode on random-weight models of the
official RWKV-7 shapes (rwkv_edge.synthetic), the sparse FFN on active sets recorded from the reference
model on held-out text and replayed onto the shape (rwkv_edge.replay: each layer keeps the reference
layer's density and token-to-token overlap). Random weights would make ~50% of the FFN active; the
replay gives the sizes' bytes and speed at a trained model's sparsity.

The replayed sets are the true active sets (no predictor): the sparse rows exclude the predictor's
cost (a 2-bit predictor reads 1/4 of the int8 W_k bytes: 1/8 of the int8 FFN bytes), except with
`--shape-predictor-bits N` on the native rows: an N-bit W_k predictor quantized from random weights of
the shape scores every neuron of every layer each token (the predictor's bytes and arithmetic are
paid), while the replayed sets still decide which neurons run.

Native rows (bench.native_cfgs): dense reads every key and value row (as numba dense); exact reads every
key row and the value rows the sparse row reads (replayed set, relu(k) > 0; the model's own exact FFN would read
~50% of the value rows, not a trained model's ~14%); sparse the replayed sets' rows.
"""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared")


def shape_configs(args, base) -> list:
    """bench.py configurations for --shape: dense int8 (fused block kernel) and sparse int8 (replayed); with
    --native the native dense / exact / sparse rows (and + predictor)."""
    from rwkv_edge.replay import cached_sets
    from rwkv_edge.synthetic import SHAPES, write_synthetic
    if args.shape not in SHAPES:
        raise SystemExit(f"bench.py: --shape: choose one of {', '.join(SHAPES)}")
    ref = args.model or os.path.join(SHARED, "models", "rwkv7-ref-58m.pth")
    text = os.path.join(SHARED, "data", "heldout.txt")
    for p in (ref, text):
        if not os.path.exists(p):
            raise SystemExit(f"bench.py: {p}: no such file (needed to record the active sets)")
    os.makedirs(args.workdir, exist_ok=True)
    sets = os.path.join(args.workdir, "ref58m-active-sets.npz")
    cached_sets(sets, ref, text, 1100)
    cfgs = []
    for d in [d for d in args.dtype.split(",") if d.strip()]:
        path = os.path.join(args.workdir, f"synthetic-{args.shape}-{d}.rwkve")
        if not os.path.exists(path):
            print(f"writing {path}", file=sys.stderr)
            write_synthetic(path, args.shape, d)
        b = dict(base, model=path, shape=args.shape)
        cfgs.append(dict(b, name=f"dense {d}", impl="rwkv-edge", dtype=d, file=path))
        cfgs.append(dict(b, name=f"sparse {d}", impl="rwkv-edge", dtype=d, file=path, sets=sets))
        if getattr(args, "native", False) and d == "int8":
            from bench import native_cfgs
            cfgs += native_cfgs(b, path, sets=sets)
            bits = getattr(args, "shape_predictor_bits", None)
            if bits:                # the same sets, plus the predictor's scoring paid every token
                pred = shape_bundle(path, bits, args.workdir)
                cfgs.append(dict(cfgs[-1], name=f"native sparse int8 + {bits}-bit predictor", predictors=pred))
    return cfgs


def shape_bundle(path: str, bits: int, workdir: str) -> str:
    """An n-bit W_k threshold-predictor bundle for the random-weight model file `path`, quantized from
    random normal (F, D) matrices (its scores are only timed), cached in workdir; returns its path."""
    import numpy as np
    from rwkv_edge.backends.native import NativeRWKV7
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.calibrate import Calibration
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    out = os.path.join(workdir, f"{os.path.basename(path)}.pred{bits}.npz")
    if os.path.exists(out):
        return out
    m = NativeRWKV7.open(path)
    c, rng, preds = m.config, np.random.default_rng(0), []
    for _ in range(c.n_layer):
        p = QuantizedPredictor.fit(rng.standard_normal((c.ffn_dim, c.n_embd), np.float32), bits, 64)
        p.calib = Calibration(threshold=0.0)
        preds.append(p)
    print(f"writing {out}", file=sys.stderr)
    PredictorBundle(preds, m.fingerprint, c, "quantized", bits, None, "mass",
                    {"note": "random weights: timing only"}).save(out)
    return out
