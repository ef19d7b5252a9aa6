"""Union of predictors: a neuron is predicted active if any member predicts it.

Each member keeps its own calibration (threshold or top-k), chosen jointly so that the union meets
the recall target with the fewest predicted neurons; the union costs the sum of the members' bytes.
"""
from __future__ import annotations

import copy

import numpy as np

from .base import LayerPredictor, register
from .calibrate import Calibration, threshold_for_target, topk_for_target

# recall given up by the first member, to be recovered by the others (joint union calibration)
JOINT_GRID = (0.0, 0.002, 0.005, 0.01, 0.02, 0.04)


def _residual_calibration(member, scores, w, covered, need):
    """The loosest calibration of `member` such that covered | member's set holds >= `need` weight.
    scores, w: (n, F); covered: bool (n, F) already predicted by earlier members."""
    have = float((w * covered).sum())
    if have >= need:                                   # nothing left to recover: predict nothing
        return Calibration(threshold=float("inf"), k=0, percentile=1.0)
    missed = (~covered) & (w > 0)
    if member.mode == "topk":                          # smallest k (binary search, monotone)
        lo, hi = 0, scores.shape[1]
        while lo < hi:
            mid = (lo + hi) // 2
            member.calib = Calibration(k=mid)
            if have + float((w * (member.select(scores) & ~covered)).sum()) >= need:
                hi = mid
            else:
                lo = mid + 1
        return Calibration(k=lo, percentile=1.0 - lo / scores.shape[1])
    s, ww = scores[missed].astype(np.float64), w[missed]
    order = np.argsort(-s, kind="stable")              # recover the highest-scored missed weight first
    got = have + np.cumsum(ww[order])
    j = min(int(np.searchsorted(got, need * (1 - 1e-12))), len(order) - 1)
    t = float(np.asarray(s[order][j], scores.dtype))
    return Calibration(threshold=t, percentile=float((scores < t).mean()))


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

    def calibrate(self, x, act, target, metric="mass", margin=0.0, grid=JOINT_GRID):
        """Calibrate jointly so that the union (not each member) meets the target, as sparse as
        possible: the first member is tried at target - d for each d in `grid`; each later member
        then gets the loosest setting that recovers what the earlier ones missed. The best d (the
        sparsest union on these rows) is kept."""
        x = np.asarray(x, np.float32)
        goal = min(1.0, float(target) + float(margin))
        w = act.astype(np.float64) if metric == "mass" else (act > 0).astype(np.float64)
        total = max(float(w.sum()), 1e-30)
        scores = [m.score(x) for m in self.members]
        best = None
        for d in grid:
            first = self.members[0]
            fn = topk_for_target if first.mode == "topk" else threshold_for_target
            calibs = [fn(scores[0], act, max(1e-6, goal - d), metric)]
            first.calib = calibs[0]
            covered = first.select(scores[0])
            for m, s in zip(self.members[1:], scores[1:]):
                m.calib = _residual_calibration(m, s, w, covered, goal * total)
                calibs.append(m.calib)
                covered = covered | m.select(s)
            sparsity = float(1.0 - covered.mean())
            if best is None or sparsity > best[0] + 1e-6:
                best = (sparsity, float((w * covered).sum() / total), [copy.copy(c) for c in calibs])
        for m, c in zip(self.members, best[2]):
            m.calib = c
        self.calib = Calibration(percentile=best[0], recall=best[1])
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
