"""Quality of a model variant measured against the dense base, as `llama-perplexity --kl-divergence` does.

The base model and the candidate (a sparse bundle, an int8 file, an ONNX export, ...) see the same
token segments; per position we compare their next-token distributions:

    kld      KL(base || candidate) = sum_v p_b(v) (log p_b(v) - log p_c(v))       (nats)
    dp       p_c(correct) - p_b(correct)
    top1     argmax p_b == argmax p_c
and report ppl of both, ln(ppl ratio), KLD mean / SE / percentiles / max, dp mean / RMS, same-top-1
share with its SE, and the density a sparse candidate actually ran (its FFN counters).

Segments: a token stream is cut into windows of `ctx` tokens; each window runs from a fresh state
with input [0] + window[:-1] (token 0 = <|endoftext|>, the document separator every tool starts a
context with) and predicts all `ctx` window tokens. A tail shorter than `ctx` is dropped.
LAMBADA items are segments too (see `quality_lambada.py`).

The base's distributions can be stored once and reused (`compute_base`, `save_base`, `load_base`),
see `BaseDists` for the file format.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np

from .evaluate import log_softmax
from .fileio import atomic_write

MAGIC = "rwkv-edge-base-dists"
FORMAT_VERSION = 1
DEFAULT_TOP_K = 0            # base file: 0 = every log-prob (float16, exact KL); K > 0 = top K + tail
BOS = 0                      # <|endoftext|>


# --------------------------------------------------------------------------- segments


def window_segments(tokens, ctx: int = 512) -> list[tuple[list[int], list[int]]]:
    """[(input ids, target ids)] of the whole `ctx`-token windows of `tokens`: input = [0] + w[:-1]."""
    if ctx < 1:
        raise ValueError(f"ctx must be >= 1, got {ctx}")
    tokens = [int(t) for t in tokens]
    n = len(tokens) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(tokens)} tokens, shorter than one context of {ctx}")
    return [([BOS] + tokens[i * ctx:(i + 1) * ctx - 1], tokens[i * ctx:(i + 1) * ctx]) for i in range(n)]


def segment_logprobs(model, inp) -> np.ndarray:
    """Log-probabilities (T, V) float32 of the next token at each input position, from a fresh state.
    `model` is anything with forward(ids, state=None, full_output=True) -> (logits (T, V), state).
    float32: half the time of float64 on (512, 16384) rows, and KL stays exact to ~1e-7."""
    logits, _ = model.forward(inp, None, full_output=True)
    return log_softmax(np.asarray(logits), np.float32)


def segments_sha(segments) -> str:
    """Identity of the evaluated positions (inputs and targets of every segment)."""
    h = hashlib.sha256()
    for inp, tgt in segments:
        h.update(np.asarray(inp, np.int64).tobytes() + b"|" + np.asarray(tgt, np.int64).tobytes() + b";")
    return h.hexdigest()[:16]


def tokenizer_id(tok, vocab_size: int) -> str:
    """Identity of a tokenizer: a hash of every id's bytes (two tokenizers with one id map agree)."""
    h = hashlib.sha256(str(vocab_size).encode())
    n = min(int(getattr(tok, "vocab_size", vocab_size)), vocab_size)
    for i in range(n):
        h.update(tok.decode_bytes([i]) + b"\x00")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- stored base


