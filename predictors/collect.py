"""Capture FFN inputs to disk: per-layer float16 memmapped shards plus a manifest.

Layout of a collect directory::

    manifest.json          magic, format version, model fingerprint + config, dims, per-layer
                           row counts and shard lists, the source hash (for resume), `input`
    state.npz              the recurrent State after the last stored token (for resume)
    L00_0000.npy ...       float16 (shard_rows, dim) arrays, one file per layer and shard;
                           only the first `count` rows of a layer (in shard order) are valid

`input` (format version 2; version 1 directories are "ffn"): "ffn" rows are the FFN input xk
(dim = D); "early" rows are [ln1(x_L), prev, xk] (dim = 3 D), ln1(x_L) the time-mix input and prev
the FFN token-shift state, both known when layer L starts (predictors/early.py fits on them).

Labels are not stored: `labels(model, layer, xk)` recomputes them from W_k, which is exact and
costs one (n, D) x (D, F) matmul.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Iterator

import numpy as np

from rwkv_edge.fileio import atomic_write

from .early import EarlyRows

MAGIC = "rwkv-edge-activations"
FORMAT_VERSION = 2
READS = (1, 2)
INPUTS = ("ffn", "early")
MANIFEST = "manifest.json"
STATE_FILE = "state.npz"
DEFAULT_SHARD_ROWS = 65536


class CollectError(ValueError):
    """A collect directory cannot be used (other model's data, damaged manifest, ...)."""


# --------------------------------------------------------------------------- manifest


def _write_json_atomic(path: str, obj: dict) -> None:
    with atomic_write(path, "w", prefix=".manifest-") as f:
        json.dump(obj, f, indent=1)


def read_manifest(out_dir: str) -> dict:
    """Read and validate `out_dir/manifest.json`; CollectError if absent or not ours."""
    path = os.path.join(os.fspath(out_dir), MANIFEST)
    if not os.path.isfile(path):
        raise CollectError(f"{out_dir}: no {MANIFEST}; not an activation directory (run `collect` first)")
    try:
        with open(path) as f:
            man = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CollectError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(man, dict) or man.get("magic") != MAGIC:
        raise CollectError(f"{path}: not an rwkv-edge activation manifest")
    if man.get("format_version") not in READS:
        raise CollectError(f"{path}: format version {man.get('format_version')}, this code reads 1 and 2")
    man.setdefault("input", "ffn")
    return man


def split_rows(man: dict, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stored rows (n, dim) of a collection -> (predictor input x, FFN input xk): (rows, rows) for
    "ffn"; ([ln1, prev] (n, 2D), xk (n, D)) for "early"."""
    if man.get("input", "ffn") == "ffn":
        return rows, rows
    D = man["config"]["n_embd"]
    return rows[:, :2 * D], rows[:, 2 * D:]


def check_model(man: dict, model, where: str = "") -> None:
    """Raise CollectError unless the manifest was written for `model` (fingerprint and config)."""
    if man["fingerprint"] != model.fingerprint or man["config"] != model.config.to_dict():
        raise CollectError(
            f"{where or 'activation directory'} holds data of another model (fingerprint {man['fingerprint']}, "
            f"this model is {model.fingerprint}); use a new --out directory")


def _source_hash(tokens: np.ndarray) -> str:
    # The first tokens identify the source text well enough to refuse resuming on other data.
    return hashlib.sha256(np.asarray(tokens[:4096], np.int64).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------- writers


class _LayerWriter:
    """Appends (T, D) rows of one layer into preallocated float16 shard files."""

    def __init__(self, out_dir: str, layer: int, dim: int, shard_rows: int, shards: list, count: int):
        self.out_dir, self.layer, self.dim, self.shard_rows = out_dir, layer, dim, shard_rows
        self.shards = shards          # manifest entries {"file", "rows"}; shared with the manifest
        self.count = count            # valid rows so far
        self._open = {}               # shard index -> memmap

    def _shard(self, s: int) -> np.memmap:
        if s not in self._open:
            if s == len(self.shards):
                name = f"L{self.layer:02d}_{s:04d}.npy"
                mm = np.lib.format.open_memmap(os.path.join(self.out_dir, name), mode="w+",
                                               dtype=np.float16, shape=(self.shard_rows, self.dim))
                self.shards.append({"file": name, "rows": self.shard_rows})
            else:
                mm = np.lib.format.open_memmap(os.path.join(self.out_dir, self.shards[s]["file"]), mode="r+")
            self._open = {s: mm}      # keep at most one shard mapped per layer
        return self._open[s]

    def append(self, x: np.ndarray) -> None:
        """x: (T, D) float -> rows [count, count + T) of this layer."""
        done = 0
        while done < len(x):
            s, off = divmod(self.count, self.shard_rows)
            n = min(len(x) - done, self.shard_rows - off)
            self._shard(s)[off:off + n] = x[done:done + n]
            done += n
            self.count += n

    def flush(self) -> None:
        for mm in self._open.values():
            mm.flush()

    def close(self) -> None:
        self.flush()
        self._open = {}


# --------------------------------------------------------------------------- collect


_OWN_FILE = re.compile(r"^(L\d{2}_\d{4}\.npy|%s|%s)$" % (re.escape(STATE_FILE), re.escape(MANIFEST)))


def text_source_id(path: str, tokenizer) -> str:
    """Identity of a text file + tokenizer (sha256 of the bytes): `collect` extends a directory of
    the same source when --tokens is raised, although the evenly spread sample then differs."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    h.update(f"{type(tokenizer).__name__}:{getattr(tokenizer, 'vocab_size', '')}".encode())
    return h.hexdigest()[:16]


def collect(model, tokens, out_dir: str, n_tokens: int | None = None, chunk: int = 512,
            progress: bool = True, shard_rows: int = DEFAULT_SHARD_ROWS, tokenizer=None,
            source_id: str | None = None, input: str = "ffn") -> dict:
    """Run `tokens` through `model` in windows of `chunk` tokens (state carried between windows) and
    stream every layer's FFN input xk (T, D) to float16 shards under `out_dir`; with input="early"
    the rows are [ln1(x_L), prev, xk] (T, 3D) (see the module docstring).

    tokens: a 1-D sequence of token ids, or text (a str or an iterable of str chunks, encoded with
    `tokenizer` and run back to back); at most `n_tokens` of them are used (all when None).
    If `out_dir` already holds a partial collection of the same model and the same
    source, it is resumed from the saved state; another model's data raises CollectError.
    source_id: identity of the text the tokens were sampled from (`text_source_id`); a directory
    of the same source_id but other tokens (a larger --tokens resamples the text) is extended from
    its last stored token with the new tokens from that position on.
    The manifest is written before the first window, so a run interrupted at any point resumes.
    Returns the final manifest (dict).
    """
    from rwkv_edge.state import State

    out_dir = os.fspath(out_dir)
    if isinstance(tokens, str):
        tokens = [tokens]
    tokens = list(tokens)
    if tokens and isinstance(tokens[0], str):
        if tokenizer is None:
            raise ValueError("collect got text but no tokenizer")
        tokens = [t for piece in tokens for t in tokenizer.encode(piece)]
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    n_total = len(tokens) if n_tokens is None else min(int(n_tokens), len(tokens))
    if n_total <= 0:
        raise ValueError("collect needs at least one token")
    if chunk <= 0 or shard_rows <= 0:
        raise ValueError("chunk and shard_rows must be positive")
    if input not in INPUTS:
        raise ValueError(f"unknown collect input {input!r}: use one of {', '.join(INPUTS)}")
    cfg = model.config
    os.makedirs(out_dir, exist_ok=True)
    src = _source_hash(tokens)

    if os.path.exists(os.path.join(out_dir, MANIFEST)):
        man = read_manifest(out_dir)
        check_model(man, model, out_dir)
        if man["input"] != input:
            raise CollectError(f"{out_dir}: holds {man['input']} rows, not {input}; use a new --out directory")
        if man["source_hash"] != src:
            if source_id is None or man.get("source_id") != source_id:
                raise CollectError(f"{out_dir}: holds a collection of another text; use a new --out directory")
            man["source_hash"] = src   # same text, resampled for more tokens: extend (and resume this run)
        if man["shard_rows"] != shard_rows:
            shard_rows = int(man["shard_rows"])
        state = State.load(os.path.join(out_dir, STATE_FILE), cfg, model.fingerprint) if man["tokens"] else None
    else:
        # only shards/state of a run killed before its first manifest (older versions) may be there
        if any(not n.startswith(".") and not _OWN_FILE.match(n) for n in os.listdir(out_dir)):
            raise CollectError(f"{out_dir}: directory is not empty and has no {MANIFEST}; use a new --out directory")
        man = {"magic": MAGIC, "format_version": FORMAT_VERSION, "fingerprint": model.fingerprint,
               "config": cfg.to_dict(), "input": input, "dim": cfg.n_embd * (3 if input == "early" else 1),
               "ffn_dim": cfg.ffn_dim, "dtype": "float16",
               "shard_rows": shard_rows, "source_hash": src, "source_id": source_id, "tokens": 0,
               "complete": False, "layers": [{"layer": i, "count": 0, "shards": []} for i in range(cfg.n_layer)]}
        _write_json_atomic(os.path.join(out_dir, MANIFEST), man)   # resumable from the first token on
        state = None
    start = int(man["tokens"])
    if start >= n_total:
        return man

    writers = [_LayerWriter(out_dir, i, int(man["dim"]), shard_rows, man["layers"][i]["shards"], start)
               for i in range(cfg.n_layer)]
    if any(w.count != man["layers"][i]["count"] for i, w in enumerate(writers)):
        raise CollectError(f"{out_dir}: manifest layer counts disagree; the directory is damaged")

    def store(layer, rows):       # "early": [ln1, prev, xk] (T, 3D) from the EarlyRows hooks; else xk (T, D)
        if input == "early":
            writers[layer].append(np.concatenate([rows["ln1"], rows["prev"], rows["ffn"]], 1))
        else:
            writers[layer].append(rows)

    host = lambda a: np.asarray(model.ops.to_host(a), np.float32)      # noqa: E731 (device backends: tensors)
    if input == "early":
        hooks = EarlyRows(store, host).pairs(model.hooks)
    else:
        hooks = [(model.hooks.ffn_input, lambda layer, xk: store(layer, host(xk)))]

    def checkpoint(done: int, complete: bool) -> None:
        # Order matters for crash safety: data, then state, then the manifest that points to them.
        for w in writers:
            w.flush()
        state.save(os.path.join(out_dir, STATE_FILE), model.fingerprint)
        for i, w in enumerate(writers):
            man["layers"][i]["count"] = w.count
        man["tokens"], man["complete"] = done, complete
        _write_json_atomic(os.path.join(out_dir, MANIFEST), man)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n_total, initial=start, unit="tok", desc="collect", dynamic_ncols=True)
    for where, h in hooks:
        where.append(h)
    try:
        pos, last_ckpt = start, start
        while pos < n_total:
            window = tokens[pos:min(pos + chunk, n_total)]
            _, state = model.forward(window.tolist(), state)
            pos += len(window)
            if bar is not None:
                bar.update(len(window))
            if pos - last_ckpt >= shard_rows // 4:   # periodic checkpoint, so a crash loses little
                checkpoint(pos, False)
                last_ckpt = pos
        checkpoint(pos, True)
    finally:
        for where, h in hooks:
            where.remove(h)
        for w in writers:
            w.close()
        if bar is not None:
            bar.close()
    return man


# --------------------------------------------------------------------------- reading


def layer_count(out_dir: str, layer: int) -> int:
    """Number of valid rows stored for `layer`."""
    return int(read_manifest(out_dir)["layers"][layer]["count"])


def load_layer(out_dir: str, layer: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Rows [start, stop) of layer `layer`'s stored rows as float32 (n, dim) (`split_rows`)."""
    man = read_manifest(out_dir)
    if not 0 <= layer < len(man["layers"]):
        raise IndexError(f"layer {layer} out of range [0, {len(man['layers'])})")
    entry = man["layers"][layer]
    count = int(entry["count"])
    stop = count if stop is None else min(int(stop), count)
    start = max(0, int(start))
    out = np.empty((max(0, stop - start), man["dim"]), np.float32)
    R = int(man["shard_rows"])
    pos = start
    while pos < stop:
        s, off = divmod(pos, R)
        n = min(stop - pos, R - off)
        path = os.path.join(os.fspath(out_dir), entry["shards"][s]["file"])
        try:
            mm = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise CollectError(f"{path}: unreadable shard ({e})") from None
        out[pos - start:pos - start + n] = mm[off:off + n]
        del mm
        pos += n
    return out


def labels(model, layer: int, xk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth for FFN inputs xk (n, D): (active bool (n, F), act float32 (n, F)) where
    act = relu(W_k xk)^2 and active = act > 0."""
    pre = np.asarray(xk, np.float32) @ model.blocks[layer].ffn_key.T      # (n, F)
    np.maximum(pre, 0.0, out=pre)
    act = np.square(pre, out=pre)
    return act > 0, act


# --------------------------------------------------------------------------- text input


def read_text_pieces(path: str, n_chars: int | None = None, piece_chars: int | None = None) -> Iterator[str]:
    """Yield text of `path` in pieces ending at line breaks. With `n_chars` (smaller than the file),
    at least 16 pieces (of 4-64 KiB) are taken at evenly spaced offsets across the whole file, so a
    short collection still sees all of its authors/documents rather than only the beginning."""
    size = os.path.getsize(path)
    if piece_chars is None:
        piece_chars = 1 << 16 if n_chars is None else min(1 << 16, max(4096, int(n_chars) // 16))
    with open(path, "rb") as f:
        if n_chars is None or n_chars >= size:     # the whole file, in order, cut at line breaks
            rest = b""
            while True:
                raw = f.read(piece_chars)
                if not raw:
                    break
                raw = rest + raw
                nl = raw.rfind(b"\n")
                raw, rest = (raw[:nl + 1], raw[nl + 1:]) if nl >= 0 else (raw, b"")
                yield raw.decode("utf-8", errors="ignore")
            if rest:
                yield rest.decode("utf-8", errors="ignore")
            return
        n_pieces = max(1, -(-int(n_chars) // piece_chars))
        piece = -(-int(n_chars) // n_pieces)
        for i in range(n_pieces):
            start = int(i * (size - piece) / (n_pieces - 1)) if n_pieces > 1 else 0
            f.seek(start)
            raw = f.read(piece)
            at_end = start + len(raw) >= size
            if start > 0:               # begin after a line break and end at one: no cut words
                nl = raw.find(b"\n")
                raw = raw[nl + 1:] if nl >= 0 else raw
            nl = raw.rfind(b"\n")
            if nl >= 0 and not at_end:
                raw = raw[:nl + 1]
            yield raw.decode("utf-8", errors="ignore")


def encode_text(tokenizer, path: str, n_tokens: int | None, chars_per_token: float = 4.5) -> list[int]:
    """Token ids of (an evenly spread sample of) the text file `path`, at most `n_tokens` of them."""
    size = os.path.getsize(path)
    n_chars = None if n_tokens is None else int(n_tokens * chars_per_token)
    while True:
        pieces = [tokenizer.encode(piece) for piece in read_text_pieces(path, n_chars)]
        total = sum(len(p) for p in pieces)
        if n_tokens is None or total >= n_tokens or n_chars is None or n_chars >= size:
            break
        n_chars = int(n_chars * 1.25)  # the text was denser than guessed: sample more of it
    if n_tokens is not None and total > n_tokens:
        # shorten every piece by the same share, so the sample stays spread over the file
        keep = [len(p) * n_tokens // total for p in pieces]
        for j in range(n_tokens - sum(keep)):
            keep[j % len(keep)] += 1
        pieces = [p[:k] for p, k in zip(pieces, keep)]
    return [t for p in pieces for t in p]
