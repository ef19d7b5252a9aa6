"""GPU logits vs the numpy reference on one model, dense and sparse (run on a CUDA machine).

    python tools/gpu_compare.py --model M.pth [--predictors BUNDLE] [--steps 32] [--dtypes fp32,fp16,bf16]
                                [--fast] [--weights-ref] [--rwkv]

One line per configuration: the max abs logit difference over a 64-token prompt (prefill) and
`--steps` decoded tokens (state carried), against the numpy reference (tolerance: 1e-4 for fp32,
1e-2 for fp16/bf16). Every run decodes the reference's greedy tokens (teacher forcing), so the
difference measures arithmetic, not a diverged continuation; `greedy_agree` counts the positions
(prompt end and decoded) where the run's argmax equals the reference's.

fp16/bf16 run the CUDA backend's default (accurate) half mode: weights stored in the dtype,
activations float32. --fast adds the fast mode (activations rounded to the weight dtype).
--weights-ref adds, for fp16/bf16, the difference against a numpy reference whose weight matrices
are rounded exactly as the GPU stores them: what the runtime adds beyond the weights' rounding.
--rwkv adds, in a child process (the `rwkv` package turns TF32 on globally when imported), that
package's `cuda fp16` and `cuda bf16` logits against its own `cuda fp32` (with and without TF32)
and against the numpy reference, on the same prompt and tokens: the error half precision has there.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from rwkv_edge.runtime import open_model  # noqa: E402

TOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2}


def prompt_tokens(vocab: int = 16384):
    rng = np.random.default_rng(0)
    return [0] + [int(t) for t in rng.integers(1, min(vocab, 16384), 63)]


def run(model, prompt, steps, forced=None):
    """(logits (len(prompt) + steps, V), greedy tokens). With `forced`, those tokens are decoded
    instead of the model's own greedy choices (the greedy choices are still returned)."""
    logits, st = model.forward(prompt, full_output=True)
    out, toks = [np.asarray(logits, np.float32)], []
    lo = out[0][-1]
    for i in range(steps):
        t = int(np.argmax(lo))
        toks.append(t)
        lo, st = model.step(forced[i] if forced is not None else t, st)
        lo = np.asarray(lo, np.float32)
        out.append(lo[None])
    return np.concatenate(out), toks


def _round_like_gpu(model, dtype: str):
    """Round the model's weight matrices in place as the CUDA backend stores them for `dtype`."""
    import torch

    from rwkv_edge.backends import cuda as C

    tdt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]

    def rnd(a):
        if isinstance(a, np.ndarray) and a.ndim >= 2 and a.size > C.HALF_MIN_SIZE:
            return torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(tdt).to(torch.float32).numpy()
        return a

    model.emb, model.head = rnd(model.emb), rnd(model.head)
    for b in model.blocks:
        for k, v in list(vars(b).items()):
            setattr(b, k, rnd(v))
    return model


def _reference(path, pred, rounded=None):
    if rounded is None:
        return open_model(path, backend="reference", predictors=pred)
    m = _round_like_gpu(open_model(path, backend="reference"), rounded)
    if pred:
        from rwkv_edge.predictors.bundle import PredictorBundle
        from rwkv_edge.sparse import SparseFFN
        m = m.with_ffn(SparseFFN(m, PredictorBundle.load(pred, model=m)))
    return m


def _agree(g, ref):
    n = ref.shape[0]
    return int((np.argmax(g, 1) == np.argmax(ref, 1))[63:].sum()), n - 63


