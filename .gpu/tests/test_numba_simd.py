"""numba_simd: the AVX2 int8 predictor kernels against their numpy reference and the float matvec."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_edge.quant import QuantizedMatrix
from rwkv_edge.backends import numba_simd as ns

pytestmark = pytest.mark.skipif(not ns.available(), reason="numba_simd needs x86-64 with AVX2 (+F16C)")

SHAPES = [(2048, 512, 64), (131, 64, 32), (37, 128, 16), (8, 256, None), (100, 96, 32), (33, 512, 128)]


def _qm(R, C, bits, gs, seed=0, random_params=True):
    """A QuantizedMatrix with random codes and (optionally) random float16 scales and zero points,
    so that nothing depends on how `quantize` chose them."""
    rng = np.random.default_rng(seed)
    qm = QuantizedMatrix.quantize(rng.standard_normal((R, C)).astype(np.float32), bits, gs)
    if random_params:
        G = qm.n_groups
        codes = rng.integers(0, 1 << bits, (R, C), dtype=np.uint8)
        from rwkv_edge.quant import pack_bits
        qm.packed = pack_bits(codes, bits)
        qm.scale = rng.uniform(0.01, 0.5, (R, G)).astype(np.float16)
        qm.zero = rng.uniform(-2.0, 1.0, (R, G)).astype(np.float16)
    return qm


def _x(C, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(C).astype(np.float32)
    x[::7] *= 6.0                           # a few outliers, like real activations
    return x


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("R,C,gs", SHAPES)
def test_kernel_matches_integer_reference(bits, R, C, gs):
    qm = _qm(R, C, bits, gs, seed=R + C)
    assert ns.supports(qm)
    for seed in range(3):
        x = _x(C, seed)
        got, want = ns.quant_matvec_i8(qm, x), ns.reference_scores(qm, x)
        assert got.shape == (R,) and got.dtype == np.float32
        # identical integer dot products; only the float epilogue's rounding differs
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_zero_and_constant_x():
    qm = _qm(70, 128, 2, 32)
    x = np.zeros(128, np.float32)
    np.testing.assert_array_equal(ns.quant_matvec_i8(qm, x), 0.0)
    x[64:] = 3.0                           # group 0 all zero (xs = 0), the others constant
    np.testing.assert_allclose(ns.quant_matvec_i8(qm, x), qm.matvec(x), rtol=1e-5, atol=1e-4)


def _rounding_sigma(qm, x):
    """Standard deviation of the score error if the rounding residuals xs_g * xq - x are independent
    and uniform on [-xs_g/2, xs_g/2]: sqrt(sum_g xs_g^2 / 12 * sum_c scale^2 (code_c - mid)^2)."""
    R, C = qm.shape
    xs = ns.quantize_x(x, qm.n_groups, qm.bits)[1].astype(np.float64)
    dev = (qm.codes().astype(np.float64) - ((1 << qm.bits) - 1) / 2).reshape(R, qm.n_groups, -1)
    return np.sqrt((qm.scale.astype(np.float64) ** 2 * (dev ** 2).sum(2) * xs ** 2 / 12).sum(1))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("R,C,gs", [(2048, 512, 64), (131, 64, 32), (8, 256, None)])
def test_close_to_float_matvec(bits, R, C, gs):
    """The only approximation is rounding x to int8 per group: |xs*xq - x| <= xs/2 per element, so
    |score - float score| <= error_bound = sum_g scale * xs_g/2 * sum_c |code_c - mid| per row (hard
    bound, plus float rounding). The residuals behave like independent uniform noise, so the error
    is also within 6 sigma of that model (observed: <= 3.3 sigma over 2048 rows)."""
    qm = QuantizedMatrix.quantize(np.random.default_rng(5).standard_normal((R, C)).astype(np.float32), bits, gs)
    for seed in range(3):
        x = _x(C, seed)
        got, exact = ns.quant_matvec_i8(qm, x), qm.matvec(x).astype(np.float64)
        err, fl = np.abs(got - exact), 1e-5 * np.abs(exact).max()
        assert np.all(err <= ns.error_bound(qm, x) + fl)
        assert np.all(err <= 6 * _rounding_sigma(qm, x) + fl)
        assert err.max() <= 3e-2 * np.abs(exact).max()   # observed <= 2.6% with outliers in x


def test_select_matches_nonzero():
    qm = _qm(300, 512, 2, 64, random_params=False)
    idx = np.full(310, -1, np.int32)
    for seed, thr in ((0, 0.0), (1, -1.5), (2, 3.0), (3, 1e9)):
        x = _x(512, seed)
        scores = ns.quant_matvec_i8(qm, x)
        n = ns.quant_select_i8(qm, x, thr, idx)
        want = np.nonzero(scores >= np.float32(thr))[0]
        assert n == len(want)
        np.testing.assert_array_equal(idx[:n], want)


def test_layout_cached_and_rebuilt():
    qm = _qm(64, 128, 4, 32)
    x = _x(128)
    ns.quant_matvec_i8(qm, x)
    lay = qm.__dict__["_simd_layout"]
    ns.quant_matvec_i8(qm, x)
    assert qm.__dict__["_simd_layout"] is lay
    other = _qm(64, 128, 4, 32, seed=9)
    qm.packed = other.packed                # replaced codes: the layout must follow
    got = ns.quant_matvec_i8(qm, x)
    assert qm.__dict__["_simd_layout"] is not lay
    np.testing.assert_allclose(got, ns.reference_scores(qm, x), rtol=1e-5, atol=1e-5 * np.abs(got).max())
    qm.scale = other.scale
    np.testing.assert_allclose(ns.quant_matvec_i8(qm, x), ns.reference_scores(qm, x), rtol=1e-5, atol=1e-4)


def test_parallel_and_njit_core():
    qm = _qm(1000, 512, 2, 64)
    x = _x(512)
    want = ns.quant_matvec_i8(qm, x)
    np.testing.assert_array_equal(ns.quant_matvec_i8(qm, x, nchunk=3), want)
    P, S, Z = ns.simd_layout(qm)
    y = np.empty(P.shape[0] * ns.L, np.float32)
    ns.scores_i8(P, S, Z, x, 2, y, 1)
    np.testing.assert_array_equal(y[:1000], want)
    np.testing.assert_array_equal(y[1000:], 0.0)          # padding rows score 0
    out = np.empty(1000, np.float32)
    assert ns.quant_matvec_i8(qm, x, out=out) is out


def test_supports():
    assert not ns.supports(QuantizedMatrix.quantize(np.ones((4, 64), np.float32), 8, 32))
    assert not ns.supports(QuantizedMatrix.quantize(np.ones((4, 64), np.float32), 2, 8))   # 2-byte groups
    assert ns.supports(QuantizedMatrix.quantize(np.ones((4, 64), np.float32), 4, 8))
    with pytest.raises(ValueError):
        ns.quant_matvec_i8(QuantizedMatrix.quantize(np.ones((4, 64), np.float32), 1, 32), np.ones(64))
