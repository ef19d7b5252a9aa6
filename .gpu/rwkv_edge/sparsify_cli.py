"""`rwkv-edge sparsify`: the CLI of rwkv_edge.sparsify (registered in cli._PLUGINS).

Bad input (missing files, too little text, an output that exists or cannot be written, a work dir of
other settings) is one line and exit 2 with nothing at --out; no setting within --max-kld is one line
and exit 1 (the measurements stay in the work dir, so a rerun with another --max-kld is quick);
Ctrl-C leaves the finished stages in the work dir for the next run.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from .cli import non_negative_float, positive_int


def _list(kind):
    def parse(s: str):
        try:
            vals = tuple(kind(x) for x in s.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma list, got '{s}'") from None
        if not vals:
            raise argparse.ArgumentTypeError("empty list")
        return vals
    return parse


def settings_from_args(args):
    """The Settings a parsed command line asks for (also used by the test that rebuilds the
    embedded package from its recorded command)."""
    from .sparsify import Settings

    return Settings(dtype=args.dtype, tokens=args.tokens, heldout=args.heldout_tokens, ctx=args.ctx,
                    bits=tuple(sorted(args.bits)), targets=tuple(sorted(args.targets)), seed=args.seed)


def _command(args) -> str:
    """The command line as recorded in model.json: file arguments by base name (machine-independent)."""
    parts = ["rwkv-edge", "sparsify", "--model", os.path.basename(args.model), "--text", os.path.basename(args.text),
             "--out", os.path.basename(os.path.normpath(args.out)), "--dtype", args.dtype, "--max-kld", f"{args.max_kld:g}",
             "--tokens", str(args.tokens), "--heldout-tokens", str(args.heldout_tokens), "--ctx", str(args.ctx),
             "--bits", ",".join(map(str, sorted(args.bits))), "--targets", ",".join(f"{t:g}" for t in sorted(args.targets)),
             "--seed", str(args.seed)]
    return " ".join(shlex.quote(p) for p in parts)


def run_sparsify(args, parser) -> int:
    from .config import ModelLoadError
    from .predictors.collect import CollectError
    from .sparsify import NoCandidate, SparsifyError, sparsify
    from .tokenizer import TokenizerError

    log = None if args.quiet else (lambda s: print(f"sparsify: {s}", file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    try:
        man = sparsify(args.model, args.text, args.out, settings_from_args(args), max_kld=args.max_kld,
                       tokenizer=args.tokenizer, work_dir=args.work, backend=args.backend,
                       speed_tokens=args.speed_tokens, until=args.until, keep_work=args.keep_work,
                       progress=not args.no_progress, log=log, command=_command(args))
    except (SparsifyError, ModelLoadError, TokenizerError, CollectError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except NoCandidate as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if man is None:
        return 0
    m, p = man["measured"], man["predictor"]
    print(f"wrote {args.out}: {p['bits']}-bit W_k predictor at recall {p['target_recall']}, density {m['density']:.3f}, "
          f"{m['bytes_per_token']} bytes/token (dense {m['dense_bytes_per_token']}), KLD mean {m['kld_mean']:.4f} "
          f"p99 {m['kld_p99']:.4f}, same top-1 {m['same_top1']:.3f}, ppl ratio {m['ppl_ratio']:.4f}, decode "
          f"{m['decode_tok_s']} tok/s (dense {m['dense_decode_tok_s']}) in {time.perf_counter() - t0:.0f} s")
    return 0


def add_sparsify_parser(subparsers) -> argparse.ArgumentParser:
    from .sparsify import DEFAULT_MAX_KLD, STAGES

    p = subparsers.add_parser(
        "sparsify", help="one command: official checkpoint -> measured sparse model package (DIR)",
        description="Convert the checkpoint, collect FFN inputs on the calibration text, fit 2/4-bit W_k "
                    "predictors at a few recall targets, measure each against dense on held-out windows split "
                    "off the text, and package the setting reading the fewest bytes per token whose mean KL "
                    "divergence to dense is within --max-kld. Resumable: rerun the same command after Ctrl-C.")
    p.add_argument("--model", required=True, help="official checkpoint (.pth)")
    p.add_argument("--text", required=True, help="calibration text (UTF-8); held-out windows are split off it")
    p.add_argument("--out", required=True, help="package directory to create (must not exist)")
    p.add_argument("--dtype", choices=["int8", "fp16", "fp32"], default="int8", help="model file storage (default: int8)")
    p.add_argument("--max-kld", type=non_negative_float, default=DEFAULT_MAX_KLD,
                   help=f"largest mean KL divergence to the same weights dense, nats (default: {DEFAULT_MAX_KLD})")
    p.add_argument("--tokens", type=positive_int, default=100_000, help="fitting tokens (default: 100000)")
    p.add_argument("--heldout-tokens", type=positive_int, default=4096,
                   help="held-out tokens for the measurements, whole --ctx windows (default: 4096)")
    p.add_argument("--ctx", type=positive_int, default=512, help="tokens per KLD window (default: 512)")
    p.add_argument("--bits", type=_list(int), default=(2, 4), help="predictor bits to try (default: 2,4)")
    p.add_argument("--targets", type=_list(float), default=(0.98, 0.99, 0.995),
                   help="recall targets to try (default: 0.98,0.99,0.995)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: the one next to --model)")
    p.add_argument("--backend", choices=["auto", "numba", "reference"], default="auto",
                   help="CPU kernels (default: auto); bytes/token are counted by the numba kernels only")
    p.add_argument("--speed-tokens", type=positive_int, default=64, help="decoded tokens per speed round (default: 64)")
    p.add_argument("--work", help="work directory for the stages (default: OUT.work beside OUT; removed on success)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    p.add_argument("--until", choices=STAGES, help="stop after this stage (the same command continues later)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="no stage lines")
    p.set_defaults(func=run_sparsify)
    return p