@dataclass
class BaseDists:
    """The base model's next-token distributions over a set of segments.

    File (np.savez, no pickles, written atomically): magic, format_version, fingerprint (model),
    config (JSON), tokenizer (`tokenizer_id`, "" if unknown), ctx, segments_sha, n_tokens, top_k, and
        seg_offsets (S+1,) int64   position ranges of the segments
        target_lp   (N,) float32   log p_b(correct token)
        top1        (N,) int32     argmax p_b
        mode top-k  (top_k > 0):   top_lp (N, K) float32 the K largest log-probs, descending; top_idx
                                   (N, K) uint16/int32 their ids; tail_lp (N,) float32 log of the mass
                                   outside them. KL is then the KL of the (K+1)-bucket coarsening: a
                                   lower bound of the exact KL, tight when the tail keeps its shape
                                   (rwkv7-tiny-9m, a 20%-density candidate: K=256 gives 0.88 of the
                                   exact mean KL, K=1024 0.96).
        mode full   (top_k == 0):  full_lp (N, V) float16 every log-prob (V * 2 bytes per position).
    """
    fingerprint: str
    config: dict
    tokenizer: str
    ctx: int
    segments_sha: str
    seg_offsets: np.ndarray
    target_lp: np.ndarray
    top1: np.ndarray
    top_k: int = DEFAULT_TOP_K
    top_lp: np.ndarray | None = None
    top_idx: np.ndarray | None = None
    tail_lp: np.ndarray | None = None
    full_lp: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return int(self.seg_offsets[-1])

    def check(self, model=None, tokenizer: str | None = None, segments=None, ctx: int | None = None,
              where: str = "base") -> None:
        """ValueError unless this base belongs to `model`, `tokenizer` (an id) and these segments."""
        if model is not None and (self.fingerprint != model.fingerprint or self.config != model.config.to_dict()):
            raise ValueError(f"{where}: base distributions of another model (fingerprint {self.fingerprint}, "
                             f"this model is {model.fingerprint})")
        if tokenizer and self.tokenizer and tokenizer != self.tokenizer:
            raise ValueError(f"{where}: base distributions made with another tokenizer ({self.tokenizer} != {tokenizer})")
        if ctx is not None and ctx != self.ctx:
            raise ValueError(f"{where}: base distributions use ctx {self.ctx}, not {ctx}")
        if segments is not None and segments_sha(segments) != self.segments_sha:
            raise ValueError(f"{where}: base distributions were computed on other tokens "
                             f"({self.n_tokens} positions); use the same text, --limit and --ctx")

    def segment(self, s: int) -> dict:
        """The stored rows of segment s: a dict of arrays sliced to its positions."""
        a, b = int(self.seg_offsets[s]), int(self.seg_offsets[s + 1])
        out = {"target_lp": self.target_lp[a:b], "top1": self.top1[a:b]}
        if self.top_k:
            out.update(top_lp=self.top_lp[a:b], top_idx=self.top_idx[a:b], tail_lp=self.tail_lp[a:b])
        else:
            out["full_lp"] = self.full_lp[a:b]
        return out


def compact(lp: np.ndarray, tgt, top_k: int) -> dict:
    """One segment's base log-probs lp (T, V) -> the stored rows (see BaseDists)."""
    T, V = lp.shape
    rows = np.arange(T)
    out = {"target_lp": lp[rows, np.asarray(tgt)].astype(np.float32), "top1": lp.argmax(-1).astype(np.int32)}
    if not top_k:
        out["full_lp"] = lp.astype(np.float16)
        return out
    k = min(int(top_k), V)
    idx = np.argpartition(-lp, k - 1, axis=1)[:, :k] if k < V else np.tile(np.arange(V), (T, 1))
    vals = np.take_along_axis(lp, idx, 1)
    order = np.argsort(-vals, axis=1, kind="stable")
    idx, vals = np.take_along_axis(idx, order, 1), np.take_along_axis(vals, order, 1)
    head = np.exp(vals.astype(np.float64)).sum(1)
    out.update(top_lp=vals.astype(np.float32), top_idx=idx.astype(np.uint16 if V <= 65536 else np.int32),
               tail_lp=np.log(np.clip(1.0 - head, 1e-30, None)).astype(np.float32))
    return out


