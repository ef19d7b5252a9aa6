"""int4 weights: the quant/q4.py format, the numba_i4dot decode kernels against it, and int4 model files
(convert --dtype int4 / --head-dtype int4) through every backend."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.backends import numba_common as nbc
from rwkv_edge.backends import numba_cpu as nb
from rwkv_edge.backends import numba_i4dot as i4d
from rwkv_edge.backends import numba_i8dot as i8d
from rwkv_edge.config import ModelLoadError
from rwkv_edge.lean import _quantized_sparse
from rwkv_edge.modelfile import convert, load_modelfile, read_header
from rwkv_edge.quant.q4 import (dequantize_q4, error_bound, pack_q4, quantize_activation, quantize_q4,
                                reference_matvec_q4, unpack_q4)

RNG = np.random.default_rng(11)
TOKENS = [5, 17, 200, 3, 99, 42, 7, 250, 0, 1]


def weights(R, C, seed=0):
    w = np.random.default_rng(seed).standard_normal((R, C)).astype(np.float32)
    w[:, :2] *= 6.0                                   # outlier columns, as real weights have
    return w


# --- the format ----------------------------------------------------------------------------------------
def test_layout_low_nibble_column_i_high_nibble_column_i_plus_16():
    codes = np.arange(64, dtype=np.uint8).reshape(1, 64) % 16
    p = pack_q4(codes)
    assert p.shape == (1, 32)
    for g in range(2):
        for i in range(16):
            assert p[0, g * 16 + i] == codes[0, g * 32 + i] | (codes[0, g * 32 + 16 + i] << 4)
    np.testing.assert_array_equal(unpack_q4(p), codes)


def test_round_trip_exact_and_error_bound():
    w = weights(40, 256)
    w[3, 32:64] = 0.0                                 # an all-zero group: scale 0, codes 8
    q, d = quantize_q4(w)
    assert q.dtype == np.uint8 and q.shape == (40, 128) and d.dtype == np.float16 and d.shape == (40, 8)
    assert d[3, 1] == 0 and (unpack_q4(q)[3, 32:64] == 8).all()
    wh = dequantize_q4(q, d)
    err = np.abs(wh - w).reshape(40, 8, 32)
    assert (err <= error_bound(d)[:, :, None]).all()
    assert (err <= np.abs(d.astype(np.float32))[:, :, None] * 0.5 + 1e-6).mean() > 0.95   # mostly half a step
    q2, d2 = quantize_q4(wh)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(d2, d)
    # every group's extreme is code 0 (q = -8): the full range is used
    assert (unpack_q4(q).reshape(40, 8, 32).min(axis=2)[d != 0] == 0).all()


def test_scale_search_never_worse_than_plain():
    w = weights(64, 512, seed=2)
    plain = (dequantize_q4(*quantize_q4(w)) - w).reshape(64, 16, 32)
    found = (dequantize_q4(*quantize_q4(w, search=True)) - w).reshape(64, 16, 32)
    e_plain, e_found = (plain ** 2).sum(2), (found ** 2).sum(2)
    assert (e_found <= e_plain * (1 + 2e-3) + 1e-7).all()            # float16 rounding of the found scale
    assert e_found.sum() < 0.97 * e_plain.sum()


def test_importance_weighted_search():
    """With importance a (C,), the weighted error sum a (w - w_hat)^2 is lower than the unweighted
    search's, and the activation-side error on inputs of that scale drops with it."""
    w = weights(128, 256, seed=4)
    a = np.ones(256, np.float32)
    a[::7] = 50.0                                      # heavy input channels, as RWKV's have
    werr = lambda qd: (a * (dequantize_q4(*qd) - w) ** 2).sum()           # noqa: E731
    plain, weighted = quantize_q4(w, search=True), quantize_q4(w, search=True, importance=a)
    assert werr(weighted) < 0.9 * werr(plain)
    x = RNG.standard_normal((64, 256)).astype(np.float32) * np.sqrt(a)
    oerr = lambda qd: ((x @ (dequantize_q4(*qd) - w).T) ** 2).mean()     # noqa: E731
    assert oerr(weighted) < oerr(plain)
    with pytest.raises(ValueError, match="importance"):
        quantize_q4(w, importance=a[:10])


def test_input_moments_are_the_mean_squares_of_each_input(ckpt):
    """imatrix.input_moments records E[x^2] of the input of each attention / FFN-key / head matrix."""
    from rwkv_edge.imatrix import input_moments
    from rwkv_edge.weights import load_checkpoint

    config, w = load_checkpoint(ckpt)
    seen = {}
    m = rwkv_edge.load_model(ckpt, backend="reference")
    m.hooks.ffn_input.append(lambda i, xk: seen.setdefault(i, []).append(np.asarray(xk, np.float64)))
    m.forward(TOKENS, None, full_output=False)
    mom = input_moments(config, w, TOKENS, ctx=len(TOKENS))
    assert "head.weight" in mom and "blocks.1.att.value.weight" in mom and "blocks.0.ffn.value.weight" not in mom
    xk = np.concatenate(seen[1])
    np.testing.assert_allclose(mom["blocks.1.ffn.key.weight"], (xk ** 2).mean(0), rtol=1e-5)
    assert all(v.shape == (np.shape(w[n])[1],) and (v >= 0).all() for n, v in mom.items())


