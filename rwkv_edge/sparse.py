"""Real sparse FFN inference: read and compute only the neurons a predictor says are active.

    model = load_modelfile("m-int8.rwkve")                       # or any model
    sparse = model.with_ffn(SparseFFN(model, bundle.predict_indices))
    logits, state = sparse.forward(tokens)

`SparseFFN` is the callable `(layer, xk (T, D)) -> (T, D)` that `RWKVModel.with_ffn` plugs in place
of the dense FFN core (the model code and its other hooks are untouched). Per token it asks
`predict_indices(layer, x (D,)) -> int32 sorted neuron ids` and runs `numba_cpu.sparse_ffn` over the
layer's neuron-bundled weights: one contiguous key-row + value-column read per predicted neuron;
a predicted neuron whose activation turns out zero costs only its key row.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .backends import numba_cpu as nb


def layer_bundles(model, dtype: str | None = None) -> list:
    """The model's per-layer `NeuronBundledFFN`s: the ones it already holds (model files), else built
    from its dense W_k / W_v arrays in `dtype` ("fp32", "fp16", "int8"; default fp32)."""
    out = []
    for b in model.blocks:
        k = b.ffn_key
        if isinstance(k, nb.FFNKeyView) and (dtype is None or _dtype_name(k.bundle) == dtype):
            out.append(k.bundle)
        else:
            out.append(nb.NeuronBundledFFN.from_dense(np.asarray(k, np.float32), np.asarray(b.ffn_value, np.float32),
                                                      dtype or "fp32"))
    return out


def _dtype_name(bundle) -> str:
    return {"float32": "fp32", "float16": "fp16", "int8": "int8"}[bundle.kv.dtype.name]


class SparseFFN:
    """FFN core computing only predicted neurons.

    model: the model whose FFN weights are used (its bundles, or bundles built in `dtype`).
    predict_indices: fn(layer, x (D,) float32) -> sorted int32 neuron indices (e.g.
        `PredictorBundle.predict_indices`; tests pass the exact active set).
    Counts `n_tokens` and `n_active` (summed over layers) for reporting the density actually run.
    """

    def __init__(self, model, predict_indices: Callable[[int, np.ndarray], np.ndarray], dtype: str | None = None):
        self.bundles = layer_bundles(model, dtype)
        self.predict_indices = predict_indices
        self.n_tokens = 0
        self.n_active = 0

    def __call__(self, layer: int, xk: np.ndarray) -> np.ndarray:
        bundle = self.bundles[layer]
        T = xk.shape[0]
        if T == 1:
            x = xk[0] if xk.dtype == np.float32 and xk.flags.c_contiguous else np.ascontiguousarray(xk[0], np.float32)
            idx = self.predict_indices(layer, x)
            self.n_tokens += 1
            self.n_active += len(idx)
            out = np.empty((1, bundle.D), np.float32)
            nb.sparse_ffn(x, idx, bundle, out[0])
            return out
        # prefill: one active set per token, all tokens in one parallel kernel call
        X = np.ascontiguousarray(xk, np.float32)
        sets = [np.asarray(self.predict_indices(layer, X[t]), np.int32) for t in range(T)]
        offsets = np.zeros(T + 1, np.int64)
        np.cumsum([len(s) for s in sets], out=offsets[1:])
        self.n_tokens += T
        self.n_active += int(offsets[-1])
        idx = np.concatenate(sets) if offsets[-1] else np.zeros(0, np.int32)
        return nb.sparse_ffn_tokens(X, idx, offsets, bundle)

    @property
    def density(self) -> float:
        """Mean fraction of neurons computed per token and layer so far."""
        if not self.n_tokens:
            return 0.0
        return self.n_active / (self.n_tokens * self.bundles[0].F)


def exact_active_indices(model) -> Callable[[int, np.ndarray], np.ndarray]:
    """An oracle `predict_indices` giving the true active set {j : W_k[j] . x > 0} (computes the dense
    keys, so it is for tests and upper-bound measurements, not for speed)."""
    Ks = [np.asarray(b.ffn_key, np.float32) for b in model.blocks]

    def predict(layer: int, x: np.ndarray) -> np.ndarray:
        return np.flatnonzero(Ks[layer] @ x > 0).astype(np.int32)

    return predict


class ReplayIndices:
    """`predict_indices` that replays active sets recorded by `record` (one list per layer), in call
    order: an exact oracle with no cost at decode time, for upper-bound benchmarks."""

    def __init__(self, n_layer: int):
        self.sets = [[] for _ in range(n_layer)]
        self.pos = [0] * n_layer

    def record(self, layer: int, k: np.ndarray) -> np.ndarray:
        """A model `ffn_activation` hook: stores each token's nonzero set of k (T, F)."""
        for row in k:
            self.sets[layer].append(np.flatnonzero(row).astype(np.int32))
        return k

    def rewind(self) -> None:
        self.pos = [0] * len(self.sets)

    def __call__(self, layer: int, x: np.ndarray) -> np.ndarray:
        p = self.pos[layer]
        self.pos[layer] = p + 1
        return self.sets[layer][p]
