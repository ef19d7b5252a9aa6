"""Generate text from an rwkv-edge ONNX export with onnxruntime, numpy and `tokenizers` only.

This file is the porting reference for app developers: it depends on nothing from rwkv-edge.
The recurrent state is a set of named float32 tensors (listed in model.json); every call to the
step graph takes the token and the state and returns logits and the next state.

    python export/run_ort.py --onnx DIR --prompt "The old man" --max-tokens 64
    python export/run_ort.py --onnx DIR --chat                  # interactive, "User:/Assistant:" turns
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort


VARIANTS = {"dense": "step", "sparse": "sparse_step", "exact": "exact_step"}   # variant -> graph key


class OrtModel:
    """The step (and prefill) sessions of an export directory.

    variant: "dense" (model.onnx), "sparse" (model.sparse.onnx) or "exact" (model.exact.onnx).
    exact: apply the sidecar's recommended session config (fp32 kernels). threads: intra-op threads (None: onnxruntime's choice).
    file_suffix: ".onnx", or ".ort" to load the ORT-format files written by `export.verify.to_ort`.
    """

    def __init__(self, onnx_dir: str, variant: str = "dense", exact: bool = True, threads=None,
                 file_suffix: str = ".onnx"):
        side = os.path.join(onnx_dir, "model.json")
        if not os.path.isfile(side):
            raise ValueError(f"{onnx_dir}: no model.json; not an rwkv-edge ONNX export")
        with open(side, encoding="utf-8") as f:
            try:
                self.meta = json.load(f)
            except ValueError as e:                    # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{side}: not valid JSON ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != "rwkv-edge-onnx":
            raise ValueError(f"{side} is not an rwkv-edge ONNX sidecar")
        if not isinstance(self.meta.get("graphs"), dict) or not isinstance(self.meta.get("state"), list):
            raise ValueError(f"{side}: damaged sidecar (no graphs or state list)")
        key = VARIANTS.get(variant)
        if key is None or key not in self.meta["graphs"]:
            raise ValueError(f"{onnx_dir}: no {variant!r} graph (has {sorted(self.meta['graphs'])})")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
        if exact:
            for k, v in self.meta.get("ort_session_config", {}).items():
                so.add_session_config_entry(k, str(v))

        def load(entry):
            path = os.path.join(onnx_dir, os.path.splitext(entry["file"])[0] + file_suffix)
            if not os.path.isfile(path):
                raise ValueError(f"{path}: missing (the export is incomplete; export it again)")
            try:
                return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph: a damaged file
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ValueError(f"{path}: not a loadable ONNX graph, truncated or damaged ({msg})") from None

        self.dir, self.variant = onnx_dir, variant
        self.step_graph = self.meta["graphs"][key]
        self.session = load(self.step_graph)
        pre = self.meta["graphs"].get("prefill")
        # The prefill graph is dense; the sparse variant uses it for prompts too (same state layout).
        self.prefill_session = load(pre) if pre is not None else None
        self.state_names = [s["name"] for s in self.meta["state"]]
        self.state_shapes = [tuple(s["shape"]) for s in self.meta["state"]]
        self.vocab_size = int(self.meta["model"]["vocab_size"])

    def zero_state(self) -> dict:
        """The initial state: {name: zeros float32}."""
        return {n: np.zeros(s, np.float32) for n, s in zip(self.state_names, self.state_shapes)}

    def _run(self, sess, feed_name, ids, state):
        out = sess.run(None, {feed_name: np.asarray(ids, np.int64), **state})
        return out[0], dict(zip(self.state_names, out[1:]))

    def step(self, token: int, state: dict):
        """One token: (logits float32 (V,), new state)."""
        return self._run(self.session, "token", [int(token)], state)

    def prefill(self, tokens, state: dict):
        """Many tokens: (last token's logits, new state); one call of the prefill graph when
        there is one, else a step per token."""
        tokens = [int(t) for t in tokens]
        if self.prefill_session is not None and len(tokens) > 1:
            return self._run(self.prefill_session, "tokens", tokens, state)
        logits = None
        for t in tokens:
            logits, state = self.step(t, state)
        return logits, state


def sample(logits: np.ndarray, temperature: float = 1.0, top_p: float = 1.0, rng=None) -> int:
    """Greedy when temperature <= 0, else nucleus sampling from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    rng = rng or np.random.default_rng()
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def generate(model: OrtModel, tokenizer, prompt_ids, max_tokens, temperature=1.0, top_p=0.85,
             state=None, stop_ids=(), stop_text=None, rng=None, out=sys.stdout):
    """Feed `prompt_ids`, then sample up to `max_tokens` tokens, writing text to `out` as it comes.
    Returns (generated ids, state, tokens per second of the decode loop)."""
    state = model.zero_state() if state is None else state
    logits, state = model.prefill(prompt_ids, state)
    ids, pending, text = [], [], ""
    t0 = time.perf_counter()
    for _ in range(max_tokens):
        tok = sample(logits, temperature, top_p, rng)
        if tok in stop_ids:
            break
        ids.append(tok)
        pending.append(tok)
        piece = tokenizer.decode(pending)
        if not piece.endswith("\ufffd"):          # hold back half a UTF-8 character
            out.write(piece)
            out.flush()
            text += piece
            pending = []
        logits, state = model.step(tok, state)     # state always includes every emitted token
        if stop_text and stop_text in text:
            break
    dt = time.perf_counter() - t0
    return ids, state, (len(ids) / dt if dt > 0 else 0.0)


def _number(kind, lo, hi=None, lo_open=False):
    """argparse type: a finite `kind` number >= lo (> lo when lo_open), <= hi."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{s}'") from None
        if v != v or v in (float("inf"), float("-inf")) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"out of range: {s}")
        return v
    return parse


def _clean(text: str, what: str) -> str:
    """Text from argv or stdin with bytes that were not UTF-8 replaced by U+FFFD (and a note)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        print(f"note: {what} is not valid UTF-8; invalid bytes replaced by U+FFFD", file=sys.stderr)
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


PROG = "run_ort.py"


def main(argv=None) -> int:
    """Bad input: one line `run_ort.py: error: ...`, exit 2 (as every rwkv-edge tool); Ctrl-C: 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError, KeyError, TypeError) as e:   # a damaged export or tokenizer file
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="export directory (holds model.json)")
    ap.add_argument("--prompt", help="prompt text; omit with --chat")
    ap.add_argument("--chat", action="store_true", help="interactive User/Assistant loop on stdin")
    ap.add_argument("--max-tokens", type=_number(int, 0), default=100, help="(default: %(default)s)")
    ap.add_argument("--temperature", type=_number(float, 0), default=1.0, help="0 = greedy (default: %(default)s)")
    ap.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True), default=0.85, help="(default: %(default)s)")
    ap.add_argument("--seed", type=_number(int, 0), default=None)
    ap.add_argument("--variant", choices=tuple(VARIANTS), default="dense")
    ap.add_argument("--threads", type=_number(int, 1), default=None)
    ap.add_argument("--no-bos", action="store_true", help="do not start the context with <|endoftext|>")
    a = ap.parse_args(argv)
    if not a.chat and a.prompt is None:
        ap.error("give --prompt TEXT or --chat")
    from tokenizers import Tokenizer

    model = OrtModel(a.onnx, a.variant, threads=a.threads)
    if not model.meta.get("tokenizer"):
        raise ValueError(f"{a.onnx} has no tokenizer file")
    tok_path = os.path.join(a.onnx, model.meta["tokenizer"])
    try:
        tok = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises its own Exception type for damaged files
        raise ValueError(f"{tok_path}: not a readable tokenizer.json ({str(e)[:200]})") from None
    eos = tok.token_to_id("<|endoftext|>")
    bos = [] if a.no_bos or eos is None else [eos]
    stops = () if eos is None else (eos,)
    rng = np.random.default_rng(a.seed)
    if not a.chat:
        prompt = _clean(a.prompt, "--prompt")
        sys.stdout.write(prompt)
        ids, _, tps = generate(model, tok, bos + tok.encode(prompt).ids, a.max_tokens, a.temperature,
                               a.top_p, stop_ids=stops, rng=rng)
        print(f"\n[{len(ids)} tokens, {tps:.1f} tok/s]", file=sys.stderr)
        return 0
    state, first = model.zero_state(), True
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")      # a non-UTF-8 line is cleaned, not fatal
    while True:
        try:
            msg = _clean(input("User: "), "input line").strip()
        except EOFError:
            return 0
        if not msg:
            continue
        text = ("" if first else "\n\n") + f"User: {msg}\n\nAssistant:"
        ids = (bos if first else []) + tok.encode(text).ids
        first = False
        sys.stdout.write("Assistant:")
        _, state, _ = generate(model, tok, ids, a.max_tokens, a.temperature, a.top_p, state=state,
                               stop_ids=stops, stop_text="\n\n", rng=rng)
        print()


if __name__ == "__main__":
    sys.exit(main())
