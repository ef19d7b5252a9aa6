"""n-bit affine quantization of 2-D float matrices (1/2/4/8 bits, per-row or per-group).

For every group of ``group_size`` consecutive columns of a row (or the whole row when
``group_size is None``)::

    lo = min(w_g)   (stored as float16: ``zero``)
    scale = (max(w_g) - lo) / (2**bits - 1)   (stored as float16: ``scale``)
    q = clip(round((w - lo) / scale), 0, 2**bits - 1)
    w_hat = lo + scale * q

``lo`` and ``scale`` are rounded to the nearest float16, stepped one ulp (zero down, scale up)
only where that rounding would leave a value more than half a step outside the grid, so
``|w - w_hat| <= scale / 2`` always holds with the stored scale. Codes are computed from the
stored float16 values (the ones dequantize reads), so ``quantize(dequantize(q))`` reproduces
``q``, ``scale`` and ``zero`` exactly whenever each group's codes reach both 0 and 2**bits - 1.
That holds for ordinary weights; it can fail at 8 bits when |lo| is several times the group
range or the step is a float16 subnormal (< 6e-5), where float16 cannot place the grid ends
exactly (the error bound still holds there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .packing import check_bits, pack_bits, packed_cols, unpack_bits

FORMAT_VERSION = 1
_F16_MAX = float(np.finfo(np.float16).max)
_F16_TINY = np.float16(2.0**-24)  # smallest positive (subnormal) float16


def _check_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D matrix (R, C), got an array of shape {w.shape}")
    if w.dtype.kind not in "fiu":
        raise ValueError(f"expected a numeric matrix, got dtype {w.dtype}")
    w = w.astype(np.float32, copy=False)
    if not np.all(np.isfinite(w)):
        raise ValueError("matrix contains NaN or inf; cannot quantize")
    return w


def _n_groups(n_cols: int, group_size: Optional[int]) -> int:
    if group_size is None:
        return 1
    if isinstance(group_size, bool) or int(group_size) != group_size or group_size <= 0:
        raise ValueError(f"group_size must be a positive int or None, got {group_size!r}")
    if n_cols % group_size != 0:
        raise ValueError(
            f"number of columns {n_cols} is not divisible by group_size {group_size}; "
            f"use a group_size that divides {n_cols} or group_size=None (per row)"
        )
    return n_cols // int(group_size)


def _scale16(hi64: np.ndarray, zero: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    scale = (hi64 - zero.astype(np.float64)) / levels
    scale16 = scale.astype(np.float16)
    if not np.all(np.isfinite(scale16)):
        raise ValueError("group range too large for a float16 scale")
    return scale16, scale


def _affine_params(wg: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Float16 (zero, scale) for groups ``wg`` of shape (R, G, gs)."""
    levels = (1 << bits) - 1
    lo = wg.min(axis=2)
    hi = wg.max(axis=2)
    if max(np.abs(lo).max(initial=0.0), np.abs(hi).max(initial=0.0)) > _F16_MAX:
        raise ValueError(f"values exceed the float16 range (|w| > {_F16_MAX}); scale the matrix first")
    lo64, hi64 = lo.astype(np.float64), hi.astype(np.float64)
    # Nearest float16 first: then re-quantizing a dequantized matrix finds the same values.
    zero = lo.astype(np.float16)
    scale16, scale = _scale16(hi64, zero, levels)
    # float16 cannot always hold lo to within half a step (|lo| large against the range):
    # step zero one ulp down so the grid still covers lo, and recompute the scale.
    low = (lo64 - zero.astype(np.float64)) < -0.5 * scale16.astype(np.float64)
    if np.any(low):
        zero = np.where(low, np.nextafter(zero, np.float16(-np.inf)), zero).astype(np.float16)
        scale16, scale = _scale16(hi64, zero, levels)
    # Likewise step the scale one ulp up when rounding left hi more than half a step past
    # the top code (coarse subnormal scales); the one-up neighbour is >= the exact scale.
    pos = scale16 > 0
    ratio = np.divide(hi64 - zero.astype(np.float64), scale16.astype(np.float64),
                      out=np.zeros_like(hi64), where=pos)
    scale16 = np.where(pos & (ratio > levels + 0.5), np.nextafter(scale16, np.float16(np.inf)), scale16)
    # Constant groups (scale 0) get scale 1 so all codes are 0 and w_hat = zero; a tiny
    # positive range that underflows float16 gets the smallest subnormal instead.
    scale16 = np.where(scale > 0, np.maximum(scale16, _F16_TINY), np.float16(1.0)).astype(np.float16)
    return zero, scale16


