"""Decode tok/s through the user-facing path (runtime.open_model + generate.Generation, as
`rwkv-edge generate/chat --device cuda` run it): dense and sparse (--predictors), with the fused CUDA
decode (generate.batch1_step) and with it forced off (fused=False: the generic CUDA graph for dense, eager
DeviceSparseFFN for sparse), in one process, one model load per row.

    python3 tools/gpu_generate_bench.py --model M [--predictors B.npz] [--tokens 128] [--rounds 3]
    python3 tools/gpu_generate_bench.py --shape 12,512,2048,16384 --out /tmp/s58   # random, bundle fitted

Each row: greedy sampling through the Sampler, logits copied to the host every token (what the
CLI does), after a prompt of 16 tokens and 8 warm-up tokens; median tok/s over --rounds runs.
--shape builds a random fp16 checkpoint and a 2-bit bundle with tools/gpu_decode_bench.py's helpers.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def run_row(path, predictors, fused, tokens, rounds, dtype) -> dict:
    import torch

    from rwkv_edge.generate import Generation
    from rwkv_edge.runtime import open_model
    from rwkv_edge.sampling import Sampler, SamplingParams

    m = open_model(path, device="cuda", dtype=dtype, predictors=predictors, dense=predictors is None)
    V = m.config.vocab_size
    g = Generation(m, None, Sampler(SamplingParams(0.0, 1.0, 0), seed=0), fused=fused)
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(1, V, 16)]
    g.feed(prompt)
    for _ in range(8):                               # warm-up: the step is built at the first token
        g.feed([g.sampler(g.logits)])
    start = g.state.copy(), g.logits.copy()
    rates = []
    n = tokens if g.decode_path != "eager" else max(8, tokens // 4)
    for _ in range(rounds if g.decode_path != "eager" else 1):
        g.state, g.logits = start[0].copy(), start[1].copy()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            g.feed([g.sampler(g.logits)])
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    out = {"model": os.path.basename(path.rstrip("/")), "sparse": predictors is not None, "fused": fused,
           "path": g.decode_path, "tok_s": round(float(np.median(rates)), 1), "tokens": n, "rounds": len(rates)}
    if g.decode_path == "fused-predicted":
        out["read_density"] = g._dec.stats()["read_density"]
    del g, m
    torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--predictors")
    ap.add_argument("--shape", help="L,D,F,V: a random fp16 checkpoint and a fitted 2-bit bundle (needs --out)")
    ap.add_argument("--out")
    ap.add_argument("--density", type=float, default=0.13)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="fp16")
    args = ap.parse_args()
    if args.shape:
        from gpu_decode_bench import fit_bundle, make_shaped
        L, D, F, V = (int(v) for v in args.shape.split(","))
        os.makedirs(args.out, exist_ok=True)
        args.model = os.path.join(args.out, f"shape_{L}x{D}.pth")
        args.predictors = os.path.join(args.out, "bundle.npz")
        t = time.perf_counter()
        if not os.path.exists(args.model):
            make_shaped(args.model, L, D, F, V, args.density)
        if not os.path.exists(args.predictors):
            fit_bundle(args.model, args.predictors, [int(v) for v in np.random.default_rng(5).integers(1, V, args.calib)])
        print(f"# built {args.shape} and its bundle in {time.perf_counter() - t:.0f}s", flush=True)
    if not args.model:
        ap.error("--model or --shape is required")
    rows = []
    for pred in (None, args.predictors) if args.predictors else (None,):
        for fused in (False, True):
            rows.append(run_row(args.model, pred, fused, args.tokens, args.rounds, args.dtype))
            print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        if r["fused"]:
            base = next(b for b in rows if b["sparse"] == r["sparse"] and not b["fused"])
            print(f"# {r['model']} {'sparse' if r['sparse'] else 'dense'}: {r['path']} {r['tok_s']} tok/s vs "
                  f"{base['path']} {base['tok_s']} ({r['tok_s'] / base['tok_s']:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