def position_stats(rows: dict, lp_c: np.ndarray, tgt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: (KL(base || candidate), log p_c(correct), argmax p_c) from the base's stored
    rows and the candidate's log-probs lp_c (T, V) float64."""
    T = lp_c.shape[0]
    tgt = np.asarray(tgt)
    if "full_lp" in rows:
        lb = rows["full_lp"]
        if lb.dtype != lp_c.dtype:                                    # stored float16: renormalize the rounding
            lb = log_softmax(lb, lp_c.dtype)
        kld = (np.exp(lb) * (lb - lp_c)).sum(1, dtype=np.float64)
    else:
        lb = rows["top_lp"].astype(np.float64)
        lc = np.take_along_axis(lp_c, rows["top_idx"].astype(np.int64), 1).astype(np.float64)
        kld = (np.exp(lb) * (lb - lc)).sum(1)
        tb = rows["tail_lp"].astype(np.float64)
        tc = np.log(np.clip(1.0 - np.exp(lc).sum(1), 1e-30, None))
        kld += np.exp(tb) * (tb - tc)
    return np.maximum(kld, 0.0), lp_c[np.arange(T), tgt], lp_c.argmax(-1)


def exact_rows(lp_b: np.ndarray, tgt) -> dict:
    """Rows of an in-memory base: its full log-probs, so KL is exact."""
    return {"full_lp": lp_b, "target_lp": lp_b[np.arange(lp_b.shape[0]), np.asarray(tgt)], "top1": lp_b.argmax(-1)}


def compute_base(model, segments, ctx: int = 512, top_k: int = DEFAULT_TOP_K, tokenizer: str = "",
                 progress: bool = True, desc: str = "base") -> BaseDists:
    """Run the base model over `segments` and keep its distributions compactly (see BaseDists)."""
    from tqdm import tqdm

    parts, offsets = [], [0]
    for inp, tgt in tqdm(segments, desc=desc, unit="seg", disable=not progress, mininterval=1.0):
        parts.append(compact(segment_logprobs(model, inp), tgt, top_k))
        offsets.append(offsets[-1] + len(tgt))
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return BaseDists(model.fingerprint, model.config.to_dict(), tokenizer, int(ctx), segments_sha(segments),
                     np.asarray(offsets, np.int64), cat["target_lp"], cat["top1"], int(top_k),
                     cat.get("top_lp"), cat.get("top_idx"), cat.get("tail_lp"), cat.get("full_lp"))


_ARRAYS = ("seg_offsets", "target_lp", "top1", "top_lp", "top_idx", "tail_lp", "full_lp")


def save_base(path, base: BaseDists) -> None:
    """Write `base` to `path` (.npz) atomically."""
    arrays = {"magic": np.array(MAGIC), "format_version": np.array(FORMAT_VERSION, np.int64),
              "fingerprint": np.array(base.fingerprint), "config": np.array(json.dumps(base.config)),
              "tokenizer": np.array(base.tokenizer), "ctx": np.array(base.ctx, np.int64),
              "segments_sha": np.array(base.segments_sha), "top_k": np.array(base.top_k, np.int64),
              "meta": np.array(json.dumps(base.meta))}
    arrays.update({k: getattr(base, k) for k in _ARRAYS if getattr(base, k) is not None})
    with atomic_write(os.fspath(path), prefix=".base-") as f:
        np.savez(f, **arrays)


def load_base(path, model=None, tokenizer: str | None = None) -> BaseDists:
    """Read a base file; ValueError if it is not one, has another format version, or (with `model`
    / `tokenizer` id) belongs to another model or tokenizer."""
    from .fileio import read_versioned_npz

    path = os.fspath(path)
    d = read_versioned_npz(path, MAGIC, FORMAT_VERSION, "base file", unreadable="not a readable base file")
    try:
        base = BaseDists(str(d["fingerprint"]), json.loads(str(d["config"])), str(d["tokenizer"]), int(d["ctx"]),
                         str(d["segments_sha"]), d["seg_offsets"], d["target_lp"], d["top1"], int(d["top_k"]),
                         d.get("top_lp"), d.get("top_idx"), d.get("tail_lp"), d.get("full_lp"),
                         json.loads(str(d["meta"])))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable base file ({type(e).__name__})") from None
    base.check(model, tokenizer, where=path)
    return base


# --------------------------------------------------------------------------- comparison


class _Density:
    """The density a sparse candidate runs over a span: deltas of its FFN's n_active / n_tokens."""

    def __init__(self, model):
        self.ffn = getattr(model, "ffn", None)
        self.ok = self.ffn is not None and hasattr(self.ffn, "n_active") and hasattr(self.ffn, "n_tokens")
        self.a0, self.t0 = (self.ffn.n_active, self.ffn.n_tokens) if self.ok else (0, 0)

    def value(self, ffn_dim: int, model=None):
        if not self.ok or self.ffn.n_tokens == self.t0:
            d = getattr(model, "density", None)              # a candidate of fixed density (static top-k graph)
            return float(d) if isinstance(d, (int, float)) else None
        F = getattr(self.ffn, "F", None) or ffn_dim
        return (self.ffn.n_active - self.a0) / ((self.ffn.n_tokens - self.t0) * F)


def run_segments(base_model, candidate, segments, base: BaseDists | None = None, progress: bool = True,
                 desc: str = "eval") -> dict:
    """Per-position arrays over all segments: kld, lp_b/lp_c (log p of the correct token), top1_b/top1_c,
    plus `density` (None if the candidate is not sparse) and `seg_offsets`."""
    from tqdm import tqdm

    if base is None and base_model is None:
        raise ValueError("compare needs the base model or stored base distributions")
    dens = _Density(candidate)
    acc = {k: [] for k in ("kld", "lp_b", "lp_c", "top1_b", "top1_c")}
    offsets = [0]
    bar = tqdm(total=sum(len(t) for _, t in segments), desc=desc, unit="tok", disable=not progress,
               mininterval=1.0)
    for s, (inp, tgt) in enumerate(segments):
        rows = base.segment(s) if base is not None else exact_rows(segment_logprobs(base_model, inp), tgt)
        kld, lpc, t1c = position_stats(rows, segment_logprobs(candidate, inp), tgt)
        for k, v in (("kld", kld), ("lp_b", rows["target_lp"]), ("lp_c", lpc), ("top1_b", rows["top1"]),
                     ("top1_c", t1c)):
            acc[k].append(np.asarray(v, np.float64 if k[:2] != "to" else np.int64))
        offsets.append(offsets[-1] + len(tgt))
        bar.update(len(tgt))
        if progress and s % 4 == 0:
            bar.set_postfix(kld=f"{np.concatenate(acc['kld']).mean():.4f}")
    bar.close()
    out = {k: np.concatenate(v) for k, v in acc.items()}
    F = (base_model.config if base_model is not None else candidate.config).ffn_dim
    out.update(density=dens.value(F, candidate), seg_offsets=np.asarray(offsets, np.int64))
    return out


def summarize(arr: dict) -> dict:
    """The llama.cpp-style figures from `run_segments` arrays."""
    kld, lpb, lpc = arr["kld"], arr["lp_b"], arr["lp_c"]
    n = kld.size
    se = lambda x: float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")   # noqa: E731
    pb, pc = np.exp(lpb), np.exp(lpc)
    same = (arr["top1_b"] == arr["top1_c"]).astype(np.float64)
    q = lambda p: float(np.percentile(kld, p))                                        # noqa: E731
    ppl_b, ppl_c = math.exp(-lpb.mean()), math.exp(-lpc.mean())
    return {"n_tokens": int(n), "ppl_base": ppl_b, "ppl": ppl_c, "ln_ppl_ratio": float((lpb - lpc).mean()),
            "ln_ppl_ratio_se": se(lpb - lpc), "delta_ppl": ppl_c - ppl_b,
            "kld_mean": float(kld.mean()), "kld_se": se(kld), "kld_max": float(kld.max()), "kld_p999": q(99.9),
            "kld_p99": q(99), "kld_p95": q(95), "kld_p90": q(90), "kld_median": q(50), "kld_p10": q(10),
            "dp_mean": float((pc - pb).mean()), "dp_rms": float(np.sqrt(((pc - pb) ** 2).mean())),
            "same_top1": float(same.mean()), "same_top1_se": float(math.sqrt(same.mean() * (1 - same.mean()) / n)),
            "density": arr.get("density")}


def compare(base_model, candidate_model, tokens, ctx: int = 512, base: BaseDists | None = None,
            progress: bool = True) -> dict:
    """Score `candidate_model` against `base_model` over the `ctx` windows of `tokens`.

    base: stored base distributions for these windows (then `base_model` is not run and may be
    None); without it both models run and KL is exact over the full vocabulary.
    Returns the figures of `summarize` (ppl_base, ppl, ln_ppl_ratio, delta_ppl, kld_*, dp_*,
    same_top1(_se), n_tokens, density)."""
    segments = window_segments(tokens, ctx)
    if base is not None:
        base.check(base_model, segments=segments, ctx=ctx)
    return summarize(run_segments(base_model, candidate_model, segments, base, progress))


# --------------------------------------------------------------------------- LAMBADA


def lambada_segments(tokenizer, items) -> tuple[list, list[int]]:
    """LAMBADA items [(context, target)] as segments (input [0] + context + target[:-1], targets
    context + target) and the number of target-word tokens at the end of each."""
    segs, words = [], []
    for ctx, target in items:
        c, w = tokenizer.encode(ctx), tokenizer.encode(target)
        segs.append(([BOS] + c + w[:-1], c + w))
        words.append(len(w))
    return segs, words


def lambada_scores(arr: dict, segments, words) -> dict:
    """lm-eval `lambada_openai` accuracy and perplexity of both models from `run_segments` arrays:
    an item is right when every target-word token is the argmax; ppl = exp(mean item word NLL)."""
    out = {}
    for who in ("base", "cand"):
        top1, lp = arr["top1_b" if who == "base" else "top1_c"], arr["lp_b" if who == "base" else "lp_c"]
        right, nll = 0, 0.0
        for s, ((_, tgt), n) in enumerate(zip(segments, words)):
            b = int(arr["seg_offsets"][s + 1])
            right += bool(np.all(top1[b - n:b] == np.asarray(tgt[-n:])))
            nll -= float(lp[b - n:b].sum())
        m = max(len(words), 1)
        out["lambada_acc" + ("_base" if who == "base" else "")] = right / m
        out["lambada_ppl" + ("_base" if who == "base" else "")] = math.exp(nll / m)
    out["lambada_n"] = len(words)
    return out
