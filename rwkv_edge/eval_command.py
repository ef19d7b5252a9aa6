"""`rwkv-edge eval`: a candidate against the dense base, printed as `llama-perplexity --kl-divergence` does.

    rwkv-edge eval --model M (--predictors B | --candidate FILE_OR_DIR) (--text T | --lambada F)
                   [--limit N] [--ctx 512] [--save-base F] [--base F] [--backend numba]
The last line is key=value pairs (kld_mean=... kld_p99=... same_top1=... ppl_base=... ppl=... density=...).
Bad input (a base file of another model, tokenizer or text; a text shorter than one context; a
directory that is not an export) is one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

from .cli import add_model_args, load_for_run, non_negative_int, positive_int


def _die(parser, msg: str):
    parser.exit(2, f"{parser.prog}: error: {msg}\n")


def format_report(r: dict, name: str = "candidate") -> str:
    """The readable block (llama.cpp's section names) followed by the key=value line."""
    pct = lambda v: f"{100 * v:8.3f} %"                                   # noqa: E731
    lines = [f"====== Perplexity statistics ({name} vs dense base, {r['n_tokens']} tokens) ======",
             f"Mean PPL(Q)                   : {r['ppl']:12.4f}",
             f"Mean PPL(base)                : {r['ppl_base']:12.4f}",
             f"Mean ln(PPL(Q)/PPL(base))     : {r['ln_ppl_ratio']:12.6f} ± {r['ln_ppl_ratio_se']:.6f}",
             f"Mean PPL(Q)/PPL(base)         : {r['ppl'] / r['ppl_base']:12.6f}",
             f"Mean PPL(Q)-PPL(base)         : {r['delta_ppl']:12.4f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {r['kld_mean']:10.6f} ± {r['kld_se']:.6f}",
             f"Maximum KLD: {r['kld_max']:10.6f}",
             f"99.9%   KLD: {r['kld_p999']:10.6f}",
             f"99.0%   KLD: {r['kld_p99']:10.6f}",
             f"95.0%   KLD: {r['kld_p95']:10.6f}",
             f"90.0%   KLD: {r['kld_p90']:10.6f}",
             f"Median  KLD: {r['kld_median']:10.6f}",
             f"10.0%   KLD: {r['kld_p10']:10.6f}",
             "", "====== Token probability statistics ======",
             f"Mean    Δp: {pct(r['dp_mean'])}",
             f"RMS     Δp: {pct(r['dp_rms'])}",
             f"Same top p: {pct(r['same_top1'])} ± {100 * r['same_top1_se']:.3f} %"]
    if r.get("density") is not None:
        lines.append(f"FFN density run: {r['density']:.4f}")
    if "lambada_acc" in r:
        lines += ["", f"====== LAMBADA ({r['lambada_n']} items) ======",
                  f"accuracy  base {r['lambada_acc_base']:.4f}  candidate {r['lambada_acc']:.4f}",
                  f"ppl       base {r['lambada_ppl_base']:.3f}  candidate {r['lambada_ppl']:.3f}"]
    keys = ["kld_mean", "kld_se", "kld_p99", "kld_max", "same_top1", "same_top1_se", "dp_mean", "dp_rms",
            "ppl_base", "ppl", "ln_ppl_ratio", "n_tokens", "density"]
    keys += [k for k in ("lambada_acc_base", "lambada_acc", "lambada_ppl_base", "lambada_ppl", "lambada_n") if k in r]
    kv = " ".join(f"{k}={_num(r.get(k))}" for k in keys)
    return "\n".join(lines + ["", kv])


def _num(v) -> str:
    if v is None:
        return "na"
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def _segments(parser, args, tok):
    """(segments, lambada word lengths or None) from --text / --lambada and --limit."""
    from .evaluate import lambada_items
    from .quality import lambada_segments, window_segments

    if args.lambada:
        if not os.path.isfile(args.lambada):
            parser.error(f"--lambada {args.lambada}: no such file")
        try:
            items = lambada_items(args.lambada, args.limit)
        except (ValueError, KeyError) as e:
            _die(parser, f"--lambada {args.lambada}: not a LAMBADA jsonl file ({type(e).__name__}: {e})")
        if not items:
            _die(parser, f"--lambada {args.lambada}: no items")
        return lambada_segments(tok, items)
    if not os.path.isfile(args.text):
        parser.error(f"--text {args.text}: no such file")
    try:
        with open(args.text, encoding="utf-8") as f:
            text = f.read() if args.limit is None else f.read(args.limit * 16)    # enough characters
    except UnicodeDecodeError:
        _die(parser, f"--text {args.text}: not UTF-8 text")
    ids = tok.encode(text)
    if args.limit is not None:
        ids = ids[: args.limit]
    try:
        return window_segments(ids, args.ctx), None
    except ValueError as e:
        _die(parser, f"--text {args.text}: {e}")


def _candidate(parser, args, model):
    """The candidate model: the base with a sparse FFN (--predictors) or --candidate; for a model
    package given as --model and neither of them, the package run sparse; else None."""
    from .candidates import load_candidate
    from .package import is_package

    if args.predictors:
        from rwkv_edge.predictors.bundle import PredictorBundle
        from .runtime import run_sparse

        name = os.path.basename(args.predictors)
        if args.candidate and not os.path.isfile(args.candidate):
            _die(parser, f"--candidate {args.candidate}: with --predictors it must be a model file")
        try:
            # a converted file of the same weights (--candidate), or the base itself, run sparse on the bundle
            m = load_candidate(args.candidate, model, args.backend, args.device) if args.candidate else model
            m = run_sparse(m, PredictorBundle.load(args.predictors, model=m), args.device)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            _die(parser, str(e))
        return m, f"{os.path.basename(args.candidate)} + {name}" if args.candidate else name
    if args.candidate:
        try:
            cand = load_candidate(args.candidate, model, args.backend, args.device, args.onnx_variant)
            name = os.path.basename(os.path.normpath(args.candidate))
            if args.native_ffn != "exact":              # the native backend's every-row dense FFN
                from .backends.native import NativeRWKV7
                if not isinstance(cand, NativeRWKV7) or cand.ffn is not None:
                    _die(parser, "--native-ffn dense needs --backend native and a dense model file candidate")
                cand, name = cand.with_ffn_mode(args.native_ffn), f"{name} (native ffn {args.native_ffn})"
            return cand, name
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            _die(parser, str(e))
    path = args.model
    if path and is_package(path) and not args.dense:
        try:
            cand = load_candidate(path, model, args.backend, args.device)
        except (ValueError, RuntimeError) as e:
            _die(parser, str(e))
        if getattr(cand, "ffn", None) is None:
            _die(parser, f"--model {path}: the package has no predictors; give --predictors or --candidate")
        return cand, os.path.basename(os.path.normpath(path)) + " (sparse)"
    return None, None


def run_eval(args, parser) -> int:
    from .quality import (compute_base, lambada_scores, load_base, run_segments, save_base, summarize,
                          tokenizer_id)

    from .package import is_package
    from .runtime import default_model_path

    args.model = args.model or default_model_path()
    if not (args.predictors or args.candidate or args.save_base or (args.model and is_package(args.model))):
        parser.error("give --predictors or --candidate (or only --save-base to store the base distributions)")
    if args.base and args.save_base:
        parser.error("--base and --save-base exclude each other")
    if args.save_base and not os.path.isdir(os.path.dirname(os.path.abspath(args.save_base))):
        parser.error(f"--save-base {args.save_base}: directory does not exist")
    dense_args = copy.copy(args)
    dense_args.predictors, dense_args.dense = None, True          # the base: dense (a package's weights too)
    if args.candidate and args.backend == "native":               # native runs the candidate file only
        dense_args.backend = "auto"
    model, tok = load_for_run(parser, dense_args)
    tid = tokenizer_id(tok, model.config.vocab_size)
    segs, words = _segments(parser, args, tok)
    ctx = args.ctx if words is None else 0                   # LAMBADA segments have no window size
    base = None
    if args.base:
        try:
            base = load_base(args.base, model, tid)
            base.check(segments=segs, ctx=ctx, where=args.base)
        except ValueError as e:
            _die(parser, str(e))
    cand, name = _candidate(parser, args, model)
    if args.head_rescore:
        if not hasattr(cand, "with_head_rescore"):
            parser.error("--head-rescore runs on the native backend: give --backend native and a --candidate file")
        try:
            cand, name = cand.with_head_rescore(args.head_rescore), f"{name} + head rescore {args.head_rescore}"
        except (ValueError, RuntimeError) as e:
            _die(parser, str(e))
    progress = not args.no_progress
    if args.save_base:
        base = compute_base(model, segs, ctx, top_k=args.top_k, tokenizer=tid, progress=progress)
        save_base(args.save_base, base)
        size = os.path.getsize(args.save_base)
        print(f"wrote {args.save_base}: {base.n_tokens} positions, {size / 2**20:.1f} MiB", file=sys.stderr)
        if cand is None:
            return 0
    arr = run_segments(None if base is not None else model, cand, segs, base, progress)
    r = summarize(arr)
    if words is not None:
        r.update(lambada_scores(arr, segs, words))
    print(format_report(r, name))
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="KL divergence / same-top-1 / ppl of a candidate against the dense model",
                              description="Score a sparse bundle, a converted model file or an ONNX export against "
                                          "the dense base on the same tokens, as llama-perplexity --kl-divergence "
                                          "does. The base distributions can be stored once (--save-base) and reused "
                                          "(--base).")
    add_model_args(p)
    p.add_argument("--candidate", help="a converted model file (int8/fp16) of the same weights, an ONNX export dir, "
                                       "or a model package dir (default with --model PACKAGE: the package run sparse); "
                                       "a model file with --predictors runs sparse on them")
    p.add_argument("--head-rescore", type=positive_int, metavar="K",
                   help="native: the candidate's logits from a 4-bit copy of its int8 head, the top K from the "
                        "int8 rows (backends/native_head.py)")
    p.add_argument("--onnx-variant", choices=["dense", "sparse"], default=None,
                   help="which graph of an ONNX export (default: sparse if it has one)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="UTF-8 text, scored in --ctx windows each starting with <|endoftext|>")
    src.add_argument("--lambada", help="lambada_test.jsonl: also reports LAMBADA accuracy / ppl of both")
    p.add_argument("--limit", type=positive_int, help="text: first N tokens (whole windows); lambada: first N items")
    p.add_argument("--ctx", type=positive_int, default=512, help="window length for --text (default: 512)")
    p.add_argument("--save-base", metavar="FILE", help="store the base distributions here (.npz) and use them")
    p.add_argument("--base", metavar="FILE", help="stored base distributions (skip running the dense model)")
    p.add_argument("--top-k", type=non_negative_int, default=0,
                   help="--save-base: keep the top K log-probs + tail mass per position; 0 (default) keeps all "
                        "as float16 (exact KL, 2 bytes x vocab per position)")
    p.add_argument("--native-ffn", choices=["exact", "dense"], default="exact",
                   help="--backend native --candidate FILE: the FFN without predictor, exact (default: value rows "
                        "only where relu(k)^2 > 0, lossless) or dense (every row, the activation rounded to int8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_eval)
    return p
