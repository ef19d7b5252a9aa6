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
    assert corr == 0.0 and i8d.quantize_x(x, X, xs, False) == 0.0   # VNNI's offset is taken off in integers


@pytest.mark.skipif(i8d.level() != "vnni", reason="no AVX-512 VNNI here")
def test_vnni_dots_equal_avx2_bit_for_bit():
    """The VNNI kernel's i32 lanes are AVX2's (its u8 offset starts each accumulator negated), so the
    float results are identical; a float correction after the sum would differ by ~1e-7 of the
    offset products, i.e. by ~1e-3 relative on rows whose dot is small."""
    from numba import njit

    @njit
    def run(A, X, xs, vnni):
        out = np.empty((A.shape[0] // 4, 4), np.float32)
        for p in range(A.shape[0] // 4):
            if vnni:
                i8d.dot4_vnni(A, 4 * p, 4 * p + 1, 4 * p + 2, 4 * p + 3, X, xs, np.float32(0.0), out[p])
            else:
                i8d.dot4_avx2(A, 4 * p, 4 * p + 1, 4 * p + 2, 4 * p + 3, X, xs, np.float32(0.0), out[p])
        return out
    Wi = rand_int8(64, 512)
    x = RNG.standard_normal(512).astype(np.float32) * 30
    X, xs = np.empty(512, np.int8), np.empty(16, np.float32)
    i8d.quantize_x(x, X, xs, True)
    a, b = run(Wi.q, X, xs, True), run(Wi.q, X, xs, False)
    assert np.array_equal(a, b)
    xq, xs_ref = i8d.reference_quantize(x)
    want = ((Wi.q.astype(np.int64).reshape(64, 16, 32) * xq[None]).sum(-1) * xs_ref).sum(-1)
    np.testing.assert_allclose(a.reshape(-1), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


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