@dataclass(eq=False)
class QuantizedMatrix:
    """An n-bit affine-quantized matrix of logical shape (R, C).

    Fields:
      bits: 1, 2, 4 or 8.
      group_size: columns per scale/zero group, or None for one group per row.
      shape: (R, C).
      packed: uint8 (R, C*bits/8), codes packed little-endian within each byte.
      scale, zero: float16 (R, G) with G = C // group_size (G = 1 per row).
    ``matvec`` caches the unpacked codes as float32 (R*C*4 bytes, i.e. 32/bits times the
    packed size); call ``clear_cache()`` to free it, or pass ``cache=False``.
    """

    bits: int
    group_size: Optional[int]
    shape: tuple[int, int]
    packed: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    # (G, R, gs) float32 codes, laid out for a stacked matmul against x (G, gs, T).
    _qf: Optional[np.ndarray] = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits)
        if len(self.shape) != 2:
            raise ValueError(f"shape must be (R, C), got {self.shape!r}")
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        n_rows, n_cols = self.shape
        n_groups = _n_groups(n_cols, self.group_size)
        if self.group_size is not None:
            self.group_size = int(self.group_size)
        want = (n_rows, packed_cols(n_cols, self.bits))
        if self.packed.dtype != np.uint8 or self.packed.shape != want:
            raise ValueError(f"packed must be uint8 {want}, got {self.packed.dtype} {self.packed.shape}")
        for name in ("scale", "zero"):
            arr = getattr(self, name)
            if arr.dtype != np.float16 or arr.shape != (n_rows, n_groups):
                raise ValueError(
                    f"{name} must be float16 {(n_rows, n_groups)}, got {arr.dtype} {arr.shape}"
                )

    # -- construction -------------------------------------------------------------------
    @classmethod
    def quantize(cls, w: np.ndarray, bits: int, group_size: Optional[int] = None) -> "QuantizedMatrix":
        """Quantize a float matrix ``w`` (R, C) to ``bits`` bits.

        ``group_size=None`` gives one float16 scale/zero per row; otherwise one per group of
        ``group_size`` consecutive columns (C must be divisible by it). ``C * bits`` must be a
        multiple of 8. Raises ValueError on bad bits, shapes, or non-finite values.
        """
        bits = check_bits(bits)
        w = _check_matrix(w)
        n_rows, n_cols = w.shape
        n_groups = _n_groups(n_cols, group_size)
        packed_cols(n_cols, bits)  # validate packability before doing the work
        gs = n_cols // n_groups if n_groups else 0
        wg = w.reshape(n_rows, n_groups, gs)
        if wg.size == 0:
            zero = np.zeros((n_rows, n_groups), np.float16)
            scale = np.ones((n_rows, n_groups), np.float16)
        else:
            zero, scale = _affine_params(wg, bits)
        q = np.rint((wg - zero.astype(np.float32)[:, :, None]) / scale.astype(np.float32)[:, :, None])
        q = np.clip(q, 0, (1 << bits) - 1).astype(np.uint8).reshape(n_rows, n_cols)
        return cls(bits, group_size, (n_rows, n_cols), pack_bits(q, bits), scale, zero)

    # -- decoding -----------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Number of scale/zero groups per row (1 when per-row)."""
        return self.scale.shape[1]

    @property
    def nbytes(self) -> int:
        """Stored bytes: packed codes + float16 scales + float16 zeros."""
        return int(self.packed.nbytes + self.scale.nbytes + self.zero.nbytes)

    def codes(self) -> np.ndarray:
        """Unpacked integer codes, uint8 (R, C)."""
        return unpack_bits(self.packed, self.bits, self.shape[1])

    def dequantize(self) -> np.ndarray:
        """Reconstructed matrix ``zero + scale * q`` as float32 (R, C)."""
        n_rows, n_cols = self.shape
        g = self.n_groups
        q = self.codes().reshape(n_rows, g, n_cols // g if g else 0).astype(np.float32)
        out = self.zero.astype(np.float32)[:, :, None] + self.scale.astype(np.float32)[:, :, None] * q
        return out.reshape(n_rows, n_cols)

    def _codes_f32(self, cache: bool) -> np.ndarray:
        if self._qf is not None:
            return self._qf
        n_rows, n_cols = self.shape
        g = self.n_groups
        qf = self.codes().astype(np.float32).reshape(n_rows, g, n_cols // g)
        qf = np.ascontiguousarray(qf.transpose(1, 0, 2))  # (G, R, gs)
        if cache:
            self._qf = qf
        return qf

    def clear_cache(self) -> None:
        """Drop the float32 code cache built by :meth:`matvec`."""
        self._qf = None

    def matvec(self, x: np.ndarray, cache: bool = True) -> np.ndarray:
        """``W_hat @ x`` without materialising W_hat.

        ``x`` of shape (C,) gives (R,); ``x`` of shape (T, C) gives (T, R). Uses
        ``W_hat @ x = sum_g scale_g * (q_g @ x_g) + zero_g * sum(x_g)``.
        """
        x = np.asarray(x)
        n_rows, n_cols = self.shape
        single = x.ndim == 1
        if x.ndim not in (1, 2) or x.shape[-1] != n_cols:
            raise ValueError(f"x must have shape ({n_cols},) or (T, {n_cols}), got {x.shape}")
        xt = x.reshape(-1, n_cols).astype(np.float32, copy=False)  # (T, C)
        g = self.n_groups
        qf = self._codes_f32(cache)  # (G, R, gs)
        xg = xt.reshape(xt.shape[0], g, n_cols // g).transpose(1, 2, 0)  # (G, gs, T)
        partial = np.matmul(qf, xg)  # (G, R, T)
        scale = self.scale.astype(np.float32)  # (R, G)
        zero = self.zero.astype(np.float32)  # (R, G)
        xsum = xg.sum(axis=1)  # (G, T)
        y = np.einsum("grt,rg->tr", partial, scale) + (zero @ xsum).T  # (T, R)
        return y[0] if single else y

    # -- slicing and serialisation ------------------------------------------------------
    def rows(self, idx) -> "QuantizedMatrix":
        """A new QuantizedMatrix holding the selected rows (int array, bool mask or slice)."""
        if not isinstance(idx, slice):
            idx = np.asarray(idx)
            if idx.ndim == 0:
                idx = idx.reshape(1)
        packed = np.ascontiguousarray(self.packed[idx])
        return QuantizedMatrix(
            self.bits,
            self.group_size,
            (packed.shape[0], self.shape[1]),
            packed,
            np.ascontiguousarray(self.scale[idx]),
            np.ascontiguousarray(self.zero[idx]),
        )

    def to_arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """Arrays for saving in an .npz: keys ``{prefix}.packed|scale|zero|meta``
        (plain names when ``prefix`` is empty). ``meta`` is int64
        [format_version, bits, group_size or 0, R, C]."""
        meta = np.array(
            [FORMAT_VERSION, self.bits, self.group_size or 0, self.shape[0], self.shape[1]], np.int64
        )
        arrays = {"packed": self.packed, "scale": self.scale, "zero": self.zero, "meta": meta}
        return {_key(prefix, k): v for k, v in arrays.items()}

    @classmethod
    def from_arrays(cls, d, prefix: str = "") -> "QuantizedMatrix":
        """Inverse of :meth:`to_arrays`; ``d`` may be a dict or an opened ``np.load`` file."""
        try:
            meta = np.asarray(d[_key(prefix, "meta")])
            packed, scale, zero = (np.asarray(d[_key(prefix, k)]) for k in ("packed", "scale", "zero"))
        except KeyError as e:
            raise ValueError(f"missing quantized-matrix array {e} (prefix {prefix!r})") from None
        if meta.shape != (5,) or int(meta[0]) != FORMAT_VERSION:
            raise ValueError(f"unsupported quantized-matrix meta {meta.tolist()} (want version {FORMAT_VERSION})")
        _, bits, gs, n_rows, n_cols = (int(v) for v in meta)
        return cls(bits, gs or None, (n_rows, n_cols), packed, scale, zero)


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def quantize(w: np.ndarray, bits: int, group_size: Optional[int] = None) -> QuantizedMatrix:
    """Function form of :meth:`QuantizedMatrix.quantize`."""
    return QuantizedMatrix.quantize(w, bits, group_size)


def dequantize(qm: QuantizedMatrix) -> np.ndarray:
    """Function form of :meth:`QuantizedMatrix.dequantize`: float32 (R, C)."""
    return qm.dequantize()
