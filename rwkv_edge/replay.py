"""Active FFN sets recorded from a real model, replayed onto a model of another shape.

Random weights make relu(W_k x) ~50% non-zero; a trained RWKV-7 is 70-90% sparse and its active
sets overlap from token to token. To measure bytes, speed and residency of the sparse FFN at real
sizes (official 0.1B-1.5B shapes with random weights), record the true active sets of a trained
model on held-out text once, then replay them:

    sets = ActiveSets.record(ref_model, tokens)            # (T tokens, L layers, F neurons) bits
    sets.save("active-sets.npz"); sets = ActiveSets.load("active-sets.npz")
    sparse = model.with_ffn(replayed_sparse_ffn(model, sets))   # numba bundled sparse FFN

Mapping onto L' layers and F' neurons: layer l' replays reference layer l' * L // L'; neuron j' is
active iff (j' mod F) is active in the reference layer (F' = 4F: the set tiled four times). This keeps
each layer's density and the token-to-token overlap of the sets exactly (both are per-neuron
statistics), and the depth profile of density (early layers denser) up to resampling.
Replay is in call order per layer and wraps around after T tokens.

File (.npz, written atomically): `bits` uint8 (T, L, F/8) np.packbits of the active masks, `meta`
JSON {format, version, fingerprint of the reference model, n_layer, ffn_dim, n_tokens, source}.
1000 tokens of the 12 x 2048 reference model are 3 MiB; sets are unpacked per call (a few us), so
replay adds no resident memory beyond that.
"""
from __future__ import annotations

import json

import numpy as np

from .fileio import atomic_write

FORMAT = "rwkv-edge-active-sets"
VERSION = 1


