"""Real sparse FFN inference: read and compute only the neurons a predictor says are active.

    model = load_modelfile("m-int8.rwkve")                       # or any model
    sparse = model.with_ffn(SparseFFN(model, bundle))     # or any fn(layer, x) -> indices
    logits, state = sparse.forward(tokens)

`SparseFFN` is the callable `(layer, xk (T, D)) -> (T, D)` that `RWKVModel.with_ffn` plugs in place
of the dense FFN core (the model code and its other hooks are untouched). Per token it asks the
predictor (a function or a `PredictorBundle`) `predict_indices(layer, x (D,)) -> int32 sorted neuron
ids` and runs `numba_cpu.sparse_ffn` over the layer's neuron-bundled weights: one contiguous key-row +
value-column read per predicted neuron; a predicted neuron whose activation turns out zero costs
only its key row. Where numba cannot run (the `auto` backend fell back to the reference), the same
sets run through numpy on the model's float32 W_k / W_v.
"""
from __future__ import annotations

from typing import Callable

import numpy as np



def _nb():
    """The numba kernels module (imported on first use: numba may be missing where this runs)."""
    from .backends import numba_cpu

    return numba_cpu


def layer_bundles(model, dtype: str | None = None) -> list:
    """The model's per-layer `NeuronBundledFFN`s: the ones it already holds (model files), else built
    from its dense W_k / W_v arrays in `dtype` ("fp32", "fp16", "int8"; default fp32)."""
    nb = _nb()
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
    return {"float32": "fp32", "float16": "fp16", "int8": "int8", "uint8": "int4"}[bundle.kv.dtype.name]


