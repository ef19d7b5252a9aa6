"""Sparse FFN outputs vs dense outputs computed with the same active set, on a real model.

    python tools/sparse_check.py --model M [--predictors BUNDLE] [--text FILE] [--tokens 64] [--steps 32]

Runs a prompt (the first --tokens tokens of --text) then --steps decode steps, three ways:
  exact:  the sparse FFN on the true active set {j : W_k[j] . x > 0} vs the dense model;
  bundle: the sparse FFN on the bundle's predicted sets (its float32 scores) vs the dense model with
          relu(W_k x)^2 zeroed outside those same sets (the dense math, masked).
Prints the max abs logit difference of each (`exact_max_abs_diff=... bundle_max_abs_diff=...`) and
exits 1 when one is over --tol (default 1e-3).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkv_edge.cli import positive_int, resolve_model_path  # noqa: E402
from rwkv_edge.errors import ArgumentParser, read_text_file, run_main  # noqa: E402

PROG = "sparse_check.py"

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "heldout.txt")


def _logits(model, prompt, steps):
    """(prompt + steps, V) logits: the prompt in one forward, then greedy decode steps."""
    out, st = model.forward(prompt, full_output=True)
    rows = list(out)
    for _ in range(steps):
        lg, st = model.step(int(np.argmax(rows[-1])), st)
        rows.append(lg)
    return np.stack(rows)


def _record_and_mask(predict, n_layer):
    """(predict_indices that records each call's set, an ffn_activation hook zeroing k (T, F) outside
    the recorded sets, replayed in the same order)."""
    from rwkv_edge.sparse import ReplayIndices
    rep = ReplayIndices(n_layer)

    def record(layer, x):
        idx = np.asarray(predict(layer, x), np.int32)
        rep.sets[layer].append(idx)
        return idx

    def mask(layer, k):
        k = k.copy()
        for t in range(k.shape[0]):
            keep = np.zeros(k.shape[1], bool)
            keep[rep(layer, None)] = True
            k[t, ~keep] = 0.0
        return k
    return record, mask


def main(argv=None) -> int:
    """Bad input (a damaged model or bundle, another model's bundle, a --text that is not UTF-8):
    one line, exit 2; sparse != dense beyond --tol: exit 1."""
    return run_main(PROG, _main, argv)


def _main(argv=None) -> int:
    from rwkv_edge.runtime import open_model
    from rwkv_edge.sparse import SparseFFN, exact_active_indices
    from rwkv_edge.tokenizer import load_tokenizer

    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--tokenizer", help="default: tokenizer.json next to the model")
    ap.add_argument("--predictors")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--tokens", type=positive_int, default=64)
    ap.add_argument("--steps", type=positive_int, default=32)
    ap.add_argument("--tol", type=float, default=1e-3, help="(default: %(default)s)")
    args = ap.parse_args(argv)
    path = resolve_model_path(ap, args)
    text = read_text_file(args.text, "--text", limit=20 * args.tokens)
    if args.predictors and not os.path.isfile(args.predictors):
        ap.error(f"--predictors {args.predictors}: no such file")
    model = open_model(path, backend="numba")
    tok = load_tokenizer(args.tokenizer, path, model.config.vocab_size)
    bundle = None
    if args.predictors:       # checked before the long runs: another model's bundle is refused here
        from rwkv_edge.predictors.bundle import PredictorBundle
        bundle = PredictorBundle.load(args.predictors, model=model)
    prompt = tok.encode(text)[: args.tokens]
    if not prompt:
        ap.error(f"--text {args.text}: no tokens in the file")
    dense = _logits(model, prompt, args.steps)
    exact = _logits(model.with_ffn(SparseFFN(model, exact_active_indices(model))), prompt, args.steps)
    d_exact = float(np.abs(exact - dense).max())
    line = f"exact_max_abs_diff={d_exact:.3e}"
    worst = d_exact
    if bundle is not None:
        record, mask = _record_and_mask(bundle.predict_indices, model.config.n_layer)
        sparse_m = model.with_ffn(SparseFFN(model, record))
        sparse = _logits(sparse_m, prompt, args.steps)
        masked_m = model.with_ffn(None)
        masked_m.hooks.ffn_activation.append(mask)
        masked = _logits(masked_m, prompt, args.steps)
        d_b = float(np.abs(sparse - masked).max())
        line += (f" bundle_max_abs_diff={d_b:.3e} bundle_density={sparse_m.ffn.density:.3f}"
                 f" bundle_vs_dense_max_abs_diff={float(np.abs(sparse - dense).max()):.3e}")
        worst = max(worst, d_b)
    print(f"{line} tokens={len(prompt)}+{args.steps} tol={args.tol:g}")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
