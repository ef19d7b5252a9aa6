"""Symmetric int8 per-row quantization used for dense weight storage."""

from __future__ import annotations

import numpy as np


def quantize_int8_rows(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize ``w`` (R, C) to int8 codes with one symmetric float32 scale per row.

    ``scale[r] = max|w[r]| / 127`` and ``q = round(w / scale)`` in [-127, 127]; the
    reconstruction error is at most ``scale[r] / 2`` per element. All-zero rows get
    ``scale = 0`` and codes 0. Returns ``(q int8 (R, C), scale float32 (R,))``.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"quantize_int8_rows expects a 2-D array (R, C), got shape {w.shape}")
    if w.dtype.kind not in "fiu":
        raise ValueError(f"quantize_int8_rows expects a numeric array, got dtype {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize_int8_rows: input contains NaN or inf")
    scale = (np.abs(w).max(axis=1) / np.float32(127.0)).astype(np.float32) if w.shape[1] else (
        np.zeros(w.shape[0], np.float32))
    # zero rows: divide by 1 so codes are 0 instead of NaN; the stored scale stays 0.
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(w / safe[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8_rows(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Inverse of :func:`quantize_int8_rows`: int8 (R, C), float32 (R,) -> float32 (R, C)."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    if q.ndim != 2 or scale.shape != (q.shape[0],):
        raise ValueError(
            f"dequantize_int8_rows expects q (R, C) and scale (R,), got {q.shape} and {scale.shape}"
        )
    return q.astype(np.float32) * scale[:, None]
