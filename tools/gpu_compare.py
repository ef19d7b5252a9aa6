"""GPU logits vs the numpy reference on one model, dense and sparse (run on a CUDA machine).

    python tools/gpu_compare.py --model M.pth [--predictors BUNDLE] [--steps 32]
Prints one line per configuration: max abs logit difference over a prompt and `--steps` decoded
tokens (state carried), and whether greedy tokens agree.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkv_edge.runtime import open_model  # noqa: E402


def run(model, prompt, steps):
    logits, st = model.forward(prompt, full_output=True)
    out, toks = [logits], []
    lo = logits[-1]
    for _ in range(steps):
        t = int(np.argmax(lo))
        toks.append(t)
        lo, st = model.step(t, st)
        out.append(lo[None])
    return np.concatenate(out), toks


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--predictors")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    prompt = [0] + [int(t) for t in rng.integers(1, 16384, 63)]
    for pred in [None, args.predictors] if args.predictors else [None]:
        ref, rt = run(open_model(args.model, backend="reference", predictors=pred), prompt, args.steps)
        for dt, tol in (("fp32", 1e-4), ("fp16", 1e-2), ("bf16", 1e-2)):
            g, gt = run(open_model(args.model, device="cuda", dtype=dt, predictors=pred), prompt, args.steps)
            d = float(np.abs(g - ref).max())
            kind = "sparse" if pred else "dense"
            print(f"{kind:6s} {dt}: max_abs_logit_diff={d:.3e} (tol {tol:g}) {'OK' if d <= tol else 'OVER'} "
                  f"greedy_agree={sum(a == b for a, b in zip(gt, rt))}/{len(rt)} logit_absmax={np.abs(ref).max():.1f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