class SparseFFN:
    """FFN core computing only predicted neurons.

    model: the model whose FFN weights are used (its bundles, or bundles built in `dtype`).
    predictor: None for the exact mode (all key rows are read, value columns only where
        relu(k)^2 > 0: no prediction error, about half the FFN bytes at ~10-20% density), or
        fn(layer, x (D,) float32) -> sorted int32 neuron indices, or an object with such a
        `predict_indices` method (e.g. a `PredictorBundle`; tests pass the exact active set). If the
        object also has `predict(layer, xk (T, D)) -> bool (T, F)`, prefill uses it for all T tokens.
        A bundle of quantized-W_k threshold predictors decodes through `numba_cpu.sparse_ffn_quant`
        (prediction and FFN in one kernel call, its select possibly the AVX2 int8 kernel) when the model
        runs the numba backend (fused=None, the default) or fused=True; fused=False, and a model on the
        reference backend by default, take the generic path: the predictor's own float32 scores.
    Counts `n_tokens` and `n_active` (summed over layers) for reporting the density actually run.
    """

    def __init__(self, model, predictor, dtype: str | None = None, fused: bool | None = None):
        from .backends import resolve

        self.F = model.config.ffn_dim
        if getattr(predictor, "input", "ffn") != "ffn":
            raise ValueError("this bundle scores early inputs, not the FFN input: run it through "
                             "runtime.run_sparse (predictors.early.EarlySets)")
        self.bundles, self.dense = None, None
        if getattr(model.ops, "name", "") == "numba" or resolve("auto")[0] == "numba":
            self.bundles = layer_bundles(model, dtype)
        else:          # numba cannot run here: numpy on the float32 weights, (W_k (F, D), W_v (D, F))
            self.dense = [(np.asarray(b.ffn_key, np.float32), np.asarray(b.ffn_value, np.float32)) for b in model.blocks]
        if predictor is None:  # exact: every key row, value columns of the active neurons only
            every = np.arange(self.F, dtype=np.int32)
            predictor = lambda layer, x: every  # noqa: E731
        if callable(predictor) and not hasattr(predictor, "predict_indices"):
            self.predict_indices, self.predict_mask = predictor, None
        elif hasattr(predictor, "predict_indices"):
            self.predict_indices = predictor.predict_indices
            self.predict_mask = getattr(predictor, "predict", None)
        else:
            raise TypeError("predictor must be a function (layer, x) -> indices or have .predict_indices")
        self.predictor = predictor
        # Quantized-W_k threshold predictors (the common bundle) run fused with the FFN in one kernel:
        # score = W_hat x from the packed codes, set = {score >= threshold}, then the sparse FFN.
        layers = getattr(predictor, "predictors", None)
        if fused is None:
            fused = getattr(model.ops, "name", "") == "numba"
        self.fused = None
        if (fused and self.bundles is not None and layers is not None and len(layers) == len(self.bundles)
                and all(map(_is_quantized, layers))):
            self.fused = list(layers)
        self.n_tokens = 0
        self.n_active = 0
        if self.bundles is not None:
            from .residency import advise_random
            advise_random(self.bundles)     # mapped weights: no read-around of neighbours on a page fault

    def __call__(self, layer: int, xk: np.ndarray) -> np.ndarray:
        if self.dense is not None:
            return self._numpy(layer, xk)
        nb, bundle = _nb(), self.bundles[layer]
        T = xk.shape[0]
        if T == 1:
            x = xk[0] if xk.dtype == np.float32 and xk.flags.c_contiguous else np.ascontiguousarray(xk[0], np.float32)
            out = np.empty((1, bundle.D), np.float32)
            self.n_tokens += 1
            if self.fused is not None:
                p = self.fused[layer]
                self.n_active += nb.sparse_ffn_quant(x, p.qm, p.calib.threshold, bundle, out[0])[1]
                return out
            idx = self.predict_indices(layer, x)
            self.n_active += len(idx)
            nb.sparse_ffn(x, idx, bundle, out[0])
            return out
        # prefill: one active set per token, all tokens in one parallel kernel call
        X = np.ascontiguousarray(xk, np.float32)
        if self.fused is not None:          # the decode select per token, on the packed codes
            offsets, idx = self._fused_sets(layer, X)
        elif self.predict_mask is not None:
            rows, idx = np.nonzero(self.predict_mask(layer, X))         # row-major: sorted per token
            offsets = np.zeros(T + 1, np.int64)
            np.cumsum(np.bincount(rows, minlength=T), out=offsets[1:])
            idx = idx.astype(np.int32)
        else:
            sets = [np.asarray(self.predict_indices(layer, X[t]), np.int32) for t in range(T)]
            offsets = np.zeros(T + 1, np.int64)
            np.cumsum([len(s) for s in sets], out=offsets[1:])
            idx = np.concatenate(sets) if offsets[-1] else np.zeros(0, np.int32)
        self.n_tokens += T
        self.n_active += int(offsets[-1])
        return nb.sparse_ffn_tokens(X, idx, offsets, bundle)

    def _numpy(self, layer: int, xk: np.ndarray) -> np.ndarray:
        """The same sets with numpy: relu(W_k[S] x)^2 through W_v[:, S] (the dense math masked to S)."""
        Wk, Wv = self.dense[layer]
        X = np.asarray(xk, np.float32)
        if self.predict_mask is not None:
            mask = np.asarray(self.predict_mask(layer, X), bool)                      # (T, F)
        else:
            mask = np.zeros((X.shape[0], self.F), bool)
            for t in range(X.shape[0]):
                mask[t, np.asarray(self.predict_indices(layer, X[t]))] = True
        self.n_tokens += X.shape[0]
        self.n_active += int(mask.sum())
        k = np.maximum(X @ Wk.T, 0.0)
        return ((k * k) * mask) @ Wv.T

    def _fused_sets(self, layer: int, X: np.ndarray, layers=None):
        """(offsets (T+1,), idx) of T tokens by the same select kernel as decode: no float32 copy of
        the predictor (its `predict` would cache one, 4 bytes per weight, for good)."""
        p, F = (layers or self.fused)[layer], self.bundles[layer].F
        select, P, S, Z = _nb().predictor_select(p.qm)
        buf, thr = np.empty((X.shape[0], F), np.int32), np.float32(p.calib.threshold)
        counts = np.array([select(P, S, Z, X[t], p.qm.bits, thr, buf[t], 1) for t in range(X.shape[0])], np.int64)
        offsets = np.zeros(X.shape[0] + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        return offsets, np.concatenate([buf[t, :n] for t, n in enumerate(counts)])

    @property
    def density(self) -> float:
        """Mean fraction of neurons whose key row was read, per token and layer so far."""
        if not self.n_tokens:
            return 0.0
        return self.n_active / (self.n_tokens * self.F)


def _is_quantized(p) -> bool:
    """A predictor whose set is {j : (qm @ x)_j >= calib.threshold} (predictors.QuantizedPredictor)."""
    return getattr(p, "kind", "") == "quantized" and getattr(p, "mode", "") == "threshold" and hasattr(p, "qm")


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


class DeviceSparseFFN:
    """Sparse FFN on a device backend (CUDA) for bundles of quantized-W_k threshold predictors, or for
    an early bundle (input "early": the set comes from `predictors.early.EarlySets` hooks, which
    `attach` adds; they score ln1 and the FFN shift state on the host, one sync per layer).

    Per layer: scores = W_hat xk (dequantized predictor on the device), mask = scores >= threshold
    (T, F); S = union of the tokens' active sets; only the rows S of W_k and of W_v^T are gathered:
    out = (relu(xk W_k[S]^T)^2 * mask[:, S]) W_v^T[S]. For T = 1 that is exactly the token's set.
    `bundle` stays readable: the generator's batch-1 CUDA decode (generate.batch1_step) runs the same bundle
    in `cuda_decode.FusedDecode` (mode "predicted") and ignores the hooks this FFN owns (`own_hooks`).
    """

    def __init__(self, model, bundle):
        ops = model.ops
        self.bundle, self.sets, self.own_hooks = bundle, None, []
        layers = getattr(bundle, "predictors", None)
        if getattr(bundle, "input", "ffn") == "early":
            from rwkv_edge.predictors.early import EarlySets
            self.sets, self.wq, self.thr = EarlySets(bundle), None, None
        elif layers is None or not all(map(_is_quantized, layers)):
            raise ValueError("the device sparse FFN needs a bundle of quantized predictors (--kind quantized)")
        else:
            self.wq = [ops.predictor_weight(p.qm.dequantize()) for p in layers]
            self.thr = [float(p.calib.threshold) for p in layers]
        self.ops = ops
        self.key = [b.ffn_key for b in model.blocks]
        self.value_t = [ops.transpose_weight(b.ffn_value) for b in model.blocks]
        self.n_tokens = 0
        self.n_active = 0
        self.F = model.config.ffn_dim

    def attach(self, model):
        """`model` with this FFN (a shallow copy; an early bundle's EarlySets hooks added and recorded)."""
        m = model.with_ffn(self)
        if self.sets is not None:
            self.sets.attach(m)
            self.own_hooks = [f for _, f in self.sets.rows.pairs(m.hooks)]
        return m

    def share_value_t(self, model) -> None:
        """Drop the (F, D) W_v^T copies where the model's ffn_value already is a view of a contiguous
        transpose (cuda_decode.FusedDecode's sparse modes rebind it so): same numbers, held once."""
        for i, b in enumerate(model.blocks):
            vt = b.ffn_value.t()
            if vt.is_contiguous():
                self.value_t[i] = vt

    def __call__(self, layer: int, xk):
        ops = self.ops
        if self.sets is not None:    # the early set of this layer, (T, F) bool on the host -> device
            mask = ops.threshold_mask(ops.predictor_weight(self.sets.predict(layer, None).astype(np.float32)), 0.5)
        else:
            mask = ops.threshold_mask(ops.predictor_scores(xk, self.wq[layer]), self.thr[layer])   # (T, F)
        idx = ops.mask_to_indices(mask)                                                        # S
        h = ops.relu_sq(ops.linear(xk, self.key[layer][idx])) * mask[:, idx]
        self.n_tokens += xk.shape[0]
        self.n_active += int(mask.sum())
        return ops.matmul(h, self.value_t[layer][idx])

    @property
    def density(self) -> float:
        return self.n_active / max(1, self.n_tokens * self.F)