class ActiveSets:
    """Recorded active neuron sets: bits (T, L, ceil(F/8)) uint8, F neurons per layer."""

    def __init__(self, bits: np.ndarray, ffn_dim: int, fingerprint: str, source: str = ""):
        if bits.ndim != 3 or bits.dtype != np.uint8 or bits.shape[2] != (ffn_dim + 7) // 8:
            raise ValueError(f"bits must be (T, L, ceil(F/8)) uint8, got {bits.dtype} {bits.shape} for F={ffn_dim}")
        self.bits, self.ffn_dim, self.fingerprint, self.source = bits, int(ffn_dim), fingerprint, source

    n_tokens = property(lambda self: self.bits.shape[0])
    n_layer = property(lambda self: self.bits.shape[1])

    @classmethod
    def record(cls, model, tokens, chunk: int = 128, source: str = "", progress=None) -> "ActiveSets":
        """Run `tokens` through `model` (any backend) in chunks, recording {j : relu(W_k x)_j > 0} of
        every layer and token through the `ffn_activation` hook. progress: optional fn(n tokens done)."""
        tokens = [int(t) for t in tokens]
        L, F = model.config.n_layer, model.config.ffn_dim
        bits = np.zeros((len(tokens), L, (F + 7) // 8), np.uint8)
        pos = [0]

        def hook(layer, k):
            k = np.asarray(k)
            bits[pos[0]:pos[0] + k.shape[0], layer] = np.packbits(k > 0, axis=-1)
            return k

        m = model.with_ffn(None)
        m.hooks.ffn_activation.append(hook)
        state = None
        for t0 in range(0, len(tokens), chunk):
            pos[0] = t0
            _, state = m.forward(tokens[t0:t0 + chunk], state)
            if progress is not None:
                progress(min(chunk, len(tokens) - t0))
        return cls(bits, F, model.fingerprint, source)

    def mask(self, layer: int, t: int) -> np.ndarray:
        """bool (F,) active mask of reference layer `layer` at token t (wrapping)."""
        return np.unpackbits(self.bits[t % self.n_tokens, layer], count=self.ffn_dim).view(bool)

    def indices(self, layer: int, t: int) -> np.ndarray:
        """Sorted int32 active neuron ids of reference layer `layer` at token t (wrapping)."""
        return np.flatnonzero(self.mask(layer, t)).astype(np.int32)

    def density(self) -> np.ndarray:
        """(L,) mean fraction of active neurons per layer."""
        return np.unpackbits(self.bits, axis=-1, count=self.ffn_dim).mean(axis=(0, 2))

    def overlap(self) -> np.ndarray:
        """(L,) mean |S_t & S_{t-1}| / |S_t|: the share of a token's set already active one token ago."""
        m = np.unpackbits(self.bits, axis=-1, count=self.ffn_dim).astype(bool)
        inter = (m[1:] & m[:-1]).sum(axis=(0, 2))
        return inter / np.maximum(1, m[1:].sum(axis=(0, 2)))

    def save(self, path) -> str:
        meta = {"format": FORMAT, "version": VERSION, "fingerprint": self.fingerprint, "n_layer": self.n_layer,
                "ffn_dim": self.ffn_dim, "n_tokens": self.n_tokens, "source": self.source}
        with atomic_write(path, prefix=".sets-") as f:
            np.savez_compressed(f, bits=self.bits, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        return str(path)

    @classmethod
    def load(cls, path, fingerprint: str | None = None) -> "ActiveSets":
        """Load a recording; ValueError on a foreign file, a newer format, or a fingerprint mismatch."""
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(bytes(z["meta"]).decode())
                bits = z["bits"]
        except (OSError, KeyError, ValueError) as e:
            raise ValueError(f"{path}: not an active-set recording ({e})") from None
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"{path}: format {meta.get('format')} v{meta.get('version')}, expected {FORMAT} v{VERSION}")
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise ValueError(f"{path}: recorded on model {meta['fingerprint']}, not {fingerprint}")
        return cls(bits, meta["ffn_dim"], meta["fingerprint"], meta.get("source", ""))


def map_indices(ref: np.ndarray, F_ref: int, F: int) -> np.ndarray:
    """Sorted int32 ids j < F with (j mod F_ref) in the sorted reference set `ref`."""
    parts = [ref + c * F_ref for c in range((F + F_ref - 1) // F_ref)]
    out = np.concatenate(parts) if parts else ref
    return out[: np.searchsorted(out, F)].astype(np.int32, copy=False)


class ReplayedSets:
    """`predict_indices(layer, x)` for a model of n_layer x ffn_dim replaying `sets` (see module
    docstring); one position per layer, advanced on each call (so prefill and decode both follow the
    recording), starting at token `start`."""

    def __init__(self, sets: ActiveSets, n_layer: int, ffn_dim: int, start: int = 0):
        self.sets, self.n_layer, self.ffn_dim = sets, int(n_layer), int(ffn_dim)
        self.ref_layer = [l * sets.n_layer // n_layer for l in range(n_layer)]
        self.pos = [int(start)] * n_layer

    @classmethod
    def from_file(cls, path, model, start: int = 0) -> "ReplayedSets":
        """The sets recorded in `path` (an `ActiveSets` file) replayed onto `model`'s shape."""
        return cls(ActiveSets.load(path), model.config.n_layer, model.config.ffn_dim, start)

    def indices(self, layer: int, t: int) -> np.ndarray:
        """The mapped set of `layer` at recorded token t."""
        return map_indices(self.sets.indices(self.ref_layer[layer], t), self.sets.ffn_dim, self.ffn_dim)

    def mask(self, layer: int, t: int) -> np.ndarray:
        m = np.zeros(self.ffn_dim, bool)
        m[self.indices(layer, t)] = True
        return m

    def rewind(self, start: int = 0) -> None:
        self.pos = [int(start)] * self.n_layer

    def predict_indices(self, layer: int, x=None) -> np.ndarray:
        t = self.pos[layer]
        self.pos[layer] = t + 1
        return self.indices(layer, t)


def replayed_sparse_ffn(model, sets: ActiveSets, start: int = 0):
    """A `sparse.SparseFFN` for `model` whose active sets are `sets` replayed onto its shape: the numba
    bundled sparse FFN reads exactly the replayed neurons' key rows (and value columns where the
    activation is non-zero)."""
    from .sparse import SparseFFN

    c = model.config
    return SparseFFN(model, ReplayedSets(sets, c.n_layer, c.ffn_dim, start))


def record_text(model_path, text_path, n_tokens: int, out_path=None, backend: str = "numba") -> ActiveSets:
    """Record the active sets of the model at `model_path` on the first `n_tokens` tokens of the text
    file (tokenizer found next to the model); saved to `out_path` when given."""
    import os

    from . import load_model
    from .tokenizer import load_tokenizer

    model = load_model(model_path, backend=backend)
    tok = load_tokenizer(None, model_path, model.config.vocab_size)
    with open(text_path, encoding="utf-8") as f:
        ids = tok.encode(f.read())[:n_tokens]
    if len(ids) < n_tokens:
        raise ValueError(f"{text_path}: only {len(ids)} tokens, {n_tokens} asked")
    sets = ActiveSets.record(model, ids, source=f"{os.path.basename(os.fspath(model_path))}:"
                                                f"{os.path.basename(os.fspath(text_path))}")
    if out_path is not None:
        sets.save(out_path)
    return sets


def cached_sets(path, model_path, text_path, n_tokens: int = 1100) -> ActiveSets:
    """The recording at `path` if it exists and was made on `model_path`'s model, else record it there."""
    import os

    if os.path.exists(path):
        try:
            sets = ActiveSets.load(path)
            if sets.n_tokens >= n_tokens and sets.source.startswith(os.path.basename(os.fspath(model_path)) + ":"):
                return sets
        except ValueError:
            pass
    return record_text(model_path, text_path, n_tokens, path)
