"""Group-wise symmetric 4-bit weights (the int4 storage of model files), numpy reference.

Like llama.cpp's Q4_0, but with the scales in a table of their own. For a matrix W (R, C), C a
multiple of GROUP = 32, every group g of 32 consecutive columns of a row has one float16 scale

    m = the value of largest magnitude in the group (signed; the first one on a tie)
    d = float16(m / -8)                       (0 for an all-zero group)
    q = clip(rint(w / d), -8, 7)              (codes; the extreme m maps to -8 exactly)
    w_hat = d * q

Stored as two arrays:
    packed uint8 (R, C/2): byte g*16 + i of a row holds column g*32 + i in its low nibble and column
           g*32 + 16 + i in its high nibble, each as the unsigned code q + 8 (0..15). Low nibbles
           of 16 consecutive bytes are 16 consecutive columns: a SIMD kernel unpacks one group with
           an `and` and a shift, no shuffles.
    scale  float16 (R, C/32): d per group (the "group table").

Error: |w - w_hat| <= |d| / 2 for the codes inside [-8, 7], and |d| / 2 + |d| (rounding of d to
float16 aside) at the clipped top end; `error_bound` gives the per-element bound the tests use.
quantize(dequantize(.)) reproduces packed and scale exactly (the group's extreme is -8 d, so m / -8
gives d back).
"""
from __future__ import annotations

import numpy as np

GROUP = 32
_F16_MAX = float(np.finfo(np.float16).max)


def check_shape(n_cols: int) -> int:
    """Groups per row; ValueError unless n_cols is a positive multiple of GROUP."""
    if n_cols <= 0 or n_cols % GROUP:
        raise ValueError(f"int4 needs rows of a multiple of {GROUP} values, got {n_cols}")
    return n_cols // GROUP


