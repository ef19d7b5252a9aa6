"""Perplexity of a text file, windows of 512 tokens with the state carried.

    python tools/perplexity.py --model M --text FILE [--max-tokens N] [--predictors BUNDLE]
Last line: `ppl=YY.YY tokens=N`.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwkv_edge.cli import add_model_args, load_for_run, positive_int  # noqa: E402
from rwkv_edge.errors import ArgumentParser, read_text_file, run_main  # noqa: E402
from rwkv_edge.evaluate import perplexity  # noqa: E402

PROG = "perplexity.py"


def main(argv=None) -> int:
    """Bad input (a missing/damaged model, a --text that is not UTF-8): one line, exit 2."""
    return run_main(PROG, _main, argv)


def _main(argv=None) -> int:
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--text", required=True, help="a UTF-8 text file")
    ap.add_argument("--window", type=positive_int, default=512)
    ap.add_argument("--max-tokens", type=positive_int, help="score only the first N tokens")
    args = ap.parse_args(argv)
    if not os.path.exists(args.text):
        ap.error(f"--text {args.text}: no such file")
    text = read_text_file(args.text, "--text")
    model, tok = load_for_run(ap, args)
    ppl, n = perplexity(model, tok, text, window=args.window, max_tokens=args.max_tokens)
    print(f"ppl={ppl:.2f} tokens={n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