@pytest.mark.parametrize("bad", [np.zeros((2, 48)), np.zeros(64), np.array([[np.nan] * 32])])
def test_quantize_rejects(bad):
    with pytest.raises(ValueError):
        quantize_q4(bad)


# --- kernels against the numpy reference -----------------------------------------------------------------
@pytest.mark.parametrize("G", [4, 5])
def test_activation_rounding_is_numba_i8dots(G):
    """quantize_x4 rounds as numba_i8dot (and the reference) do, in the pair layout of its docstring."""
    x = RNG.standard_normal(32 * G).astype(np.float32)
    x[64:96] = 0.0
    X, xs, init = np.empty(32 * G, np.int8), np.empty(G, np.float32), np.empty((G, 8), np.int32)
    i4d.quantize_x4(x, X, xs, init)
    xq, xs_ref = quantize_activation(x)
    xq8, xs8 = i8d.reference_quantize(x)
    np.testing.assert_array_equal(xq, xq8)
    np.testing.assert_array_equal(xs_ref, xs8)
    np.testing.assert_array_equal(xs, xs_ref)
    for p in range(G // 2):
        np.testing.assert_array_equal(X[64 * p:64 * p + 32], np.concatenate([xq[2 * p, :16], xq[2 * p + 1, :16]]))
        np.testing.assert_array_equal(X[64 * p + 32:64 * p + 64], np.concatenate([xq[2 * p, 16:], xq[2 * p + 1, 16:]]))
        assert list(init[2 * p]) == [-8 * xq[2 * p].sum(), 0, 0, 0, -8 * xq[2 * p + 1].sum(), 0, 0, 0]
        assert not init[2 * p + 1].any()
    if G % 2:
        np.testing.assert_array_equal(X[-32:], xq[-1])
        assert list(init[-1]) == [-8 * xq[-1].sum()] + [0] * 7


def _rel_tol(q, d, x):
    """float32 accumulation of the exact integer dots: |err| <= 1e-5 * sum_g |d_g xs_g| * sum |u x|."""
    xq, xs = quantize_activation(x)
    codes = unpack_q4(q).astype(np.float64).reshape(q.shape[0], -1, 32) - 8
    mag = (np.abs(codes) * np.abs(xq)[None]).sum(2) * np.abs(d.astype(np.float64)) * xs
    return 1e-5 * mag.sum(1) + 1e-6


def test_loop_kernel_matches_reference():
    """dot1_loops (the path of CPUs without AVX2) computes the reference's math."""
    q, d = quantize_q4(weights(9, 96))
    x = RNG.standard_normal(96).astype(np.float32)
    X, xs, init = np.empty(96, np.int8), np.empty(3, np.float32), np.empty((3, 8), np.int32)
    i4d.quantize_x4(x, X, xs, init)
    got = np.array([i4d.dot1_loops(q, d.view(np.uint16), r, X, xs, init) for r in range(9)])
    want = reference_matvec_q4(q, d, x)
    assert (np.abs(got - want) <= _rel_tol(q, d, x)).all()


@pytest.mark.skipif(not i8d.level(), reason="no AVX2 here: the loop kernel is the only one")
@pytest.mark.parametrize("O, I, T", [(97, 64, 1), (203, 512, 1), (33, 96, 3)])
def test_linear_int4_is_the_quantized_activation_matvec(O, I, T, monkeypatch):
    """Decode mat-vecs of Int4Weight (serial and forced parallel) equal the reference to float rounding,
    and stay close to the float mat-vec of the dequantized weights."""
    W = nb.Int4Weight(*quantize_q4(weights(O, I, seed=O)))
    x = RNG.standard_normal((T, I)).astype(np.float32)
    for par_min in (nbc.PAR_MIN, 0):
        monkeypatch.setattr(nbc, "PAR_MIN", par_min)
        got = nb.linear(x, W)
        for t in range(T):
            want = reference_matvec_q4(W.q, W.scale, x[t])
            assert (np.abs(got[t] - want) <= _rel_tol(W.q, W.scale, x[t])).all()
            exact = W.dequantize().astype(np.float64) @ x[t]
            assert np.abs(want - exact).max() <= 0.02 * np.abs(exact).max()


@pytest.mark.skipif(i8d.level() != "vnni", reason="needs AVX512-VNNI to compare both SIMD kernels")
def test_avx2_kernel_matches_vnni_kernel():
    from numba import njit

    @njit
    def both(A, S, X, xs, init, a, b):
        i4d.dot4_vnni(A, S, 0, 1, 2, 3, X, xs, init, a)
        i4d.dot4_avx2(A, S, 0, 1, 2, 3, X, xs, init, b)

    q, d = quantize_q4(weights(4, 256, seed=5))
    x = RNG.standard_normal(256).astype(np.float32)
    X, xs, init = np.empty(256, np.int8), np.empty(8, np.float32), np.empty((8, 8), np.int32)
    i4d.quantize_x4(x, X, xs, init)
    a, b = np.empty(4, np.float32), np.empty(4, np.float32)
    both(q, d.view(np.uint16), X, xs, init, a, b)
    want = reference_matvec_q4(q, d, x)
    assert (np.abs(a - want) <= _rel_tol(q, d, x)).all() and (np.abs(b - want) <= _rel_tol(q, d, x)).all()


def test_prefill_path_is_the_dequantized_matmul():
    W = nb.Int4Weight(*quantize_q4(weights(70, 128)))
    x = RNG.standard_normal((nbc.SMALL_T + 5, 128)).astype(np.float32)
    np.testing.assert_allclose(nb.linear(x, W), x @ W.dequantize().T, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_bundled_ffn_sparse_and_dense(density):
    F, D = 300, 128
    b = nb.NeuronBundledFFN.from_dense(weights(F, D, 1), weights(D, F, 2) * 0.1, "int4")
    assert b.int4 and b.D == D and b.neuron_bytes == D + 4 * D // 32
    Kd, Vd = b.dequantize()
    np.testing.assert_array_equal(Kd, dequantize_q4(*quantize_q4(weights(F, D, 1), search=True)))
    x = RNG.standard_normal(D).astype(np.float32)
    idx = np.sort(RNG.choice(F, max(1, int(density * F)), replace=False)).astype(np.int32)
    want = i4d.reference_ffn4(b.kv, b.scale, x, idx)
    tol = 2e-5 * np.abs(want).max() + 1e-5
    got = nb.sparse_ffn(x, idx, b)
    assert np.abs(got - want).max() <= tol
    if density == 1.0:
        got = nb.ffn_dense(x[None], b.key, b.value)[0]
        assert np.abs(got - want).max() <= tol
        # prefill (T > SMALL_T): dequantized blocks + BLAS, the float FFN of the dequantized weights
        X = RNG.standard_normal((12, D)).astype(np.float32)
        h = np.maximum(X @ Kd.T, 0) ** 2
        np.testing.assert_allclose(nb.ffn_dense(X, b.key, b.value), h @ Vd.T, rtol=1e-4, atol=1e-3)


# --- model files ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256)


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("i4")
    return {"int4": convert(ckpt, d / "m-int4.rwkve", "int4"),
            "head4": convert(ckpt, d / "m-head4.rwkve", "int8", head_dtype="int4"),
            "int8": convert(ckpt, d / "m-int8.rwkve", "int8")}


def test_int4_file_layout(files, ckpt):
    h = read_header(files["int4"])
    assert h["dtype"] == "int4" and h["int4"]["group"] == 32
    t = {x["name"]: x for x in h["tensors"]}
    assert t["blocks.0.ffn.kv4"]["dtype"] == "uint8" and t["blocks.0.ffn.kv4"]["shape"][1:] == [2, 32]
    assert t["blocks.0.ffn.kv4_scale"]["dtype"] == "float16" and t["blocks.0.ffn.kv4_scale"]["shape"][1:] == [2, 2]
    assert t["head.weight.q4"]["shape"] == [256, 32] and t["head.weight.s4"]["shape"] == [256, 2]
    assert t["blocks.1.att.receptance.weight.q4"]["dtype"] == "uint8"
    assert "emb.weight" in t and not any(n.endswith(".q") for n in t)
    h4 = read_header(files["head4"])
    names = {x["name"] for x in h4["tensors"]}
    assert h4["head_dtype"] == "int4" and "head.weight.q4" in names and "blocks.0.ffn.kv" in names
    assert os.path.getsize(files["int4"]) < 0.75 * os.path.getsize(files["int8"])
    # the reference backend dequantizes to float32: exactly the format's w_hat
    import torch
    w = torch.load(ckpt, map_location="cpu", weights_only=True)
    m = load_modelfile(files["int4"], backend="reference")
    np.testing.assert_array_equal(m.head, dequantize_q4(*quantize_q4(w["head.weight"].float().numpy(), search=True)))


@pytest.mark.parametrize("kind", ["int4", "head4"])
def test_int4_models_numba_vs_reference(files, kind):
    """numba prefill = the reference on the dequantized weights (float rounding); decode (int8-rounded
    activations, fused block kernel) close to prefill; the same top-1 almost everywhere."""
    ref = load_modelfile(files[kind], backend="reference")
    want, _ = ref.forward(TOKENS, full_output=True)
    m = load_modelfile(files[kind])
    got, _ = m.forward(TOKENS, full_output=True)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    s = None
    for tok in TOKENS:
        logits, s = m.step(tok, s)
    assert np.abs(logits - want[-1]).max() <= 3e-2 * np.abs(want).max()
    assert logits.argmax() == want[-1].argmax()


def test_int4_close_to_pth(files, ckpt):
    want, _ = rwkv_edge.load_model(ckpt, backend="reference").forward(TOKENS, full_output=True)
    got, _ = load_modelfile(files["int4"]).forward(TOKENS, full_output=True)
    assert np.abs(got - want).max() <= 0.5 * np.abs(want).std() * 3
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.7


def test_sparse_int4_decode(files):
    """The fused predictor + sparse int4 FFN: with every neuron predicted it is the dense int4 decode;
    with the real threshold it runs on a subset and stays finite."""
    m = load_modelfile(files["int4"])
    sp = _quantized_sparse(m)
    assert all(b.int4 for b in sp.ffn.bundles)
    for p in sp.ffn.fused:
        p.calib.threshold = -np.inf
    s_d = s_s = None
    for tok in TOKENS:
        ld, s_d = m.step(tok, s_d)
        ls, s_s = sp.step(tok, s_s)
    assert np.abs(ls - ld).max() <= 1e-5 * np.abs(ld).max()
    for p in sp.ffn.fused:
        p.calib.threshold = 0.0
    sp.ffn.n_tokens = sp.ffn.n_active = 0
    s_s = None
    for tok in TOKENS:
        ls, s_s = sp.step(tok, s_s)
    assert np.isfinite(ls).all() and 0 < sp.ffn.n_active < sp.ffn.n_tokens * sp.ffn.bundles[0].F


# --- bad input ----------------------------------------------------------------------------------------------
def _cli(*argv):
    r = subprocess.run([sys.executable, "-m", "rwkv_edge.cli", *argv], capture_output=True, text=True, timeout=300)
    return r.returncode, r.stderr.strip()


def test_cli_rejects_int5(ckpt, tmp_path):
    rc, err = _cli("convert", "--model", ckpt, "--out", str(tmp_path / "m.rwkve"), "--dtype", "int5")
    assert rc == 2 and len(err.splitlines()) == 1 and "int5" in err
    assert not (tmp_path / "m.rwkve").exists()


def _rewrite_header(src, dst, edit):
    """Copy model file src to dst with its JSON header changed by edit(header) (same data offsets)."""
    raw = open(src, "rb").read()
    _, _, _, hlen = struct.unpack("<8sIIQ", raw[:24])
    h = json.loads(raw[24:24 + hlen])
    edit(h)
    hb = json.dumps(h, separators=(",", ":")).encode()
    assert len(hb) <= h["data_start"] - 24
    out = raw[:8] + struct.pack("<IIQ", 1, 0, len(hb)) + hb + b"\0" * (h["data_start"] - 24 - len(hb)) + raw[h["data_start"]:]
    open(dst, "wb").write(out)


def test_corrupt_group_table_is_one_line_exit_2(files, tmp_path):
    bad = tmp_path / "bad.rwkve"
    cases = []
    _rewrite_header(files["int4"], bad, lambda h: h["int4"].update(group=16))
    cases.append("header")
    with pytest.raises(ModelLoadError, match="corrupt int4 group table"):
        load_modelfile(bad)
    rc, err = _cli("generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "1")
    assert rc == 2 and len(err.splitlines()) == 1 and "corrupt int4 group table" in err, err

    def shrink(h):          # the table of one tensor claims half its groups
        t = next(x for x in h["tensors"] if x["name"] == "blocks.1.ffn.kv4_scale")
        t["shape"][-1] //= 2
        t["nbytes"] //= 2
    _rewrite_header(files["int4"], bad, shrink)
    with pytest.raises(ModelLoadError, match="corrupt int4 group table for blocks.1.ffn.kv4"):
        load_modelfile(bad)
    # a non-finite scale in the table (bytes of the file itself)
    h = read_header(files["int4"])
    t = next(x for x in h["tensors"] if x["name"] == "head.weight.s4")
    raw = bytearray(open(files["int4"], "rb").read())
    raw[h["data_start"] + t["offset"] + 6: h["data_start"] + t["offset"] + 8] = np.float16(np.inf).tobytes()
    bad.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError, match="non-finite"):
        load_modelfile(bad)
    rc, err = _cli("generate", "--model", str(bad), "--prompt", "hi", "--max-tokens", "1")
    assert rc == 2 and len(err.splitlines()) == 1 and "head.weight.q4" in err, err
