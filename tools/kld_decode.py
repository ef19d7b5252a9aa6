"""KL divergence of our decode path against dense fp16, over held-out text (rwkv_edge.quality).

    python tools/kld_decode.py --model M.pth --predictors B.npz [--dtype int8|int4|int8-h4] [--ctx 256] [--windows 4]
        [--backend native]

quality.compare scores a candidate through forward(ids, full_output=True), i.e. our prefill path
(float BLAS). Decode runs other kernels (int8 activations in numba_i8dot, the fused block kernel,
the predictor's select), so here every candidate runs one token at a time through `step`, as decode
does; the base (dense fp16 model file) runs its prefill. Prints one JSON line per candidate:
dense <dtype>, sparse <dtype>.
"""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


class Stepwise:
    """forward(ids, state=None, full_output=True) by `step` per token (the decode kernels)."""

    def __init__(self, model):
        self.m, self.config, self.ffn = model, model.config, getattr(model, "ffn", None)

    def forward(self, ids, state=None, full_output=True):
        out = []
        for t in ids:
            lo, state = self.m.step(t, state)
            out.append(np.asarray(lo, np.float32).reshape(-1))
        return np.stack(out), state


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--predictors")
    ap.add_argument("--dtype", default="int8", help="int8, int4, int8-h4 (int8 + int4 head), int4-h8, fp16: "
                    "converted from --model into --workdir")
    ap.add_argument("--file", help="a converted model file of --model to score instead of --dtype's (e.g. an "
                    "int4 file made with convert --calib)")
    ap.add_argument("--text", default=os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "heldout.txt"))
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--workdir", default=os.path.join(os.path.dirname(HERE), "out", "bench"))
    ap.add_argument("--backend", default="numba", choices=("numba", "native"),
                    help="the candidates' CPU kernels (the fp16 base always runs on numba)")
    args = ap.parse_args(argv)
    for p in [args.model, args.text] + ([args.predictors] if args.predictors else []) + ([args.file] if args.file else []):
        if not os.path.exists(p):
            ap.error(f"{p}: no such file")
    from bench import _model_file
    from rwkv_edge import quality
    from rwkv_edge.runtime import open_model
    from rwkv_edge.tokenizer import load_tokenizer
    fp = open_model(args.model, backend="reference").fingerprint     # the converted files' cache key
    base = open_model(_model_file(args.model, "fp16", args.workdir, fp), backend="numba")
    tok = load_tokenizer(None, args.model, base.config.vocab_size)
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read())[: args.ctx * args.windows]
    f = args.file or _model_file(args.model, args.dtype, args.workdir, fp)
    tag = os.path.basename(args.file) if args.file else args.dtype
    cands = [(f"dense {tag}", open_model(f, backend=args.backend))]
    if args.predictors:
        cands.append((f"sparse {tag}", open_model(f, backend=args.backend, predictors=args.predictors)))
    for name, m in cands:
        r = quality.compare(base, Stepwise(m), ids, ctx=args.ctx, progress=False)
        keep = {k: r[k] for k in r if k.startswith(("kld", "same_top1", "ln_ppl", "ppl", "density", "n_tokens"))}
        print(json.dumps({"candidate": name, "backend": args.backend, "path": "decode (step)", "base": "dense fp16",
                          **keep}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
