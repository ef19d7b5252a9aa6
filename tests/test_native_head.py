"""The native backend's rescored head (csrc/nk_head.c, backends/native_head.py) against its numpy
reference: every logit from a 4-bit copy of the int8 head, each position's top K (by those logits)
from the int8 rows.

The reference is composed from two plain native models on the same weights, one with the int8 head
(z8) and one with the derived 4-bit head alone (z4): `rescore_reference(z4, z8, K)`. The body is the
same C code in all three, so a decode step must match bit for bit; a prefill of several tokens runs
the head's int8 rows through the one-token dot (the plain head through the multi-token one), which
sums in another float order: there the bound is 1e-5 relative. The whole model against the float
reference is covered by test_native.py / test_native_int4.py (int8 and int4 heads)."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_edge.backends import native
from rwkv_edge.backends.native_head import derive_q4, rescore_reference, top_rows
from rwkv_edge.config import ModelLoadError
from rwkv_edge.modelfile import convert

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native backend: {native.available()[1]}")


@pytest.fixture(scope="module")
def int8_file(tiny_ckpt, tmp_path_factory):
    """A random 2-layer RWKV-7 (D 64, F 256, vocab 256) as an int8 model file."""
    return str(convert(tiny_ckpt("x070"), tmp_path_factory.mktemp("nhead") / "tiny-int8.rwkve", "int8"))


def _int4_head_model(m, q4=None, s4=None):
    """A plain native model on m's weights with only the 4-bit head copy (what z4 is)."""
    t = dict(m._t)
    d4 = derive_q4(t) if q4 is None else (q4, s4)
    del t["head.weight.q"], t["head.weight.scale"]
    t["head.weight.q4"], t["head.weight.s4"] = d4
    return native.NativeRWKV7(m.config, t, m.fingerprint)


def _toks(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


def test_top_rows_ties_in_index_order():
    z = np.array([0.5, 2.0, 1.0, 1.0, 3.0, 1.0, -1.0], np.float32)
    assert top_rows(z, 2).tolist() == [4, 1]                 # above tau (2.0) first, then the tie
    assert top_rows(z, 3).tolist() == [1, 4, 2]              # tau = 1.0: the first tie by index
    assert top_rows(z, 4).tolist() == [1, 4, 2, 3]
    assert sorted(top_rows(z, 99).tolist()) == list(range(7))


def test_top_rows_kernels_match_reference():
    """The C select and its 16-lane twin pick exactly native_head.top_rows's rows (order included) on
    random logits, many ties, +0 / -0 together, and a strided sample that misleads the threshold."""
    from rwkv_edge.backends.native_lib import kernel_top_rows
    rng = np.random.default_rng(0)
    V = 4096
    cases = [rng.standard_normal(V).astype(np.float32),
             rng.integers(-3, 4, V).astype(np.float32),                       # seven values: ties everywhere
             np.where(rng.random(V) < 0.5, -0.0, 0.0).astype(np.float32)]
    mis = np.full(V, -5.0, np.float32)
    mis[::8] = 10.0                                                          # the sample sees only these
    cases.append(mis)
    odd = rng.standard_normal(V + 48).astype(np.float32)                     # 518 samples: a tail past 16 lanes
    cases.append(odd)
    for z in cases:
        for K in (1, 7, 100, 511, 600, 1024):
            want = top_rows(z, K)
            assert np.array_equal(kernel_top_rows(z, K, fast=False), want), K
            got = kernel_top_rows(z, K, fast=True)
            if got is not None:
                assert np.array_equal(got, want), K


@pytest.mark.parametrize("K", [1, 24, 64, 200, 300])   # 24: the sampled threshold path; 200: every row a candidate
def test_steps_match_reference_bitwise(int8_file, K):
    m = native.NativeRWKV7.open(int8_file)
    r, m4 = m.with_head_rescore(K), _int4_head_model(m)
    s8 = s4 = sr = None
    changed = 0
    for tok in _toks(12, seed=K):
        z8, s8 = m.step(tok, s8)
        z4, s4 = m4.step(tok, s4)
        zr, sr = r.step(tok, sr)
        want = rescore_reference(z4, z8, K)[0]
        assert np.array_equal(zr, want), f"K={K}: max diff {np.abs(zr - want).max()}"
        changed += int(np.sum(zr != z4))
    assert changed > 0                                       # the int8 rows did replace int4 logits


def test_prefill_matches_reference(int8_file):
    m = native.NativeRWKV7.open(int8_file)
    r, m4 = m.with_head_rescore(32), _int4_head_model(m)
    toks = _toks(70, seed=3)                                 # two prefill chunks (64 + 6)
    z8, _ = m.forward(toks, full_output=True)
    z4, _ = m4.forward(toks, full_output=True)
    zr, st = r.forward(toks, full_output=True)
    want = rescore_reference(z4, z8, 32)
    np.testing.assert_allclose(zr, want, rtol=1e-5, atol=1e-5)
    last, _ = r.forward(toks)
    np.testing.assert_allclose(last, want[-1], rtol=1e-5, atol=1e-5)


def test_all_ties_take_the_first_rows(int8_file):
    """Every 4-bit row equal: all z4 tie, so the rows rescored are 0..K-1 (the tie order of the C select)."""
    m = native.NativeRWKV7.open(int8_file)
    q4, s4 = derive_q4(m._t)
    q4[:], s4[:] = q4[5], s4[5]
    t = dict(m._t, **{"head.weight.q4": q4, "head.weight.s4": s4})
    r = native.NativeRWKV7(m.config, t, m.fingerprint, head_rescore=40)
    z8, _ = m.step(7)
    z4, _ = _int4_head_model(m, q4, s4).step(7)
    zr, _ = r.step(7)
    assert np.all(z4 == z4[0])
    np.testing.assert_array_equal(zr[:40], z8[:40])
    np.testing.assert_array_equal(zr[40:], z4[40:])


def test_threads_and_bytes(int8_file):
    """Two threads give the one-thread logits; the bytes counted a token drop by the head's saving."""
    m = native.NativeRWKV7.open(int8_file)
    r1 = m.with_head_rescore(16)
    r2 = native.NativeRWKV7(m.config, r1._t, m.fingerprint, threads=2, head_rescore=16)
    toks = _toks(9, seed=5)
    a, _ = r1.forward(toks)
    b, _ = r2.forward(toks)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    plain = native.NativeRWKV7.open(int8_file)
    b0, p0 = r1.bytes_read, plain.bytes_read
    r1.forward([3])
    plain.forward([3])
    V, D = m.config.vocab_size, m.config.n_embd            # the head: V (D / 2 + D / 16) + 16 (D + 4), not V (D + 4)
    assert (plain.bytes_read - p0) - (r1.bytes_read - b0) == V * (D + 4) - V * (D // 2 + D // 16) - 16 * (D + 4)


def test_bad_input(int8_file, tmp_path):
    m = native.NativeRWKV7.open(int8_file)
    with pytest.raises(ValueError, match=">= 0"):
        m.with_head_rescore(-1)
    m4 = _int4_head_model(m)
    with pytest.raises(ModelLoadError, match="int8 head"):
        m4.with_head_rescore(8)
