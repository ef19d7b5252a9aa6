"""Evaluation: LAMBADA (the lm-eval `lambada_openai` way) and windowed perplexity."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Iterable, List, Tuple

import numpy as np


def log_softmax(logits: np.ndarray, dtype=np.float64) -> np.ndarray:
    z = logits.astype(dtype)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def lambada_items(path: str, limit: int | None = None) -> List[Tuple[str, str]]:
    """(context, target) pairs: context = text up to the last space, target = " " + last word."""
    items = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (a LAMBADA .jsonl file is)") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
                if not isinstance(text, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{lineno}: not a LAMBADA line (a JSON object with a \"text\" string)") from None
            ctx, _, word = text.rpartition(" ")
            items.append((ctx, " " + word))
            if limit is not None and len(items) >= limit:
                break
    return items


@dataclass
class LambadaResult:
    accuracy: float
    perplexity: float
    n: int


def score_lambada(model, tokenizer, items: Iterable[Tuple[str, str]], progress: bool = True) -> LambadaResult:
    """Accuracy: every target token is the greedy choice. Perplexity: exp(mean per-item target NLL).
    Each context is prefixed with token 0 (the document separator the models were trained with).
    The context but its last token runs first (logits of its last position only), then the last
    context token + the target tokens from that state with full output: the same recurrence, but
    the vocabulary head (16384 x 512 on the reference model, a third of a dense item's time) runs on
    the len(target) positions that are scored instead of every context position."""
    from tqdm import tqdm

    items = list(items)
    correct, nll_sum = 0, 0.0
    bar = tqdm(items, desc="lambada", unit="item", disable=not progress, mininterval=1.0)
    for i, (ctx, target) in enumerate(bar):
        src = [0] + tokenizer.encode(ctx)
        dst = tokenizer.encode(target)
        _, state = model.forward(src[:-1]) if len(src) > 1 else (None, None)
        logits, _ = model.forward(src[-1:] + dst[:-1], state, full_output=True)
        lp = log_softmax(logits)                             # (len(dst), V)
        nll_sum -= float(sum(lp[j, t] for j, t in enumerate(dst)))
        correct += bool(all(int(np.argmax(lp[j])) == t for j, t in enumerate(dst)))
        if progress:  # running accuracy; tqdm redraws at most once per mininterval
            bar.set_postfix(acc=f"{correct / (i + 1):.4f}", refresh=False)
    n = len(items)
    return LambadaResult(correct / max(n, 1), math.exp(nll_sum / max(n, 1)), n)


def perplexity(model, tokenizer, text: str, window: int = 512, max_tokens: int | None = None,
               progress: bool = True) -> Tuple[float, int]:
    """Token-level perplexity of `text` (prefixed by token 0), in windows of `window` tokens with
    the state carried across windows. Returns (ppl, number of predicted tokens)."""
    from tqdm import tqdm

    toks = [0] + tokenizer.encode(text)
    if max_tokens is not None:
        toks = toks[: max_tokens + 1]
    if len(toks) < 2:
        raise ValueError("text too short for perplexity")
    state, nll, count = None, 0.0, 0
    with tqdm(total=len(toks) - 1, desc="perplexity", unit="tok", disable=not progress, mininterval=1.0) as bar:
        for s in range(0, len(toks) - 1, window):
            inp = toks[s:s + window]
            tgt = toks[s + 1:s + 1 + window]
            inp = inp[: len(tgt)]
            logits, state = model.forward(inp, state, full_output=True)
            lp = log_softmax(logits)
            nll -= float(lp[np.arange(len(tgt)), tgt].sum())
            count += len(tgt)
            bar.update(len(tgt))
    return math.exp(nll / count), count
