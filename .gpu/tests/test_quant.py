"""Tests for the quant package: bit packing, affine n-bit formats, int8 rows."""

import numpy as np
import pytest

from rwkv_edge.quant import (
    QuantizedMatrix,
    dequantize_int8_rows,
    pack_bits,
    quantize,
    quantize_int8_rows,
    unpack_bits,
)

BITS = [1, 2, 4, 8]
GROUPS = [None, 64]
R, C = 24, 256


def _gauss(seed=0, shape=(R, C)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(7, 48), dtype=np.uint8)
    packed = pack_bits(q, bits)
    assert packed.dtype == np.uint8
    assert packed.shape == (7, 48 * bits // 8)
    assert packed.nbytes == 7 * 48 * bits // 8
    np.testing.assert_array_equal(unpack_bits(packed, bits, 48), q)


def test_pack_layout_little_endian():
    # codes [0,1,2,3] at 2 bits -> 0b11_10_01_00; element j at bit j*bits.
    q = np.array([[0, 1, 2, 3]], np.uint8)
    assert pack_bits(q, 2)[0, 0] == 0b11100100
    assert pack_bits(np.array([[1, 0, 0, 0, 0, 0, 0, 1]], np.uint8), 1)[0, 0] == 0b10000001
    assert pack_bits(np.array([[0xA, 0x3]], np.uint8), 4)[0, 0] == 0x3A


def test_pack_rejects_bad_inputs():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_bits(np.zeros((2, 3), np.uint8), 2)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_bits(np.full((1, 4), 4, np.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(np.zeros((1, 8), np.uint8), 3)
    with pytest.raises(ValueError, match="expected 2 for 8 columns"):
        unpack_bits(np.zeros((1, 3), np.uint8), 2, 8)


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_error_within_half_scale(bits, group_size):
    w = _gauss(bits) * 3.0 + 0.5
    qm = quantize(w, bits, group_size)
    err = np.abs(qm.dequantize() - w)  # (R, C)
    gs = C if group_size is None else group_size
    scale = np.repeat(qm.scale.astype(np.float32), gs, axis=1)  # (R, C)
    assert np.all(err <= scale / 2 * (1 + 1e-3) + 1e-6), float((err - scale / 2).max())
    assert qm.scale.dtype == np.float16 and qm.zero.dtype == np.float16
    assert qm.scale.shape == (R, C // gs)


@pytest.mark.parametrize("group_size", GROUPS)
def test_error_decreases_with_bits(group_size):
    w = _gauss(1)
    errs = [np.abs(quantize(w, b, group_size).dequantize() - w).mean() for b in BITS]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    # 8-bit should be very close (range ~8 sigma / 255 levels)
    assert errs[-1] < 0.02


def test_groups_beat_rows():
    w = _gauss(2)
    e_row = np.abs(quantize(w, 2).dequantize() - w).mean()
    e_grp = np.abs(quantize(w, 2, 64).dequantize() - w).mean()
    assert e_grp < e_row


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_requantize_exact(bits, group_size):
    qm = quantize(_gauss(3 + bits), bits, group_size)
    qm2 = quantize(qm.dequantize(), bits, group_size)
    np.testing.assert_array_equal(qm2.codes(), qm.codes())
    np.testing.assert_array_equal(qm2.scale, qm.scale)
    np.testing.assert_array_equal(qm2.zero, qm.zero)
    np.testing.assert_array_equal(qm2.dequantize(), qm.dequantize())


@pytest.mark.parametrize("bits", BITS)
def test_error_bound_with_large_offset(bits):
    # |lo| >> group range: float16 cannot hold lo to half a step, zero must be nudged down.
    w = _gauss(8 + bits) * 0.05 + 40.0
    qm = quantize(w, bits, 64)
    scale = np.repeat(qm.scale.astype(np.float32), 64, axis=1)
    err = np.abs(qm.dequantize() - w)
    assert np.all(err <= scale / 2 * (1 + 1e-3) + 1e-5), float((err - scale / 2).max())


def test_constant_rows_and_groups():
    w = np.zeros((3, 64), np.float32)
    w[1] = 2.5
    w[2, :32] = -1.0
    qm = quantize(w, 4, 32)
    np.testing.assert_allclose(qm.dequantize(), w, atol=1e-3)
    np.testing.assert_array_equal(quantize(qm.dequantize(), 4, 32).codes(), qm.codes())


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_matvec_matches_dense(bits, group_size):
    rng = np.random.default_rng(10 + bits)
    qm = quantize(_gauss(bits), bits, group_size)
    dense = qm.dequantize().astype(np.float64)
    x = rng.standard_normal(C).astype(np.float32)
    xb = rng.standard_normal((5, C)).astype(np.float32)
    y = qm.matvec(x)
    yb = qm.matvec(xb)
    assert y.shape == (R,) and yb.shape == (5, R)
    ref, refb = dense @ x, xb @ dense.T
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()
    assert np.abs(yb - refb).max() <= 1e-4 * np.abs(refb).max()
    # the cached and uncached paths agree
    qm.clear_cache()
    np.testing.assert_allclose(qm.matvec(x, cache=False), y, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x must have shape"):
        qm.matvec(np.zeros(C + 1, np.float32))


@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_nbytes(bits, group_size):
    qm = quantize(_gauss(), bits, group_size)
    n_groups = 1 if group_size is None else C // group_size
    assert qm.nbytes == R * C * bits // 8 + R * n_groups * 2 + R * n_groups * 2
    assert qm.packed.nbytes == R * C * bits // 8


@pytest.mark.parametrize("group_size", GROUPS)
def test_arrays_round_trip(group_size, tmp_path):
    qm = quantize(_gauss(5), 2, group_size)
    d = qm.to_arrays("layer0.wk")
    assert set(d) == {"layer0.wk.packed", "layer0.wk.scale", "layer0.wk.zero", "layer0.wk.meta"}
    path = tmp_path / "b.npz"
    np.savez(path, **d, other=np.zeros(3))
    with np.load(path) as f:
        qm2 = QuantizedMatrix.from_arrays(f, "layer0.wk")
    assert (qm2.bits, qm2.group_size, qm2.shape) == (qm.bits, qm.group_size, qm.shape)
    np.testing.assert_array_equal(qm2.dequantize(), qm.dequantize())
    with pytest.raises(ValueError, match="missing"):
        QuantizedMatrix.from_arrays(d, "layer1.wk")


def test_rows_selection():
    qm = quantize(_gauss(6), 4, 64)
    full = qm.dequantize()
    idx = np.array([5, 0, 17, 17])
    sub = qm.rows(idx)
    assert sub.shape == (4, C)
    np.testing.assert_array_equal(sub.dequantize(), full[idx])
    mask = np.zeros(R, bool)
    mask[[1, 3]] = True
    np.testing.assert_array_equal(qm.rows(mask).dequantize(), full[mask])
    np.testing.assert_array_equal(qm.rows(slice(2, 6)).dequantize(), full[2:6])
    np.testing.assert_array_equal(qm.rows(3).dequantize(), full[3:4])
    x = np.random.default_rng(0).standard_normal(C).astype(np.float32)
    np.testing.assert_allclose(sub.matvec(x), qm.matvec(x)[idx], rtol=1e-5, atol=1e-5)


def test_int8_rows():
    w = _gauss(7) * 2.0
    w[3] = 0.0
    q, scale = quantize_int8_rows(w)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (R,)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert np.abs(q).max() == 127
    err = np.abs(dequantize_int8_rows(q, scale) - w)
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7)
    assert np.all(q[3] == 0) and scale[3] == 0
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_rows(np.zeros(5, np.float32))


def test_bad_inputs_raise_helpful_errors():
    w = _gauss()
    with pytest.raises(ValueError, match=r"bits must be one of \(1, 2, 4, 8\), got 3"):
        quantize(w, 3)
    with pytest.raises(ValueError, match="not divisible by group_size 100"):
        quantize(w, 4, 100)
    with pytest.raises(ValueError, match="2-D matrix"):
        quantize(np.zeros((2, 3, 8), np.float32), 4)
    with pytest.raises(ValueError, match="2-D matrix"):
        quantize(np.zeros(16, np.float32), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        quantize(np.zeros((2, 6), np.float32), 1)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(np.full((2, 8), np.nan, np.float32), 8)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        quantize(w, 4, 0)
