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


def quantize_rows(w: np.ndarray, bits: int, group_size: int | None, clip: float | None) -> QuantizedMatrix:
    """w (F, D) clipped (`_clip_rows`) and quantized to `bits` with per-group (or per-row when group_size is
    None) float16 scales and zero points."""
    w = np.asarray(w, np.float32)
    if group_size is not None and w.shape[1] % group_size:
        raise ValueError(f"group size {group_size} does not divide n_embd {w.shape[1]}")
    return QuantizedMatrix.quantize(_clip_rows(w, clip, group_size), bits, group_size)


def sparsest_clip(make, x: np.ndarray, act: np.ndarray, target: float, metric: str, candidates=CLIP_CANDIDATES):
    """make(clip) for the clip of `candidates` whose predictor is sparsest at `target` recall on rows x
    (n, input) with activations act (n, F); ties go to the earlier one."""
    best, best_sp = None, -1.0
    for c in candidates:
        p = make(c)
        sp = threshold_for_target(p.score(x), act, target, metric).percentile
        if sp > best_sp + 1e-4:
            best, best_sp = p, sp
    return best


def qm_arrays(qm: QuantizedMatrix, clip: float | None) -> dict:
    """The stored arrays of a quantized W_hat and its clip (NaN: none)."""
    out = {f"w.{k}": v for k, v in qm.to_arrays().items()}
    out["clip"] = np.array(np.nan if clip is None else clip, np.float64)
    return out


def qm_from_arrays(get) -> tuple:
    """Inverse of `qm_arrays`: (QuantizedMatrix, clip or None)."""
    qm = QuantizedMatrix.from_arrays({k: get(f"w.{k}") for k in ("packed", "scale", "zero", "meta")})
    c = float(get("clip"))
    return qm, None if np.isnan(c) else c


def qm_describe(qm: QuantizedMatrix, clip: float | None) -> str:
    """"2-bit group=64 clip=1.5" and the like."""
    gs = qm.group_size
    return f"{qm.bits}-bit {'per-row' if gs is None else f'group={gs}'}" + ("" if clip is None else f" clip={clip:g}")


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
        return cls(quantize_rows(w_key, bits, group_size, clip), clip)

    @classmethod
    def fit_auto_clip(cls, w_key: np.ndarray, bits: int, group_size: int | None, x: np.ndarray,
                      act: np.ndarray, target: float, metric: str,
                      candidates=CLIP_CANDIDATES) -> "QuantizedPredictor":
        """Fit one predictor per clip candidate and keep the one that is sparsest at `target`
        recall on rows x (n, D) (with act = relu(W_k x)^2 (n, F)); ties go to the earlier one."""
        return sparsest_clip(lambda c: cls.fit(w_key, bits, group_size, c), x, act, target, metric, candidates)

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
        return qm_arrays(self.qm, self.clip)

    @classmethod
    def _from_arrays(cls, get, d, prefix):
        return cls(*qm_from_arrays(get))

    def describe(self) -> str:
        return f"quantized {qm_describe(self.qm, self.clip)}"
