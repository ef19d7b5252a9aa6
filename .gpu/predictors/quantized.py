"""The n-bit W_k predictor: score = W_hat x with W_hat the FFN key matrix at 1/2/4/8 bits.

A neuron is active iff (W_k x)_f > 0, so an approximate W_k x ranks neurons almost like the exact
one; the calibrated threshold (usually a little below 0) absorbs the quantization error.

At 1-2 bits the min/max grid of `quant` wastes most levels on the rare extreme weights. `clip`
shrinks each row to mean +- clip * std before quantizing (the extremes saturate), which for
roughly Gaussian rows cuts the error a lot (the Lloyd-Max 2-bit grid sits at +-0.45 and +-1.5 std).
`choose_clip` picks it per layer by the sparsity reached at the recall target on sample rows.
"""
from __future__ import annotations

import numpy as np

from rwkv_edge.quant import QuantizedMatrix

from .base import LayerPredictor, register
from .calibrate import threshold_for_target

CLIP_CANDIDATES = (None, 2.5, 2.0, 1.75, 1.5, 1.25)


def _clip_rows(w: np.ndarray, clip: float | None, group_size: int | None) -> np.ndarray:
    """Clip each row (or group of `group_size` columns) of w (F, D) to mean +- clip * std."""
    if clip is None:
        return w
    F, D = w.shape
    g = w.reshape(F, -1, group_size if group_size else D)          # (F, G, gs)
    mu = g.mean(-1, keepdims=True)
    sd = g.std(-1, keepdims=True)
    return np.clip(g, mu - clip * sd, mu + clip * sd).reshape(F, D)


@register
class QuantizedPredictor(LayerPredictor):
    """W_k (F, D) quantized with `quant.QuantizedMatrix`; threshold per layer."""

    kind = "quantized"
    mode = "threshold"

    def __init__(self, qm: QuantizedMatrix, clip: float | None = None):
        super().__init__()
        self.qm = qm
        self.clip = clip

    @classmethod
    def fit(cls, w_key: np.ndarray, bits: int, group_size: int | None = 64,
            clip: float | None = None) -> "QuantizedPredictor":
        """Quantize the FFN key matrix w_key (F, D) to `bits` bits with per-group (or per-row when
        group_size is None) float16 scales and zero points, after optional clipping."""
        w = np.asarray(w_key, np.float32)
        if group_size is not None and w.shape[1] % group_size:
            raise ValueError(f"group size {group_size} does not divide n_embd {w.shape[1]}")
        return cls(QuantizedMatrix.quantize(_clip_rows(w, clip, group_size), bits, group_size), clip)

    @classmethod
    def fit_auto_clip(cls, w_key: np.ndarray, bits: int, group_size: int | None, x: np.ndarray,
                      act: np.ndarray, target: float, metric: str,
                      candidates=CLIP_CANDIDATES) -> "QuantizedPredictor":
        """Fit one predictor per clip candidate and keep the one that is sparsest at `target`
        recall on rows x (n, D) (with act = relu(W_k x)^2 (n, F)); ties go to the earlier one."""
        best, best_sp = None, -1.0
        for c in candidates:
            p = cls.fit(w_key, bits, group_size, c)
            sp = threshold_for_target(p.score(x), act, target, metric).percentile
            if sp > best_sp + 1e-4:
                best, best_sp = p, sp
        return best

    def score(self, x: np.ndarray) -> np.ndarray:
        return self.qm.matvec(np.asarray(x, np.float32)).astype(np.float32, copy=False)

    def score_one(self, x: np.ndarray) -> np.ndarray:
        return self.qm.matvec(np.asarray(x, np.float32).reshape(-1)).astype(np.float32, copy=False)

    @property
    def bits(self) -> int:
        return self.qm.bits

    @property
    def nbytes(self) -> int:
        return self.qm.nbytes

    def _arrays(self) -> dict:
        out = {f"w.{k}": v for k, v in self.qm.to_arrays().items()}
        out["clip"] = np.array(np.nan if self.clip is None else self.clip, np.float64)
        return out

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        qm = QuantizedMatrix.from_arrays({k: get(f"w.{k}") for k in ("packed", "scale", "zero", "meta")})
        c = float(get("clip"))
        return cls(qm, None if np.isnan(c) else c)

    def describe(self) -> str:
        gs = self.qm.group_size
        clip = "" if self.clip is None else f" clip={self.clip:g}"
        return f"quantized {self.qm.bits}-bit {'per-row' if gs is None else f'group={gs}'}{clip}"
