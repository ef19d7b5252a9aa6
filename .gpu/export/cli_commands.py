"""CLI subcommands of the export package: `export-onnx` and `verify-onnx`.

`rwkv_edge.cli` calls `add_export_parser(sub)` and `add_verify_parser(sub)`; each registers a
subparser whose `func(args, parser)` returns an exit code. Bad arguments (missing files, a bundle
for another model, inconsistent options) are argparse errors (one line, exit 2); a failed check
is exit 1. Heavy imports happen inside the run functions. The predictor bundle is adapted to the
plain arrays `export_onnx` takes here, and only here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

# A fixed English passage: verification runs on real text when the export has a tokenizer.
_PASSAGE = ("The old man looked out over the harbour as the boats came in with the evening tide. "
            "He had lived in the village all his life, and he knew every family by name, every "
            "house by the colour of its door, and every storm by the sound it made against the "
            "shutters. When the lamps were lit along the quay, he walked slowly home, thinking of "
            "the letter that had arrived that morning and of what it might mean for his daughter.")


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{s}'") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def _int_at_least(lo: int):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{s}'") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    return parse


def _topk_list(s: str) -> list:
    try:
        ks = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K or K0,K1,... (integers), got '{s}'") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"top-k values must be >= 1, got '{s}'")
    return ks


def _load_model(parser, path: str):
    from rwkv_edge import load_model
    from rwkv_edge.config import ModelLoadError

    if not os.path.exists(path):
        parser.error(f"--model {path}: no such file")
    try:
        try:
            from rwkv_edge.runtime import open_model
        except ImportError:
            return load_model(path)
        return open_model(path, dense=True)            # a package's weights: the graphs' reference is dense
    except (ModelLoadError, ValueError) as e:
        parser.error(str(e))


def bundle_topk(bundle, ffn_dim: int, scale: float = 1.0) -> list:
    """Static top-k per layer from a bundle's calibration: the calibrated k for top-k predictors,
    else the share of neurons above the threshold on the calibration rows (1 - percentile),
    times `scale`, clamped to [1, F]."""
    ks = []
    for p in bundle.predictors:
        c = p.calib
        k = c.k if getattr(p, "mode", "") == "topk" and c.k > 0 else (1.0 - c.percentile) * ffn_dim
        ks.append(int(min(ffn_dim, max(1, math.ceil(k * scale - 1e-9)))))
    return ks


def bundle_predictors(bundle) -> list:
    """The quantized W_k matrices of a bundle of "quantized" predictors (ValueError otherwise)."""
    out = []
    for i, p in enumerate(bundle.predictors):
        qm = getattr(p, "qm", None)
        if qm is None:
            raise ValueError(f"layer {i}: predictor kind '{p.kind}' cannot be exported to ONNX; "
                             f"export needs a 'quantized' (n-bit W_k) bundle")
        out.append(qm)
    return out


def _package_inputs(parser, args) -> None:
    """--model DIR (a model package): export its model file with its predictors (the sparse graph)
    and its tokenizer, or only the dense graph with --dense. Rewrites args in place."""
    from rwkv_edge.config import ModelLoadError
    from rwkv_edge.package import check_parts, is_package, part, read_manifest

    if not is_package(args.model):
        if args.dense:
            parser.error("--dense applies to --model PACKAGE_DIR (for a model file, leave out --predictors)")
        return
    try:
        man = read_manifest(args.model)
        check_parts(args.model, man)
    except ModelLoadError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if not args.dense and args.predictors is None and args.sparse_topk is None and args.predictor_bits is None:
        args.predictors = part(args.model, man, "predictors")
    args.tokenizer = args.tokenizer or part(args.model, man, "tokenizer")
    args.model = part(args.model, man, "model")


def run_export(args, parser) -> int:
    _package_inputs(parser, args)
    if args.sparse_topk_scale is not None and not (args.predictors or args.sparse_topk):
        parser.error("--sparse-topk-scale needs --predictors (or --sparse-topk)")
    if args.predictor_bits is not None and args.predictors:
        parser.error("--predictor-bits quantizes W_k at export time; do not combine it with --predictors")
    if args.predictor_bits is not None and not args.sparse_topk:
        parser.error("--predictor-bits needs --sparse-topk (there is no calibration to take k from)")
    for flag, path in (("--predictors", args.predictors), ("--tokenizer", args.tokenizer)):
        if path and not os.path.isfile(path):
            parser.error(f"{flag} {path}: no such file")
    model = _load_model(parser, args.model)
    cfg = model.config
    if cfg.version != "x070":
        parser.error(f"--model {args.model}: ONNX export supports RWKV-7 (x070) models, this one is {cfg.version}")
    topk, preds, info = None, None, {}
    if args.predictors:
        from rwkv_edge.predictors.bundle import PredictorBundle
        try:
            bundle = PredictorBundle.load(args.predictors, model)
            preds = bundle_predictors(bundle)
        except ValueError as e:
            parser.error(f"--predictors {args.predictors}: {e}")
        topk = bundle_topk(bundle, cfg.ffn_dim, args.sparse_topk_scale or 1.0)
        info = {"bundle": os.path.basename(args.predictors), "target": bundle.target,
                "metric": bundle.metric, "topk_from": "bundle calibration"}
    if args.sparse_topk:
        ks = args.sparse_topk * cfg.n_layer if len(args.sparse_topk) == 1 else args.sparse_topk
        if len(ks) != cfg.n_layer:
            parser.error(f"--sparse-topk: give 1 or {cfg.n_layer} values, got {len(args.sparse_topk)}")
        scale = args.sparse_topk_scale or 1.0
        topk = [min(cfg.ffn_dim, max(1, math.ceil(k * scale))) for k in ks]
        info["topk_from"] = "--sparse-topk"
    if topk is not None:
        info["topk_scale"] = args.sparse_topk_scale or 1.0
    if args.predictor_bits is not None:
        from rwkv_edge.quant import QuantizedMatrix
        gs = None if args.predictor_group_size == 0 else args.predictor_group_size
        if gs is not None and cfg.n_embd % gs:
            parser.error(f"--predictor-group-size {gs} does not divide n_embd {cfg.n_embd}")
        preds = [QuantizedMatrix.quantize(b.ffn_key, args.predictor_bits, gs) for b in model.blocks]
        info["predictor_source"] = f"W_k quantized at export ({args.predictor_bits}-bit, group {gs or 'row'})"
    tokenizer = args.tokenizer
    if tokenizer is None:
        cand = os.path.join(os.path.dirname(os.path.abspath(args.model)), "tokenizer.json")
        tokenizer = cand if os.path.isfile(cand) else None
    from .export import export_onnx
    try:
        out = export_onnx(model, args.out, args.dtype, topk, preds, tokenizer=tokenizer,
                          prefill=not args.no_prefill, sparsity_info=info, int8_matmul=args.int8_matmul,
                          exact_sparse=args.exact_sparse)
    except (ValueError, FileExistsError) as e:
        parser.error(str(e))
    meta = json.loads((out / "model.json").read_text())
    sizes = ", ".join(f"{f} {n / 1e6:.1f} MB" for f, n in meta["files"].items())
    print(f"wrote {out}: {sizes}")
    if topk is not None:
        print(f"sparse top-k per layer: {topk} (of {cfg.ffn_dim})")
    if args.ort:
        from .verify import to_ort
        for f, r in to_ort(out).items():
            print(f"{r['ort_file']}: {r['ort_bytes'] / 1e6:.1f} MB, max |logit diff| vs {f} {r['max_abs_diff']:.2e}")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export-onnx", help="export an RWKV-7 model to ONNX (step + prefill graphs, "
                                                  "dense and sparse) with a model.json sidecar")
    p.add_argument("--model", required=True, help="model file (.pth, .rwkve) or a model package directory "
                                                  "(exports its sparse graph with its predictors)")
    p.add_argument("--dense", action="store_true", help="a model package: export the dense graph only")
    p.add_argument("--out", required=True, help="output directory (replaced atomically if it is an export)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "int8"), default="fp32", help="weight storage (default fp32)")
    p.add_argument("--predictors", help="predictor bundle (quantized W_k kind): adds model.sparse.onnx "
                                        "with the bundle's per-layer top-k")
    p.add_argument("--sparse-topk-scale", type=_positive_float, default=None,
                   help="multiply every layer's top-k by S (e.g. 1.2 for a safety margin)")
    p.add_argument("--sparse-topk", type=_topk_list, default=None,
                   help="static top-k: K for every layer or K0,K1,... per layer (overrides the bundle's)")
    p.add_argument("--predictor-bits", type=int, choices=(2, 4, 8), default=None,
                   help="without a bundle: score neurons with W_k quantized to this many bits")
    p.add_argument("--predictor-group-size", type=_int_at_least(0), default=64,
                   help="group size of --predictor-bits (0 = one scale per row; default 64)")
    p.add_argument("--int8-matmul", choices=("dynamic", "dequant"), default="dynamic",
                   help="int8: MatMulInteger with dynamically quantized activations (fast) or "
                        "weight-only DequantizeLinear + fp32 MatMul (more exact; slow on onnxruntime CPU)")
    p.add_argument("--tokenizer", help="tokenizer.json to ship (default: the one next to the model)")
    p.add_argument("--no-prefill", action="store_true", help="do not write the T-token prefill graph")
    p.add_argument("--exact-sparse", action="store_true",
                   help="also write model.exact.onnx: the FFN reads only the W_v rows of active neurons "
                        "(lossless, the dense graph's logits)")
    p.add_argument("--ort", action="store_true", help="also convert to the ORT mobile format and check it")
    p.set_defaults(func=run_export)
    return p


def _verify_tokens(onnx_dir: str, n: int, vocab: int) -> list:
    import numpy as np

    ids = []
    tok_file = os.path.join(onnx_dir, "tokenizer.json")
    if os.path.isfile(tok_file):
        from tokenizers import Tokenizer
        t = Tokenizer.from_file(tok_file)
        ids = [i for i in t.encode(_PASSAGE).ids if i < vocab]
    rng = np.random.default_rng(0)
    while len(ids) < n:
        ids.append(int(rng.integers(0, vocab)))
    return ids[:n]


def run_verify(args, parser) -> int:
    from .export import read_sidecar
    from .verify import compare, to_ort

    try:
        meta = read_sidecar(args.onnx)
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--onnx {args.onnx}: {e}")
    model = _load_model(parser, args.model)
    if meta.get("fingerprint") != model.fingerprint:
        parser.error(f"--onnx {args.onnx} was exported from another model "
                     f"(fingerprint {meta.get('fingerprint')}, --model is {model.fingerprint})")
    variants = ["dense"] + (["sparse"] if meta.get("sparsity") else []) + \
        (["exact"] if "exact_step" in meta.get("graphs", {}) else [])
    if args.variant != "all":
        if args.variant not in variants:
            parser.error(f"--variant {args.variant}: {args.onnx} has no {args.variant} graph")
        variants = [args.variant]
    tol = args.max_diff if args.max_diff is not None else (1e-3 if meta["dtype"] == "fp32" else None)
    tokens = _verify_tokens(args.onnx, args.tokens, model.config.vocab_size)
    ok = True
    for v in variants:
        r = compare(args.onnx, model, tokens, v, greedy_tokens=args.greedy)
        line = (f"{v} ({meta['dtype']}): max |logit diff| {r['max_abs_diff']:.3e} over {r['tokens']} tokens "
                f"(logits up to {r['logit_scale']:.1f}), state {r['state_max_abs_diff']:.2e}, "
                f"greedy identical for {r.get('greedy_same', 0)}/{args.greedy} tokens")
        if "prefill_max_abs_diff" in r:
            line += f", prefill graph {r['prefill_max_abs_diff']:.2e}"
        print(line)
        if tol is not None and (r["max_abs_diff"] > tol or r.get("prefill_max_abs_diff", 0) > tol):
            print(f"FAIL: {v} differs by more than {tol:g}", file=sys.stderr)
            ok = False
    if args.ort:
        for f, r in to_ort(args.onnx, tokens[:16]).items():
            print(f"{r['ort_file']}: {r['ort_bytes'] / 1e6:.1f} MB (onnx {r['onnx_bytes'] / 1e6:.1f} MB), "
                  f"max |logit diff| vs {f} {r['max_abs_diff']:.2e}")
            if r["max_abs_diff"] > 1e-4:
                print(f"FAIL: {r['ort_file']} gives other logits than {f}", file=sys.stderr)
                ok = False
    return 0 if ok else 1


def add_verify_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("verify-onnx", help="compare an ONNX export with the Python runtime (onnxruntime)")
    p.add_argument("--onnx", required=True, help="export directory (holds model.json)")
    p.add_argument("--model", required=True, help="the model file (or model package) it was exported from")
    p.add_argument("--tokens", type=_int_at_least(1), default=64, help="tokens decoded one by one (default 64)")
    p.add_argument("--greedy", type=_int_at_least(0), default=32,
                   help="greedy continuation length compared (default 32)")
    p.add_argument("--variant", choices=("dense", "sparse", "exact", "all"), default="all")
    p.add_argument("--max-diff", type=_positive_float, default=None,
                   help="fail (exit 1) above this max |logit diff| (default: 1e-3 for fp32, report only otherwise)")
    p.add_argument("--ort", action="store_true", help="also convert to .ort and check it gives the same logits")
    p.set_defaults(func=run_verify)
    return p
