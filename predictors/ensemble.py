"""Union of predictors: a neuron is predicted active if any member predicts it.

Each member keeps its own calibration (threshold or top-k); the union's recall is at least the
best member's, at the cost of a denser set and the sum of the members' bytes.
"""
from __future__ import annotations

import numpy as np

from .base import LayerPredictor, register


@register
class UnionPredictor(LayerPredictor):
    """members: list of calibrated LayerPredictors of the same layer."""

    kind = "union"
    mode = "union"

    def __init__(self, members: list):
        super().__init__()
        if not members:
            raise ValueError("a union needs at least one member")
        self.members = list(members)

    def score(self, x: np.ndarray) -> np.ndarray:
        """A score whose threshold 0.5 gives the union: 1.0 where some member predicts, else 0.0.
        (Only for the shared interface; `mask` is the real API.)"""
        return self.mask(x).astype(np.float32)

    def mask(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        out = self.members[0].mask(x)
        for m in self.members[1:]:
            out |= m.mask(x)
        return out

    def select(self, scores):
        return scores >= 0.5

    def indices(self, x: np.ndarray) -> np.ndarray:
        return np.unique(np.concatenate([m.indices(x) for m in self.members])).astype(np.int32)

    def calibrate(self, x, act, target, metric="mass", margin=0.0):
        """Calibrate every member to the target on its own; the union then exceeds it."""
        for m in self.members:
            m.calibrate(x, act, target, metric, margin)
        pred = self.mask(x)
        w = act if metric == "mass" else (act > 0)
        self.calib.percentile = float(1.0 - pred.mean())
        self.calib.recall = float((w * pred).sum(dtype=np.float64) / max(float(w.sum(dtype=np.float64)), 1e-30))
        return self.calib

    @property
    def nbytes(self) -> int:
        return int(sum(m.nbytes for m in self.members))

    def _arrays(self) -> dict:
        out = {"n_members": np.array(len(self.members), np.int64)}
        for j, m in enumerate(self.members):
            out.update({f"m{j}.{k}": v for k, v in m.to_arrays("").items()})
        return out

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        n = int(get("n_members"))
        sub = f"{prefix}." if prefix else ""
        return cls([LayerPredictor.from_arrays(d, f"{sub}m{j}") for j in range(n)])

    def describe(self) -> str:
        return " + ".join(m.describe() for m in self.members)
