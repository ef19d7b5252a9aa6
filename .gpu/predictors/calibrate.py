"""Per-layer calibration of predictor scores on held-out collected data.

A predictor gives every (token, neuron) a score; the predicted active set is either
`score >= threshold` (one value per layer) or the top-k scores of each token (one k per layer).
Calibration picks, per layer, the sparsest setting that still meets a target recall measured
on held-out rows, for one of two metrics:

- "active": share of truly active neurons (relu(W_k x) > 0) that are predicted,
- "mass":   share of the activation mass sum(relu(W_k x)^2) that falls on predicted neurons.

The threshold is a quantile of the scores of the active entries (weighted by their mass for
"mass"); it is also reported as a percentile of the layer's whole score distribution, which is the
predicted sparsity on the calibration rows. Deeper layers are denser, so each layer gets its own.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("active", "mass")


def check_target(target: float, metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown recall metric {metric!r}, choose one of {', '.join(METRICS)}")
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target recall must be in (0, 1], got {target}")


@dataclass
class Calibration:
    """Result for one layer: `threshold` (score >= threshold is active) or `k` (top-k per token),
    the percentile of the score distribution it sits at (= predicted sparsity on the calibration
    rows) and the recall it reached there."""
    threshold: float = float("-inf")
    k: int = 0
    percentile: float = 0.0
    recall: float = 1.0


def _weights(act: np.ndarray, metric: str) -> np.ndarray:
    # act: (n, F) relu(W_k x)^2. Returns the per-entry weight of the recall being measured.
    return (act > 0).astype(np.float64) if metric == "active" else act.astype(np.float64)


def threshold_for_target(scores: np.ndarray, act: np.ndarray, target: float, metric: str = "mass",
                         margin: float = 0.0) -> Calibration:
    """The largest threshold t with recall(score >= t) >= target + margin on these rows.

    scores, act: (n, F) float. Exact: the weighted (1 - target) quantile of the active entries' scores.
    """
    check_target(target, metric)
    goal = min(1.0, float(target) + float(margin))
    w_all = _weights(act, metric)
    on = w_all > 0
    s, w = scores[on].astype(np.float64), w_all[on]               # active entries only
    if s.size == 0:                       # nothing ever fires here: predict nothing
        return Calibration(threshold=float("inf"), percentile=1.0, recall=1.0)
    order = np.argsort(s, kind="stable")
    s, w = s[order], w[order]
    total = w.sum()
    below = np.concatenate([[0.0], np.cumsum(w)[:-1]])            # weight strictly before j
    ok = below <= (1.0 - goal) * total * (1 + 1e-12)
    j = int(np.nonzero(ok)[0][-1])                                # last index still meeting the goal
    t = s[j]
    # float32 scores: compare in the dtype predictions will use.
    t = float(np.asarray(t, scores.dtype))
    pred = scores >= t
    rec = float((w_all * pred).sum() / w_all.sum())
    return Calibration(threshold=t, percentile=float(1.0 - pred.mean()), recall=rec)


def threshold_for_percentile(scores: np.ndarray, act: np.ndarray, percentile: float,
                             metric: str = "mass") -> Calibration:
    """The threshold at the `percentile` quantile of all scores (n, F) of these rows, so that a share
    `percentile` of the (token, neuron) cells is predicted inactive (the seed's per-layer
    "percentile" setting); the recall reached there is measured on the same rows."""
    check_target(0.5, metric)
    if not 0.0 <= float(percentile) < 1.0:
        raise ValueError(f"percentile must be in [0, 1), got {percentile}")
    t = float(np.asarray(np.quantile(scores, float(percentile), method="lower"), scores.dtype))
    pred = scores >= t
    w_all = _weights(act, metric)
    total = w_all.sum()
    rec = float((w_all * pred).sum() / total) if total > 0 else 1.0
    return Calibration(threshold=t, percentile=float(1.0 - pred.mean()), recall=rec)


def topk_for_percentile(scores: np.ndarray, act: np.ndarray, percentile: float, metric: str = "mass") -> Calibration:
    """For a top-k predictor: k = round((1 - percentile) F), the same predicted sparsity as
    `threshold_for_percentile`; recall measured on these rows (scores, act: (n, F))."""
    check_target(0.5, metric)
    if not 0.0 <= float(percentile) < 1.0:
        raise ValueError(f"percentile must be in [0, 1), got {percentile}")
    F = scores.shape[1]
    k = max(1, int(round((1.0 - float(percentile)) * F)))
    pred = topk_mask(scores, k)
    w_all = _weights(act, metric)
    total = w_all.sum()
    rec = float((w_all * pred).sum() / total) if total > 0 else 1.0
    return Calibration(k=k, percentile=1.0 - k / F, recall=rec)


def seed_schedule(n_layer: int) -> list[float]:
    """The seed's per-layer percentiles mapped to `n_layer` layers. The seed (a 24-layer RWKV-5) used
    0.95 for layers <= 4, 0.85 in the middle and 0.80-0.85 for the last layers: here the first
    round(5 n / 24) layers get 0.95, the last round(4 n / 24) go linearly from 0.85 down to 0.80
    (0.80 if only one), the rest 0.85."""
    if n_layer < 1:
        raise ValueError("n_layer must be >= 1")
    first = max(1, round(5 * n_layer / 24))
    last = max(1, round(4 * n_layer / 24)) if n_layer > first else 0
    out = [0.95] * first + [0.85] * (n_layer - first - last)
    out += [0.80] if last == 1 else [round(float(v), 4) for v in np.linspace(0.85, 0.80, last)]
    return out[:n_layer]


def topk_for_target(scores: np.ndarray, act: np.ndarray, target: float, metric: str = "mass",
                    margin: float = 0.0) -> Calibration:
    """The smallest k with recall(top-k scores of each row) >= target + margin on these rows."""
    check_target(target, metric)
    goal = min(1.0, float(target) + float(margin))
    n, F = scores.shape
    w_all = _weights(act, metric)
    total = w_all.sum()
    if total == 0:
        return Calibration(k=0, percentile=1.0, recall=1.0)
    by_rank = np.zeros(F, np.float64)                             # weight captured at each rank
    for a in range(0, n, 4096):                                   # chunked: argsort is (n, F) int64
        order = np.argsort(-scores[a:a + 4096], axis=1, kind="stable")
        by_rank += np.take_along_axis(w_all[a:a + 4096], order, axis=1).sum(0)
    captured = np.cumsum(by_rank) / total                         # (F,) recall of top-(k+1)
    k = int(np.searchsorted(captured, goal * (1 - 1e-12)) + 1)
    k = min(k, F)
    return Calibration(k=k, percentile=1.0 - k / F, recall=float(captured[k - 1]))


def topk_mask(scores: np.ndarray, k: int) -> np.ndarray:
    """Bool (T, F): the k highest scores of each row."""
    T, F = scores.shape
    m = np.zeros((T, F), bool)
    if k <= 0:
        return m
    if k >= F:
        m[:] = True
        return m
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    np.put_along_axis(m, idx, True, axis=1)
    return m


def recall_stats(pred: np.ndarray, act: np.ndarray) -> dict:
    """Counts for the report: pred bool (n, F), act float (n, F) = relu(W_k x)^2."""
    active = act > 0
    return {"rows": int(act.shape[0]), "cells": int(act.size), "active": int(active.sum()),
            "predicted": int(pred.sum()), "hit": int((pred & active).sum()),
            "mass": float(act.sum(dtype=np.float64)), "mass_hit": float(act[pred].sum(dtype=np.float64))}
