"""KL divergence of head-only quantization: what a cheaper head costs, everything else float32.

    python tools/head_kld.py --model M.pth [--text heldout.txt] [--calib calib.txt] [--tokens 1024]

The head's input (ln_out of the last block, (T, D)) is captured on --text by the float32 model; then
for each head variant the logits W_hat x are compared with W x: KLD(p || q) mean and same-top-1 over
the T positions. Exact for "this head and nothing else changed" and cheap (one (T, D) x (D, V) matmul
per variant). Variants: int8 rows (the int8 file's head), int4 (quant/q4.py, least-squares scales),
int4 with importance from --calib (convert --calib), and int4 with the N rows of the most probable
tokens on --calib kept int8 (a split head), and the rescored head of the native backend
(backends/native_head.py: every logit from a 4-bit copy of the int8 head, each position's top K by
those logits from the int8 rows; --rescore K list). Prints one JSON line per variant.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
SHARED = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data")


def head_inputs(config, weights, ids, ctx=512):
    """(T, D) float32: the input of the head at every position of ids (windows of ctx tokens)."""
    from rwkv_edge.backends import get_backend
    from rwkv_edge.models import model_class

    head, got = weights["head.weight"], []

    class Capture:
        def __init__(self, ops):
            self._ops = ops

        def __getattr__(self, a):
            return getattr(self._ops, a)

        def linear(self, x, W):
            if W is head:
                got.append(np.asarray(x, np.float32).reshape(-1, np.shape(x)[-1]))
            return self._ops.linear(x, W)

    m = model_class(config.version)(config, weights, backend="numba")
    m.ops = Capture(get_backend("numba"))
    for i in range(0, len(ids), ctx):
        m.forward(ids[i:i + ctx], None, full_output=True)
    return np.concatenate(got)


def _log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def main(argv=None) -> int:
    from rwkv_edge.errors import ArgumentParser, run_main
    ap = ArgumentParser(prog="head_kld.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=os.path.join(SHARED, "heldout.txt"))
    ap.add_argument("--calib", default=os.path.join(SHARED, "calib.txt"))
    ap.add_argument("--tokens", type=int, default=1024, help="scored positions of --text")
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--split-rows", default="1024,4096", help="N of the split-head variants (comma list)")
    ap.add_argument("--rescore", default="64,256", help="K of the rescored-head variants (comma list)")
    args = ap.parse_args(argv)
    return run_main("head_kld.py", lambda: _run(ap, args))


def _run(ap, args) -> int:
    from rwkv_edge.quant import dequantize_int8_rows, dequantize_q4, quantize_int8_rows, quantize_q4
    from rwkv_edge.tokenizer import load_tokenizer
    from rwkv_edge.weights import load_checkpoint

    for p in (args.model, args.text, args.calib):
        if not os.path.isfile(p):
            ap.error(f"{p}: no such file")
    config, w = load_checkpoint(args.model)
    tok = load_tokenizer(None, args.model, config.vocab_size)
    read = lambda p, n: tok.encode(open(p, encoding="utf-8").read())[:n]     # noqa: E731
    Xh = head_inputs(config, w, read(args.text, args.tokens))
    Xc = head_inputs(config, w, read(args.calib, args.calib_tokens))
    W = np.asarray(w["head.weight"], np.float32)
    P = _log_softmax(Xh @ W.T)
    p = np.exp(P)

    def report(name, Wq, Z=None):
        Q = _log_softmax(Xh @ Wq.T if Z is None else Z)
        kl = (p * (P - Q)).sum(1)
        print(json.dumps({"head": name, "kld_mean": round(float(kl.mean()), 6), "kld_p99": round(float(np.percentile(kl, 99)), 5),
                          "same_top1": round(float((P.argmax(1) == Q.argmax(1)).mean()), 4), "positions": len(kl)}),
              flush=True)

    q8, s8 = quantize_int8_rows(W)
    W8 = dequantize_int8_rows(q8, s8)
    report("int8 rows", W8)
    report("int4 (least-squares scales)", dequantize_q4(*quantize_q4(W, search=True)))
    imp = (Xc.astype(np.float64) ** 2).mean(0)
    W4 = dequantize_q4(*quantize_q4(W, search=True, importance=imp))
    report("int4 (--calib importance)", W4)
    order = np.argsort(-np.exp(_log_softmax(Xc @ W.T)).mean(0))       # most probable tokens on --calib first
    for n in (int(s) for s in args.split_rows.split(",") if s.strip()):
        Wm = W4.copy()
        Wm[order[:n]] = W8[order[:n]]
        report(f"int4 calib + {n} most probable rows int8", Wm)
    from rwkv_edge.backends.native_head import derive_q4, rescore_reference
    W4r = dequantize_q4(*derive_q4({"head.weight.q": q8, "head.weight.scale": s8}))   # the native backend's copy
    for k in (int(s) for s in args.rescore.split(",") if s.strip()):
        report(f"int4 of int8 rows + top {k} rescored int8", None, rescore_reference(Xh @ W4r.T, Xh @ W8.T, k))
    return 0


if __name__ == "__main__":
    sys.exit(main())
