"""numba_i8dot (integer dot products of the int8 decode mat-vecs) vs its numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_edge.backends import numba_common as nbc
from rwkv_edge.backends import numba_cpu as nb
from rwkv_edge.backends import numba_i8dot as i8d

RNG = np.random.default_rng(3)
needs_simd = pytest.mark.skipif(not i8d.level(), reason="no AVX2 here: int8 mat-vecs use the float kernels")


def rand_int8(O, I):
    W = RNG.standard_normal((O, I)).astype(np.float32)
    W[:, :3] *= 20.0                                  # outlier columns, as real weights have
    return nb.Int8Weight.from_float(W)


def test_quantize_x_matches_reference():
    x = RNG.standard_normal(128).astype(np.float32)
    x[32:64] = 0.0                                    # an all-zero group: scale 0, codes 0
    X, xs = np.empty(128, np.int8), np.empty(4, np.float32)
    corr = i8d.quantize_x(x, X, xs, True)
    xq, xs_ref = i8d.reference_quantize(x)
    np.testing.assert_array_equal(X, xq.reshape(-1))
    np.testing.assert_array_equal(xs, xs_ref)
    assert xs[1] == 0 and not X[32:64].any() and np.abs(X).max() == 127
    assert abs(corr - (xs_ref.astype(np.float64) * 128 * xq.sum(1)).sum()) <= 1e-5 * max(1.0, abs(corr))
    assert i8d.quantize_x(x, X, xs, False) == 0.0


def test_loop_fallback_matches_reference():
    """The plain-loop dot4 (the path of CPUs without AVX2) computes the reference's math."""
    Wi = rand_int8(9, 96)
    x = RNG.standard_normal(96).astype(np.float32)
    X, xs = np.empty(96, np.int8), np.empty(3, np.float32)
    i8d.quantize_x(x, X, xs, False)
    out = np.empty(4, np.float32)
    i8d._dot4_loops(Wi.q, 0, 3, 5, 8, X, xs, np.float32(0.0), out)
    want = i8d.reference_matvec(Wi.q, np.ones(9, np.float32), x)[[0, 3, 5, 8]]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


@needs_simd
@pytest.mark.parametrize("O, I, T", [(97, 64, 1), (203, 512, 1), (33, 96, 3)])
def test_linear_int8_is_the_quantized_activation_matvec(O, I, T, monkeypatch):
    """Decode mat-vecs of Int8Weight (serial, and forced parallel) equal the reference of the same
    math to float rounding, and stay within the activation-rounding bound of the float mat-vec."""
    Wi = rand_int8(O, I)
    x = RNG.standard_normal((T, I)).astype(np.float32)
    for par_min in (nbc.PAR_MIN, 0):
        monkeypatch.setattr(nbc, "PAR_MIN", par_min)
        got = nb.linear(x, Wi)
        for t in range(T):
            want = i8d.reference_matvec(Wi.q, Wi.scale, x[t])
            np.testing.assert_allclose(got[t], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
            exact = Wi.dequantize().astype(np.float64) @ x[t]
            bound = i8d.error_bound(Wi.q, Wi.scale, x[t])
            assert (np.abs(got[t] - exact) <= bound + 1e-5 * np.abs(exact).max()).all()
            assert np.abs(got[t] - exact).max() > 0       # it really rounded x (else this tests nothing)


@needs_simd
def test_int8_bundle_keys_use_quantized_activations():
    """Dense and sparse FFN over an int8 bundle: keys from the integer dot products."""
    F, D = 150, 64
    K = RNG.standard_normal((F, D)).astype(np.float32)
    V = (RNG.standard_normal((D, F)) * 0.1).astype(np.float32)
    b = nb.NeuronBundledFFN.from_dense(K, V, "int8")
    x = RNG.standard_normal(D).astype(np.float32)
    a = i8d.reference_matvec(np.ascontiguousarray(b.kv[:, 0]), b.scale[:, 0], x).astype(np.float64)
    h = np.maximum(a, 0) ** 2 * b.scale[:, 1]
    Vq = b.kv[:, 1].astype(np.float64)
    want = h @ Vq
    dense = nb.ffn_dense(x[None], b.key, b.value)[0]
    np.testing.assert_allclose(dense, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for n in (0, 1, 5, 37, F):
        idx = np.sort(RNG.choice(F, n, replace=False)).astype(np.int32)
        got = nb.sparse_ffn(x, idx, b)
        np.testing.assert_allclose(got, h[idx] @ Vq[idx], rtol=1e-4, atol=1e-4 * max(np.abs(want).max(), 1e-6))
