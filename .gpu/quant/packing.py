"""Bit packing of small unsigned integer codes into uint8 bytes.

Layout: codes are packed along the last (column) axis, little-endian within each byte:
element ``j`` of a byte sits at bit position ``j * bits``. With ``bits=2`` the byte
``0b11_10_01_00`` therefore holds the codes ``[0, 1, 2, 3]``.
"""

from __future__ import annotations

import numpy as np

SUPPORTED_BITS = (1, 2, 4, 8)


def check_bits(bits: int) -> int:
    """Return ``bits`` as int, or raise ValueError if it is not one of 1, 2, 4, 8."""
    if isinstance(bits, bool) or int(bits) != bits or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    return int(bits)


def packed_cols(n_cols: int, bits: int) -> int:
    """Number of bytes per row after packing ``n_cols`` codes of ``bits`` bits each.

    Raises ValueError unless ``n_cols * bits`` is a multiple of 8 (no partial bytes, so the
    packed size is exactly ``n_cols * bits / 8``).
    """
    bits = check_bits(bits)
    if n_cols * bits % 8 != 0:
        raise ValueError(
            f"cannot pack {n_cols} columns at {bits} bits: columns * bits = {n_cols * bits} "
            f"is not a multiple of 8 (need columns divisible by {8 // bits})"
        )
    return n_cols * bits // 8


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes ``q`` (uint8, shape (R, C), values < 2**bits) into uint8 (R, C*bits/8).

    Raises ValueError for a non-2-D input, an unsupported ``bits``, ``C*bits`` not a multiple
    of 8, or codes that do not fit in ``bits`` bits.
    """
    bits = check_bits(bits)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"pack_bits expects a 2-D array (R, C), got shape {q.shape}")
    if q.dtype.kind not in "ui":
        raise ValueError(f"pack_bits expects integer codes, got dtype {q.dtype}")
    n_rows, n_cols = q.shape
    n_bytes = packed_cols(n_cols, bits)
    if q.size and (q.min() < 0 or q.max() >= (1 << bits)):
        raise ValueError(
            f"codes must lie in [0, {(1 << bits) - 1}] for bits={bits}, "
            f"got range [{q.min()}, {q.max()}]"
        )
    q = q.astype(np.uint8, copy=False)
    if bits == 8:
        return np.ascontiguousarray(q).copy()
    per = 8 // bits
    # (R, n_bytes, per): the `per` codes that share one byte, lowest bits first.
    groups = q.reshape(n_rows, n_bytes, per)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    out = np.bitwise_or.reduce(groups << shifts, axis=2)
    return np.ascontiguousarray(out, dtype=np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, n_cols: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: uint8 (R, C*bits/8) -> uint8 codes (R, C)."""
    bits = check_bits(bits)
    packed = np.asarray(packed)
    if packed.ndim != 2:
        raise ValueError(f"unpack_bits expects a 2-D array (R, B), got shape {packed.shape}")
    if packed.dtype != np.uint8:
        raise ValueError(f"unpack_bits expects uint8 bytes, got dtype {packed.dtype}")
    n_bytes = packed_cols(n_cols, bits)
    if packed.shape[1] != n_bytes:
        raise ValueError(
            f"packed array has {packed.shape[1]} bytes per row, expected {n_bytes} "
            f"for {n_cols} columns at {bits} bits"
        )
    if bits == 8:
        return packed.copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint8) * bits).astype(np.uint8)
    # (R, n_bytes, 1) >> (per,) -> (R, n_bytes, per) -> (R, C)
    codes = (packed[:, :, None] >> shifts) & mask
    return codes.reshape(packed.shape[0], n_cols)
