"""Quality of early FFN-set predictors (scored at the start of a layer) next to the FFN-input one.

    python tools/early_quality.py [--model M] [--bundle q2.npz] [--train-tokens 65536] [--eval-tokens 8192]
                                  [--targets 0.99,0.995,0.999] [--ranks full,128,32] [--json OUT]

1. Runs --train-tokens of --calib (evenly spread sample) through the dense model, capturing per layer
   the early vectors (ln1(x_L), x_L; hook `att_input`) and the FFN input xk of the same tokens:
   least-squares moments for the map e -> xk (predictors/early.py), the last --calib-rows rows kept
   to calibrate and the first 4096 to choose the clip.
2. Fits per layer, for each input: "ffn" the --bundle's 2-bit W_k on xk (recalibrated on the same rows);
   "ln1" / "resid" a 2-bit (--bits) affine predictor on ln1(x_L) / x_L (early.AffineQuantizedPredictor);
   "ln1+shift" early.EarlyPredictor (xk_hat = ln1 A + c + mix prev, the FFN shift state prev known at
   layer start, scored by the --bundle's W_k); --ranks fits it once per rank of A (reduced-rank
   regression, EarlyMoments.solve, error on xk or with --rank-metric wk on the scores W_k xk; rows
   "ln1+shift@r32" etc., "full" = the plain row). Each is
   calibrated for each target on the same rows.
3. Recall (mass and active) and density per layer on the first --eval-tokens of --heldout, and
   end-to-end KLD / same-top-1 / ppl vs dense over those tokens (ctx 512 windows, quality.py) with the
   sets predicted in the same run (hook pair, predictors.early.MaskedFFN).
Prints a table and one key=value line per (input, target); --json writes everything.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")


def _rows(model, tokens, keep_first=0, keep_last=0, feeders=()):
    """Capture over `tokens`: feed(layer, rows) for every feeder (least-squares moments) except on the
    last `keep_last` rows; keep the first/last rows per layer."""
    from rwkv_edge.predictors.early import capture

    L, n = model.config.n_layer, len(tokens)
    names = ("ffn", "ln1", "resid", "prev")
    first = [{k: [] for k in names} for _ in range(L)]
    last = [{k: [] for k in names} for _ in range(L)]
    seen = np.zeros(L, np.int64)

    def on_rows(layer, rows):
        a = int(seen[layer])
        T = len(rows["ffn"])
        for feed in feeders:
            if a + T <= n - keep_last:          # calibration rows stay out of the fit
                feed(layer, rows)
        for k in names:
            v = rows[k]
            if a < keep_first:
                first[layer][k].append(v[:keep_first - a])
            lo = max(0, n - keep_last - a)
            if lo < T:
                last[layer][k].append(v[lo:])
        seen[layer] += T

    capture(model, tokens, on_rows)
    cat = lambda d: [{k: np.concatenate(v) if v else None for k, v in x.items()} for x in d]   # noqa: E731
    return cat(first), cat(last)


def _stats(pred, act):
    on = act > 0
    return {"mass_recall": float(act[pred].sum(dtype=np.float64) / max(act.sum(dtype=np.float64), 1e-30)),
            "active_recall": float((pred & on).sum() / max(on.sum(), 1)), "density": float(pred.mean()),
            "true_density": float(on.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="early_quality.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=os.path.join(SHARED, "models", "rwkv7-ref-58m.pth"))
    p.add_argument("--bundle", default="/work/art/q2.npz", help="the FFN-input predictor bundle (quantized)")
    p.add_argument("--calib", default=os.path.join(SHARED, "data", "calib.txt"))
    p.add_argument("--heldout", default=os.path.join(SHARED, "data", "heldout.txt"))
    p.add_argument("--train-tokens", type=int, default=65536)
    p.add_argument("--calib-rows", type=int, default=8192)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--ridge", type=float, default=1e-4)
    p.add_argument("--targets", default="0.99,0.995,0.999")
    p.add_argument("--inputs", default="ffn,ln1,resid,ln1+shift")
    p.add_argument("--ranks", default="full", help="ranks of ln1+shift's map A, comma list (full = D)")
    p.add_argument("--rank-metric", choices=("xk", "wk"), default="xk",
                   help="low-rank error measured on xk, or on the scores W_k xk (metric W_k^T W_k)")
    p.add_argument("--rank-diag", action="store_true", help="low-rank A plus a diagonal (EarlyMoments.solve diag)")
    p.add_argument("--no-e2e", action="store_true", help="recall/density only")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.calibrate import threshold_for_target
    from rwkv_edge.predictors.collect import encode_text, labels
    from rwkv_edge.predictors.early import (AffineQuantizedPredictor, EarlyMoments, EarlyPredictor, MaskedFFN,
                                            add_shift_rows, early_input)
    from rwkv_edge.quality import compute_base, run_segments, summarize, window_segments
    from rwkv_edge.runtime import open_model
    from rwkv_edge.tokenizer import load_tokenizer

    model = open_model(args.model, "numba")
    tok = load_tokenizer(None, args.model, model.config.vocab_size)
    L = model.config.n_layer
    inputs = args.inputs.split(",")
    ranks = [None if r == "full" else int(r) for r in args.ranks.split(",")]
    names = [f"{k}@r{r}" if k == "ln1+shift" and r is not None else k     # scored variants, in order
             for k in inputs for r in (ranks if k == "ln1+shift" else [None])]
    targets = [float(t) for t in args.targets.split(",")]
    t0 = time.time()
    train = encode_text(tok, args.calib, args.train_tokens + args.calib_rows)
    moms = {k: EarlyMoments(model.config, k.split("+")[0], "y" if "+" in k else "ffn") for k in inputs if k != "ffn"}
    mixes = [np.asarray(b.ffn_xk, np.float32) for b in model.blocks]
    feeders = [moms[k].add if k != "ln1+shift" else
               (lambda layer, r: add_shift_rows(moms["ln1+shift"], layer, r["ln1"], r["prev"], r["ffn"], mixes[layer]))
               for k in moms]
    clip_rows, cal_rows = _rows(model, train, 4096, args.calib_rows, feeders)
    with open(args.heldout, encoding="utf-8") as f:
        ev_ids = tok.encode(f.read(args.eval_tokens * 16))[:args.eval_tokens]     # as `rwkv-edge eval` does
    _, ev_rows = _rows(model, ev_ids, 0, len(ev_ids))
    print(f"captured {len(train)} train + {len(ev_ids)} eval tokens in {time.time() - t0:.0f} s", file=sys.stderr)

    base_bundle = PredictorBundle.load(args.bundle, model=model)
    scorers = {k: [] for k in names}                      # input -> per-layer fn(rows) -> scores (T, F)
    for layer in range(L):
        wk = np.asarray(model.blocks[layer].ffn_key, np.float32)
        wq = base_bundle.predictors[layer].qm.dequantize()  # the FFN-input predictor's 2-bit W_k, float32
        _, act_clip = labels(model, layer, clip_rows[layer]["ffn"])
        for k in inputs:
            if k == "ffn":
                scorers[k].append(lambda r, wq=wq: r["ffn"] @ wq.T)
            elif k == "ln1+shift":      # xk ~ (1 - mix) (ln1 A + c) + mix prev, scored by the same 2-bit W_k
                for rank in ranks:
                    sp = EarlyPredictor.fit(moms[k], layer, mixes[layer], base_bundle.predictors[layer].qm,
                                            ridge=args.ridge, rank=rank,
                                            metric=None if args.rank_metric == "xk" else wk.T.astype(np.float64) @ wk,
                                            diag=args.rank_diag)
                    # the same math as sp.score, with W_hat dequantized once (QuantizedMatrix.matvec is slower)
                    scorers[k if rank is None else f"{k}@r{rank}"].append(
                        lambda r, sp=sp, wq=wq: sp.xk_hat(early_input(r)) @ wq.T)
            else:
                A, c = moms[k].solve(layer, args.ridge)
                p = AffineQuantizedPredictor.fit_early(wk, A, c, k, args.bits, 64, clip_rows[layer][k], act_clip,
                                                       targets[0])
                wd, bias = p.qm.dequantize(), p.bias
                scorers[k].append(lambda r, wd=wd, bias=bias, k=k: r[k] @ wd.T + bias)
    print(f"fitted in {time.time() - t0:.0f} s", file=sys.stderr)
    act_cal = [labels(model, layer, cal_rows[layer]["ffn"])[1] for layer in range(L)]
    act_ev = [labels(model, layer, ev_rows[layer]["ffn"])[1] for layer in range(L)]

    results = {"args": vars(args), "rows": []}
    e2e_base = None
    if not args.no_e2e:
        segs = window_segments(ev_ids, 512)
        e2e_base = compute_base(model, segs, 512, progress=False)
    for k in names:
        for tgt in targets:
            thr, per = [], []
            for layer in range(L):
                sc = scorers[k][layer]
                c = threshold_for_target(sc(cal_rows[layer]), act_cal[layer], tgt, "mass")
                thr.append(np.float32(c.threshold))
                s = _stats(sc(ev_rows[layer]) >= np.float32(c.threshold), act_ev[layer])
                s.update(layer=layer, threshold=c.threshold, calib_density=1 - c.percentile)
                per.append(s)
            row = {"input": k, "target": tgt, "layers": per,
                   **{m: float(np.mean([s[m] for s in per])) for m in ("mass_recall", "active_recall", "density")}}
            if e2e_base is not None:
                mf = MaskedFFN(lambda layer, rows, k=k, thr=thr: scorers[k][layer](rows) >= thr[layer],
                               model.config.ffn_dim)
                r = summarize(run_segments(None, mf.attach(model), segs, e2e_base, progress=False))
                row.update(kld=r["kld_mean"], kld_se=r["kld_se"], kld_p99=r["kld_p99"], same_top1=r["same_top1"],
                           ppl=r["ppl"], ppl_base=r["ppl_base"], run_density=mf.density)
            results["rows"].append(row)
            print(" ".join(f"{a}={row[a]:.6g}" if isinstance(row[a], float) else f"{a}={row[a]}"
                           for a in row if a != "layers"), flush=True)
    print("\nper layer (input target: mass_recall/density)")
    for row in results["rows"]:
        print(f"{row['input']:>14} {row['target']:<6} " + " ".join(
            f"{s['mass_recall']:.3f}/{s['density']:.3f}" for s in row["layers"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
