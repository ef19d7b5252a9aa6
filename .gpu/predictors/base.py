"""What every per-layer predictor shares: scoring, calibrated selection, (de)serialisation.

A predictor answers "which FFN neurons of this layer are active for input x". It computes a
score per neuron (T, F) and turns scores into a set with its per-layer calibration: either
`score >= threshold` or the top-k scores of each token. Subclasses implement `score`,
`nbytes`, `_arrays` and `_from_arrays`, and register themselves under a kind name.
"""
from __future__ import annotations

import numpy as np

from .calibrate import Calibration, threshold_for_target, topk_for_target, topk_mask

_KINDS: dict = {}


def register(cls):
    """Class decorator: make `cls` loadable by its `kind` name."""
    _KINDS[cls.kind] = cls
    return cls


def predictor_class(kind: str):
    if kind not in _KINDS:
        raise ValueError(f"unknown predictor kind {kind!r} (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[kind]


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


class LayerPredictor:
    """Base class. `mode` is "threshold" or "topk"; `calib` holds the calibrated values."""

    kind = ""
    mode = "threshold"

    def __init__(self):
        self.calib = Calibration()

    # --- to implement ------------------------------------------------------------------
    def score(self, x: np.ndarray) -> np.ndarray:
        """x (T, D) float -> scores (T, F) float32; higher means more likely active."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes the predictor itself must hold/read at inference (its parameters)."""
        raise NotImplementedError

    def _arrays(self) -> dict:
        raise NotImplementedError

    @classmethod
    def _from_arrays(cls, get, d, prefix: str) -> "LayerPredictor":
        """Build from arrays: `get(name)` reads this predictor's array `name`; `d`/`prefix` are
        the raw mapping and key prefix (for composite predictors)."""
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------
    def score_one(self, x: np.ndarray) -> np.ndarray:
        """x (D,) -> (F,) scores; subclasses may override with a cheaper single-token path."""
        return self.score(np.asarray(x, np.float32)[None, :])[0]

    def select(self, scores: np.ndarray) -> np.ndarray:
        """Scores (T, F) -> bool mask (T, F) using this layer's calibration."""
        if self.mode == "topk":
            return topk_mask(scores, self.calib.k)
        return scores >= np.float32(self.calib.threshold)

    def mask(self, x: np.ndarray) -> np.ndarray:
        """x (T, D) -> bool (T, F): the neurons predicted active."""
        x = np.asarray(x, np.float32)
        if x.ndim != 2:
            raise ValueError(f"mask expects x of shape (T, D), got {x.shape}")
        return self.select(self.score(x))

    def indices(self, x: np.ndarray) -> np.ndarray:
        """x (D,) -> int32 sorted indices of the neurons predicted active."""
        s = self.score_one(np.asarray(x, np.float32).reshape(-1))
        if self.mode == "topk":
            k = self.calib.k
            if k <= 0:
                return np.zeros(0, np.int32)
            idx = np.argpartition(-s, k - 1)[:k] if k < s.size else np.arange(s.size)
            return np.sort(idx).astype(np.int32)
        return np.flatnonzero(s >= np.float32(self.calib.threshold)).astype(np.int32)

    def calibrate(self, x: np.ndarray, act: np.ndarray, target: float, metric: str = "mass",
                  margin: float = 0.0) -> Calibration:
        """Set this layer's threshold / k on held-out rows x (n, D) with act = relu(W_k x)^2 (n, F)."""
        scores = self.score(np.asarray(x, np.float32))
        fn = topk_for_target if self.mode == "topk" else threshold_for_target
        self.calib = fn(scores, act, target, metric, margin)
        return self.calib

    def to_arrays(self, prefix: str) -> dict:
        """{name: array} for an .npz, keys under `prefix`."""
        c = self.calib
        out = {_key(prefix, "kind"): np.array(self.kind),
               _key(prefix, "calib"): np.array([c.threshold, c.k, c.percentile, c.recall], np.float64)}
        out.update({_key(prefix, k): v for k, v in self._arrays().items()})
        return out

    @staticmethod
    def from_arrays(d, prefix: str) -> "LayerPredictor":
        """Inverse of `to_arrays` for any registered kind; `d` is a dict or an open np.load file."""
        def get(name):
            try:
                return np.asarray(d[_key(prefix, name)])
            except KeyError:
                raise ValueError(f"missing predictor array {_key(prefix, name)!r}") from None
        cls = predictor_class(str(get("kind")))
        p = cls._from_arrays(get, d, prefix)
        t, k, pct, rec = (float(v) for v in get("calib"))
        p.calib = Calibration(threshold=t, k=int(k), percentile=pct, recall=rec)
        return p

    def describe(self) -> str:
        return self.kind
