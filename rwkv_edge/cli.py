"""`rwkv-edge` command line: argparse subcommands, heavy imports only inside the command run."""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys


# --- argument types: bad values are argparse errors (message + exit code 2) --------------------
def non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{s}'") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_int(s: str) -> int:
    v = non_negative_int(s)
    if v == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def _float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{s}'") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got '{s}'")
    return v


def non_negative_float(s: str) -> float:
    v = _float(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def top_p_value(s: str) -> float:
    v = _float(s)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {v}")
    return v


def add_model_args(p: argparse.ArgumentParser, sparse: bool = True) -> None:
    """--model/--tokenizer/--backend/--device (and --predictors): shared by every command that runs a model."""
    p.add_argument("--model", help="model file: official .pth (x052/x060/x070) or an rwkv-edge converted file "
                                   "(default: the model embedded in the package, if this install has one)")
    p.add_argument("--tokenizer", help="'world', a tokenizer.json or a World vocab .txt "
                                       "(default: tokenizer.json next to the model, else World for 65536-token vocabs)")
    p.add_argument("--backend", choices=["auto", "native", "numba", "reference"], default="auto",
                   help="CPU kernels: native = C for int8/int4 RWKV-7 model files; auto = numba where it works, else the "
                        "numpy reference (default: auto)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda runs on an NVIDIA GPU (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weight storage with --device cuda")
    if sparse:
        p.add_argument("--predictors", help="predictor bundle: run the FFN sparse on the predicted neurons")
        p.add_argument("--dense", action="store_true",
                       help="run a model package's weights dense (ignore its predictors), for comparison")
        p.add_argument("--max-resident-mb", type=_float, default=None,
                       help="with --predictors on a model file: weights kept resident; FFN neuron pages not "
                            "used recently are dropped (see --resident-window)")
        p.add_argument("--resident-window", type=positive_int, default=8,
                       help="tokens an FFN neuron page stays resident after its last use (default: 8)")


def add_sampling_args(p: argparse.ArgumentParser, chat: bool = False) -> None:
    p.add_argument("--max-tokens", type=non_negative_int, default=300 if chat else 100,
                   help="tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0,
                   help="0 = greedy (deterministic) (default: %(default)s)")
    p.add_argument("--top-p", type=top_p_value, default=0.85 if chat else 1.0,
                   help="nucleus mass kept, in (0, 1] (default: %(default)s)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off (default: %(default)s)")
    p.add_argument("--seed", type=non_negative_int, default=None, help="random seed >= 0 (default: random)")
    if chat:
        p.add_argument("--presence-penalty", type=_float, default=0.4,
                       help="lowers the logit of every token already said (default: %(default)s)")
        p.add_argument("--frequency-penalty", type=_float, default=0.4,
                       help="lowers it more per (decaying) occurrence (default: %(default)s)")


def resolve_model_path(parser: argparse.ArgumentParser, args) -> str:
    from .runtime import default_model_path

    path = args.model
    if path is None:
        path = default_model_path()
        if path is None:
            parser.exit(2, f"{parser.prog}: error: --model is required: this install has no embedded default model\n")
        print(f"{parser.prog}: no --model given, using the embedded default model (rwkv7-tiny-9m, {path})",
              file=sys.stderr)
    if not os.path.exists(path):
        parser.error(f"--model {path}: no such file")
    return path


def load_for_run(parser, args):
    """(model, tokenizer) for generate/chat/tools, with one-line errors (exit 2) on bad input."""
    from .config import ModelLoadError
    from .runtime import open_model
    from .tokenizer import TokenizerError, load_tokenizer

    path = resolve_model_path(parser, args)
    try:
        resident = getattr(args, "max_resident_mb", None)
        if resident is not None and not getattr(args, "predictors", None):
            parser.exit(2, f"{parser.prog}: error: --max-resident-mb needs --predictors (a sparse FFN)\n")
        model = open_model(path, backend=args.backend, predictors=getattr(args, "predictors", None),
                           device=args.device, dtype=args.dtype, dense=getattr(args, "dense", False),
                           max_resident_mb=resident, resident_window=getattr(args, "resident_window", 8))
        tok = load_tokenizer(args.tokenizer, path, model.config.vocab_size)
    except (ModelLoadError, TokenizerError, ValueError, RuntimeError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return model, tok


def _sampler(args, chat: bool):
    from .sampling import Sampler, SamplingParams

    return Sampler(SamplingParams(args.temperature, args.top_p, args.top_k,
                                  getattr(args, "presence_penalty", 0.0), getattr(args, "frequency_penalty", 0.0)),
                   seed=args.seed)


def cmd_generate(args, parser) -> int:
    from .errors import clean_text
    from .generate import generate

    prompt = clean_text(args.prompt, "--prompt", note=lambda m: print(m, file=sys.stderr))
    model, tok = load_for_run(parser, args)
    for piece in generate(model, tok, prompt, args.max_tokens, _sampler(args, chat=False)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def cmd_chat(args, parser) -> int:
    from .chat import chat_loop

    model, tok = load_for_run(parser, args)
    if hasattr(sys.stdin, "reconfigure"):  # invalid UTF-8 lines reach chat_loop, which replaces the bytes
        sys.stdin.reconfigure(errors="surrogateescape")
    return chat_loop(model, tok, _sampler(args, chat=True), max_tokens=args.max_tokens)


# Subcommands that live with their own package: (module, function adding the parser).
_PLUGINS = [
    ("rwkv_edge.modelfile", "add_convert_parser"),
    ("rwkv_edge.predictors.cli_commands", "add_collect_parser"),
    ("rwkv_edge.predictors.cli_commands", "add_fit_parser"),
    ("rwkv_edge.predictors.cli_commands", "add_report_parser"),
    ("rwkv_edge.export.cli_commands", "add_export_parser"),
    ("rwkv_edge.export.cli_commands", "add_verify_parser"),
    ("rwkv_edge.sparsify_cli", "add_sparsify_parser"),
    ("rwkv_edge.eval_command", "add_eval_parser"),
]


def build_parser() -> argparse.ArgumentParser:
    from .errors import ArgumentParser

    parser = ArgumentParser(prog="rwkv-edge", description="Small, fast RWKV inference with sparse FFNs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("generate", help="stream a continuation of a prompt")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (stdin may be a pipe); /reset /save /load /quit")
    add_model_args(p)
    add_sampling_args(p, chat=True)
    p.set_defaults(func=cmd_chat)

    for mod, fn in _PLUGINS:
        try:
            adder = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError):
            continue  # that part is not installed
        adder(sub)
    return parser


def _one_line_warnings(prog: str) -> None:
    """Library warnings (e.g. the numba fallback) as one line on stderr, not file:line plus source."""
    import warnings

    warnings.formatwarning = lambda msg, *a, **k: f"{prog}: warning: {msg}\n"


def main(argv=None) -> int:
    from .errors import run_main

    parser = build_parser()
    _one_line_warnings(parser.prog)
    args = parser.parse_args(argv)
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]
    func = args.func
    # plugin commands may take (args) or (args, parser)
    n = len(inspect.signature(func).parameters)
    # bad input met while running: one line + exit 2; Ctrl-C: 130; SIGTERM: 143 (temp files removed)
    return run_main(sub_parser.prog, (lambda: func(args, sub_parser)) if n >= 2 else (lambda: func(args)))


if __name__ == "__main__":
    sys.exit(main())