def compare(args) -> int:
    from rwkv_edge.backends import cuda as C

    prompt = prompt_tokens()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    over = 0
    for pred in [None, args.predictors] if args.predictors else [None]:
        kind = "sparse" if pred else "dense"
        ref, rt = run(_reference(args.model, pred), prompt, args.steps)
        for dt in dtypes:
            modes = [("", True)] + ([("fast", False)] if args.fast and dt != "fp32" else [])
            model = open_model(args.model, device="cuda", dtype=dt, predictors=pred)
            for tag, split in modes:
                C.set_split_inputs(split)
                t0 = time.perf_counter()
                g, _ = run(model, prompt, args.steps, forced=rt)
                secs = time.perf_counter() - t0
                d = float(np.abs(g - ref).max())
                ok = d <= TOL[dt]
                over += (not ok) and not tag
                a, n = _agree(g, ref)
                name = f"{dt}{'-' + tag if tag else ''}"
                dens = getattr(model.ffn, "density", None)
                print(f"{kind:6s} {name:9s}: max_abs_logit_diff={d:.3e} (tol {TOL[dt]:g}) {'OK' if ok else 'OVER'} "
                      f"greedy_agree={a}/{n} logit_absmax={np.abs(ref).max():.1f}"
                      + (f" density={dens:.3f}" if dens else "") + f" ({secs:.1f}s)", flush=True)
            C.set_split_inputs(True)
            if args.weights_ref and dt != "fp32":
                wref, _ = run(_reference(args.model, pred, rounded=dt), prompt, args.steps, forced=rt)
                g, _ = run(model, prompt, args.steps, forced=rt)
                print(f"{kind:6s} {dt:9s}: vs reference with {dt}-rounded weights: "
                      f"max_abs_logit_diff={np.abs(g - wref).max():.3e}; the weight rounding alone "
                      f"(numpy, float32 math): {np.abs(wref - ref).max():.3e}", flush=True)
            del model
    if args.rwkv:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--model", args.model, "--steps",
                            str(args.steps), "--rwkv-child"], capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("rwkv ")]
        print("\n".join(lines) if lines else f"rwkv package: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}",
              flush=True)
    return 1 if over else 0


def rwkv_child(args) -> int:
    """The `rwkv` package on CUDA: fp16/bf16 vs its own fp32, and each vs the numpy reference."""
    from rwkv_peer import RwkvPackageModel

    prompt = prompt_tokens()
    ref, rt = run(open_model(args.model, backend="reference"), prompt, args.steps)
    import torch
    outs = {}
    for strat, tf32 in (("cuda fp32", True), ("cuda fp32", False), ("cuda fp16", True), ("cuda bf16", True)):
        try:
            m = RwkvPackageModel(args.model, strat)      # importing the package turns TF32 on
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.backends.cudnn.allow_tf32 = tf32
            g, _ = run(m, prompt, args.steps, forced=rt)
        except Exception as e:  # e.g. a strategy this version does not support
            print(f"rwkv {strat}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        name = strat + ("" if strat != "cuda fp32" else (" tf32" if tf32 else " ieee"))
        outs[name] = g
        a, n = _agree(g, ref)
        line = f"rwkv {name:15s}: vs numpy reference max_abs_logit_diff={np.abs(g - ref).max():.3e} greedy_agree={a}/{n}"
        if "cuda fp32 ieee" in outs and not name.startswith("cuda fp32"):
            line += f"; vs rwkv cuda fp32 (ieee) {np.abs(g - outs['cuda fp32 ieee']).max():.3e}"
            if "cuda fp32 tf32" in outs:
                line += f", vs rwkv cuda fp32 (tf32, its default) {np.abs(g - outs['cuda fp32 tf32']).max():.3e}"
        print(line, flush=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--predictors")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--fast", action="store_true", help="also run the fast half mode (activations in half)")
    ap.add_argument("--weights-ref", action="store_true",
                    help="also compare fp16/bf16 against a reference with weights rounded to that dtype")
    ap.add_argument("--rwkv", action="store_true", help="also measure the rwkv package's half precision error")
    ap.add_argument("--rwkv-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rwkv_child:
        return rwkv_child(args)
    return compare(args)


if __name__ == "__main__":
    from rwkv_edge.errors import run_main  # bad input: one line, exit 2 (as every tool)
    sys.exit(run_main("gpu_compare.py", main))