def quantize_q4(w: np.ndarray, search: bool = False, importance: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 (R, C/2), scale float16 (R, C/32)) of w (R, C) float (see the module docstring).
    search: pick each group's scale by least squares instead (see `_search`), with the squared error of
    column c weighted by importance[c] (C,) when given (e.g. the mean square of the input that column
    multiplies); the codes still lie in -8..7 and dequantize the same way, but quantize(dequantize(.))
    is then not exact."""
    w = np.asarray(w)
    if w.ndim != 2 or w.dtype.kind not in "fiu":
        raise ValueError(f"quantize_q4 expects a numeric 2-D matrix (R, C), got {w.dtype} {w.shape}")
    R, C = w.shape
    G = check_shape(C)
    w = w.astype(np.float32, copy=False)
    if not np.all(np.isfinite(w)):
        raise ValueError("quantize_q4: input contains NaN or inf")
    wg = w.reshape(R, G, GROUP)
    pick = np.abs(wg).argmax(axis=2)
    m = np.take_along_axis(wg, pick[:, :, None], axis=2)[:, :, 0]                 # (R, G) signed extreme
    if np.abs(m).max(initial=0.0) / 8 > _F16_MAX:
        raise ValueError("quantize_q4: values too large for a float16 group scale")
    d = (m / np.float32(-8.0)).astype(np.float16)
    if search or importance is not None:
        if importance is not None:
            importance = np.asarray(importance, np.float32)
            if importance.shape != (C,) or not np.all(np.isfinite(importance)) or importance.min() < 0:
                raise ValueError(f"importance must be (C,) = ({C},) finite and >= 0")
            importance = importance.reshape(G, GROUP) + np.float32(1e-12)
        d = _search(wg, m, importance)
    df = d.astype(np.float32)
    safe = np.where(df != 0, df, np.float32(1.0))
    q = np.where(df[:, :, None] != 0, np.clip(np.rint(wg / safe[:, :, None]), -8, 7), 0)
    return pack_q4((q + 8).astype(np.uint8).reshape(R, C)), d


_STEPS = np.arange(-10, 11, dtype=np.float32) * np.float32(0.1)   # candidate divisors -8 + step


def _search(wg: np.ndarray, m: np.ndarray, imp: np.ndarray | None = None, rows: int = 4096) -> np.ndarray:
    """Least-squares group scales (R, G) float16 for groups wg (R, G, 32) with signed extremes m: for
    each divisor k in -8 + {-1.0, ..., 1.0} the codes q = clip(rint(w k / m), -8, 7), then the scale that
    minimises sum a (w - d q)^2 for those codes, d = sum(a w q) / sum(a q q) (a = imp (G, 32) per column,
    or 1); the candidate with the least error wins (k = -8 is the plain scale, so the error is never
    larger than plain's, float16 rounding aside). The idea of llama.cpp's make_qx_quants (with its
    importance matrix); done in row blocks to bound memory."""
    R, G, _ = wg.shape
    out = np.empty((R, G), np.float16)
    a = np.float32(1.0) if imp is None else imp[None]
    for r0 in range(0, R, rows):
        w = wg[r0:r0 + rows]
        mm = m[r0:r0 + rows]
        safe = np.where(mm != 0, mm, np.float32(1.0))
        best_e = np.full(mm.shape, np.inf, np.float32)
        best_d = (mm / np.float32(-8.0)).astype(np.float32)
        aw = a * w
        ww = (aw * w).sum(2)
        for st in _STEPS:
            q = np.clip(np.rint(w * ((np.float32(-8.0) + st) / safe)[:, :, None]), -8, 7)
            wq, qq = (aw * q).sum(2), (a * q * q).sum(2)
            d = np.where(qq > 0, wq / np.where(qq > 0, qq, 1), 0).astype(np.float32)
            e = ww - d * wq                                     # |w - d q|^2 at the optimal d
            take = (e < best_e) & (mm != 0)
            best_e = np.where(take, e, best_e)
            best_d = np.where(take, d, best_d)
        out[r0:r0 + rows] = best_d.astype(np.float16)
    return out


def pack_q4(codes: np.ndarray) -> np.ndarray:
    """uint8 codes (R, C) in 0..15 -> packed uint8 (R, C/2) in the group layout above."""
    R, C = codes.shape
    G = check_shape(C)
    c = codes.reshape(R, G, 2, GROUP // 2).astype(np.uint8)
    return np.ascontiguousarray((c[:, :, 0] | (c[:, :, 1] << 4)).reshape(R, C // 2))


def unpack_q4(packed: np.ndarray) -> np.ndarray:
    """Inverse of pack_q4: uint8 (R, C/2) -> codes uint8 (R, C) in 0..15."""
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"unpack_q4 expects uint8 (R, C/2), got {packed.dtype} {packed.shape}")
    R, H = packed.shape
    G = check_shape(2 * H)
    p = packed.reshape(R, G, 1, GROUP // 2)
    return np.concatenate([p & 15, p >> 4], axis=2).reshape(R, 2 * H)


def dequantize_q4(packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 (R, C) = scale_g * (code - 8)."""
    codes = unpack_q4(packed)
    R, C = codes.shape
    if np.shape(scale) != (R, C // GROUP):
        raise ValueError(f"int4 scale table must be (R, C/32) = {(R, C // GROUP)}, got {np.shape(scale)}")
    q = codes.astype(np.float32).reshape(R, C // GROUP, GROUP) - np.float32(8.0)
    return (q * np.asarray(scale).astype(np.float32)[:, :, None]).reshape(R, C)


def error_bound(scale: np.ndarray) -> np.ndarray:
    """Per-group bound (R, G) on |w - w_hat|: half a step inside the code range, 1.5 steps at the top
    end that rint may clip (7 instead of 8), plus float16 rounding of the scale (8 steps x 2^-11)."""
    d = np.abs(np.asarray(scale, np.float32))
    return d * np.float32(1.5 + 8 * 2.0 ** -11)


def quantize_activation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(xq (G, 32) int64, xs (G,) float32): x rounded to int8 per group of 32, xs = max|x_g| / 127,
    xq = rint(x * (127 / max|x_g|)): the rounding of numba_i8dot.quantize_x (a test checks they agree)."""
    xg = np.asarray(x, np.float32).reshape(-1, GROUP)
    mx = np.abs(xg).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127.0) / mx, np.float32(0.0)).astype(np.float32)
    return np.rint(xg * inv[:, None]).astype(np.int64), (mx / np.float32(127.0)).astype(np.float32)


def reference_matvec_q4(packed: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    """W_hat @ x with x rounded to int8 per group of 32 exactly as the decode kernels round it
    (numba_i8dot.reference_quantize): sum_g d_g xs_g sum_i (code - 8) xq, exact integer dots, float64
    sums. (R,) float32."""
    xq, xs = quantize_activation(x)                                 # (G, 32) int64, (G,) float32
    codes = unpack_q4(packed).astype(np.int64) - 8
    R, C = codes.shape
    dots = np.einsum("rgs,gs->rg", codes.reshape(R, C // GROUP, GROUP), xq)
    return (dots * xs.astype(np.float64) * np.asarray(scale).astype(np.float64)).sum(1).astype(np.float32)
