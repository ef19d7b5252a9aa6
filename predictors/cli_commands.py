"""CLI subcommands of the predictors package: `collect`, `fit-predictors`, `predictor-report`.

`rwkv_edge.cli` calls `add_collect_parser(sub)`, `add_fit_parser(sub)` and `add_report_parser(sub)`;
each registers a subparser whose `func(args, parser)` returns an exit code. Heavy imports happen
inside the run functions. Bad values are argparse errors (one line, exit 2); so are failures while
running that bad input causes (another model's data, a damaged bundle): one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from rwkv_edge.cli import non_negative_int, positive_int as _positive_int, top_p_value as _fraction  # one set of types
from rwkv_edge.errors import check_text_file, error_exit


def _group_size(s: str):
    if s.lower() in ("row", "none", "0"):
        return None
    return _positive_int(s)


def _clip(s: str):
    if s.lower() == "auto":
        return "auto"
    if s.lower() in ("none", "off", "0"):
        return None
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', 'none' or a number of std, got '{s}'") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _common(p: argparse.ArgumentParser, device: bool = True, backend: bool = False) -> None:
    p.add_argument("--model", required=True, help="model file (.pth)")
    if backend:
        p.add_argument("--backend", choices=["reference", "numba"], default="numba",
                       help="CPU kernels for the model run (default: numba)")
    if device:
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to compute (default: cpu)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _fail(parser, msg) -> int:
    return error_exit(parser.prog, msg)


def _load_model(parser, path: str, device: str = "cpu", backend: str = "reference"):
    from rwkv_edge.config import ModelLoadError

    if not os.path.exists(path):
        parser.error(f"--model {path}: no such file")
    from rwkv_edge.runtime import open_model

    try:
        return open_model(path, backend=backend, device=device, dense=True)   # a package's weights, never sparse
    except (ModelLoadError, ValueError, ImportError, RuntimeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


def _tokens(parser, args, model, n_tokens, with_tokenizer: bool = False):
    from rwkv_edge.tokenizer import TokenizerError, load_tokenizer

    from .collect import encode_text

    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    check_text_file(args.text, "--text")      # binary files are refused, not tokenized into garbage
    try:
        tok = load_tokenizer(args.tokenizer, args.model, model.config.vocab_size)
    except TokenizerError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    ids = encode_text(tok, args.text, n_tokens)
    if not ids:
        parser.error(f"--text {args.text}: no tokens in the file")
    return (ids, tok) if with_tokenizer else ids


# --------------------------------------------------------------------------- collect


def run_collect(args, parser) -> int:
    from .collect import CollectError, collect, text_source_id

    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    model = _load_model(parser, args.model, args.device, args.backend)
    t0 = time.perf_counter()
    ids, tok = _tokens(parser, args, model, args.tokens, with_tokenizer=True)
    try:
        man = collect(model, ids, args.out, n_tokens=args.tokens, chunk=args.chunk,
                      progress=not args.no_progress, shard_rows=args.shard_rows,
                      source_id=text_source_id(args.text, tok), input=args.input)
    except CollectError as e:
        return _fail(parser, e)
    dt = time.perf_counter() - t0
    size = sum(layer["count"] for layer in man["layers"]) * man["dim"] * 2    # float16 rows stored
    print(f"collected {man['tokens']} tokens x {len(man['layers'])} layers ({man['input']} rows of {man['dim']}) into {args.out} "
          f"({size / 2**20:.0f} MiB) in {dt:.1f} s")
    return 0


def add_collect_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("collect", help="store FFN inputs of a text run, for fitting predictors",
                              description="Run text through the model and store each layer's FFN input "
                                          "(float16 shards + manifest.json). Re-running the same command resumes "
                                          "a partial run; another model's directory is refused.")
    _common(p, backend=True)
    p.add_argument("--text", required=True, help="UTF-8 text file (sampled evenly when --tokens is smaller)")
    p.add_argument("--out", required=True, help="output directory (new, or a partial run of the same model)")
    p.add_argument("--tokens", type=_positive_int, default=200_000, help="tokens to collect (default: 200000)")
    p.add_argument("--tokenizer", help="'world', a tokenizer.json or vocab .txt (default: next to the model)")
    p.add_argument("--chunk", type=_positive_int, default=512, help="tokens per forward window (default: 512)")
    p.add_argument("--shard-rows", type=_positive_int, default=65536, help="rows per shard file (default: 65536)")
    p.add_argument("--input", choices=["ffn", "early"], default="ffn",
                   help="rows stored: 'ffn' the FFN input (default); 'early' also ln1(x) and the FFN shift state, "
                        "known when the layer starts, so `fit-predictors` fits a bundle that scores a layer's "
                        "FFN set before its time-mix (3x the disk)")
    p.set_defaults(func=run_collect)
    return p


# --------------------------------------------------------------------------- fit


def run_fit(args, parser) -> int:
    from .collect import CollectError
    from .fit import fit, parse_kind

    try:
        parse_kind(args.kind)
    except ValueError as e:
        parser.error(str(e))
    if not os.path.isdir(args.data):
        parser.error(f"--data {args.data}: no such directory")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out {args.out}: directory {out_dir} does not exist")
    model = _load_model(parser, args.model)   # W_k and labels on CPU; --device is for training
    if args.group_size is not None and model.config.n_embd % args.group_size:
        parser.error(f"--group-size {args.group_size} does not divide n_embd {model.config.n_embd}")
    t0 = time.perf_counter()
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr))
    try:
        bundle = fit(model, args.data, kind=args.kind, bits=args.bits, group_size=args.group_size, clip=args.clip,
                     target=args.target_recall, metric=args.metric, margin=args.margin,
                     heldout_frac=args.heldout_frac, max_train=args.max_train, hidden=args.hidden,
                     epochs=args.epochs, threads=args.threads, pq_m=args.pq_m, pq_nbits=args.pq_nbits, seed=args.seed,
                     device=args.device, progress=not args.no_progress, log=log, early_map=args.early_map)
    except (CollectError, ValueError) as e:
        return _fail(parser, e)
    bundle.meta["fit_wall_seconds"] = round(time.perf_counter() - t0, 2)
    bundle.save(args.out)
    key_bytes = model.config.n_layer * model.config.ffn_dim * model.config.n_embd * 2
    print(f"wrote {args.out}: {bundle.describe()}, {bundle.nbytes} bytes "
          f"({100 * bundle.nbytes / key_bytes:.1f}% of fp16 W_k), fit in {time.perf_counter() - t0:.1f} s")
    return 0


def add_fit_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fit-predictors", help="fit per-layer FFN sparsity predictors from collected data",
                              description="Fit and calibrate one predictor per layer; writes one bundle (.npz).")
    _common(p)
    p.add_argument("--data", required=True, help="directory written by `collect`")
    p.add_argument("--kind", default="quantized",
                   help="quantized | mlp | pq, or a union such as quantized+mlp (default: quantized)")
    p.add_argument("--bits", type=int, choices=[1, 2, 4, 8], default=2, help="quantized: bits of W_k (default: 2)")
    p.add_argument("--group-size", type=_group_size, default=64,
                   help="quantized: columns per scale, or 'row' for one scale per row (default: 64)")
    p.add_argument("--clip", type=_clip, default="auto",
                   help="quantized: clip rows at +-N std before quantizing; 'auto' picks per layer (default)")
    p.add_argument("--target-recall", type=_fraction, default=0.99, help="per-layer recall target (default: 0.99)")
    p.add_argument("--metric", choices=["mass", "active"], default="mass",
                   help="recall of activation mass (default) or of active neurons")
    p.add_argument("--margin", type=float, default=0.003, help="calibrate to target + margin, a safety margin for unseen text (default: 0.003)")
    p.add_argument("--heldout-frac", type=_fraction, default=0.1, help="rows kept for calibration (default: 0.1)")
    p.add_argument("--max-train", type=_positive_int, default=65536,
                   help="mlp: training rows per layer (default: 65536)")
    p.add_argument("--hidden", type=_positive_int, default=64, help="mlp: hidden width (default: 64)")
    p.add_argument("--epochs", type=_positive_int, default=4, help="mlp: epochs (default: 4)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="mlp: torch CPU threads (default: torch's choice; 1 is faster on a busy machine)")
    p.add_argument("--pq-m", type=_positive_int, default=None, help="pq: sub-vectors per row (default: n_embd/4)")
    p.add_argument("--pq-nbits", type=int, choices=range(1, 9), default=6, metavar="1..8",
                   help="pq: bits per code (default: 6)")
    p.add_argument("--early-map", choices=["full", "diag"], default="diag",
                   help="early rows: the ln1 -> FFN input map, its diagonal d (element-wise, 2.6x smaller bundle, "
                        "what the CUDA fused decode runs) or a full (D, D) A (default: diag)")
    p.add_argument("--out", required=True, help="bundle file to write (.npz)")
    p.add_argument("--quiet", action="store_true", help="no per-layer lines")
    p.set_defaults(func=run_fit)
    return p


# --------------------------------------------------------------------------- report


def run_report(args, parser) -> int:
    from .bundle import PredictorBundle
    from .report import report

    for path in args.predictors:
        if not os.path.isfile(path):
            parser.error(f"--predictors {path}: no such file")
    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    if args.plot and not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
        parser.error(f"--plot {args.plot}: directory does not exist")
    model = _load_model(parser, args.model, backend=args.backend)
    try:
        bundles = [PredictorBundle.load(path, model=model) for path in args.predictors]
    except ValueError as e:
        return _fail(parser, e)
    ids = _tokens(parser, args, model, args.tokens)
    t0 = time.perf_counter()
    if args.plot:
        from rwkv_edge.plots import PlotError, plot_report

        from .report import evaluate, format_report, summarize
        stats = evaluate(model, bundles, ids, args.chunk, not args.no_progress)
        tables = [summarize(st, b, model.config) for st, b in zip(stats, bundles)]
        text = "\n\n".join(format_report(t, b, model.config, len(ids), nm)
                            for t, b, nm in zip(tables, bundles, args.predictors))
        try:
            plot_report(tables, [os.path.basename(n) for n in args.predictors], args.plot)
        except PlotError as e:
            return _fail(parser, e)
    else:
        text = report(model, bundles, ids, chunk=args.chunk, progress=not args.no_progress, names=args.predictors)
    print(text)
    print(f"# report over {len(ids)} tokens in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predictor-report", help="per-layer sparsity/recall of a predictor bundle on text",
                              description="Run text through the dense model and compare the bundle's predictions "
                                          "with the true active neurons, per layer.")
    _common(p, device=False, backend=True)
    p.add_argument("--predictors", required=True, nargs="+", metavar="BUNDLE",
                   help="bundle(s) written by fit-predictors; several are measured on one run, one table each")
    p.add_argument("--text", required=True, help="UTF-8 text file")
    p.add_argument("--tokens", type=_positive_int, default=20_000, help="tokens to evaluate (default: 20000)")
    p.add_argument("--tokenizer", help="'world', a tokenizer.json or vocab .txt (default: next to the model)")
    p.add_argument("--chunk", type=_positive_int, default=512, help="tokens per forward window (default: 512)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw per-layer recall vs predicted sparsity (needs matplotlib)")
    p.set_defaults(func=run_report)
    return p
