"""LAMBADA accuracy and perplexity (lm-eval `lambada_openai` style).

    python tools/lambada.py --model M [--limit N] [--predictors BUNDLE] [--backend numba]
Last line: `lambada acc=0.XXXX ppl=YY.YY n=N`.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkv_edge.cli import add_model_args, load_for_run, positive_int, resolve_model_path  # noqa: E402
from rwkv_edge.errors import ArgumentParser, run_main  # noqa: E402
from rwkv_edge.evaluate import lambada_items, score_lambada  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "lambada_test.jsonl")


PROG = "lambada.py"


def main(argv=None) -> int:
    """Bad input (a missing/damaged model or data file): one line, exit 2."""
    return run_main(PROG, _main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--data", default=DEFAULT_DATA, help="lambada_test.jsonl (default: ../shared/data)")
    ap.add_argument("--limit", type=positive_int, help="only the first N items")
    ap.add_argument("--engine", choices=["rwkv-edge", "rwkv"], default="rwkv-edge",
                    help="rwkv: score with the reference `rwkv` pip package instead (for comparison)")
    args = ap.parse_args(argv)
    if not os.path.exists(args.data):
        ap.error(f"--data {args.data}: no such file")
    items = lambada_items(args.data, args.limit)   # a damaged data file fails before the model loads
    if args.engine == "rwkv":  # the package alone runs the model; ours is not loaded
        if args.predictors:
            ap.error("--predictors applies to --engine rwkv-edge only")
        from rwkv_peer import RwkvPackageModel
        from rwkv_edge.tokenizer import TokenizerError, load_tokenizer
        path = resolve_model_path(ap, args)
        model = RwkvPackageModel(path, "cuda fp16" if args.device == "cuda" else "cpu fp32")
        try:
            tok = load_tokenizer(args.tokenizer, path, model.config.vocab_size)
        except TokenizerError as e:
            ap.exit(2, f"{ap.prog}: error: {e}\n")
    else:
        model, tok = load_for_run(ap, args)
    t0 = time.time()
    r = score_lambada(model, tok, items)
    print(f"wall_s={time.time() - t0:.1f}", file=sys.stderr)
    print(f"lambada acc={r.accuracy:.4f} ppl={r.perplexity:.2f} n={r.n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
