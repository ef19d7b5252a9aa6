"""The native backend's every-row dense FFN (`NativeRWKV7(..., ffn="dense")`, csrc/nk_dense.c) against the
numpy reference.

The reference: test_native's quantizing reference (models/v7.py on the numpy backend, every mat-vec over
n_embd inputs with its activation rounded to int8 per 32 as the kernels round it) with the FFN core
replaced by the dense FFN's math in numpy (`_dense_ffn`): every key, then the value mat-vec with the
activation rounded to int8 per 32 neurons --
  int8 file: a_i = relu(k_i)^2 s_v,i rounded, times the int8 value codes q_i,d;
  int4 file: per output group g of 32 outputs a_g,i = relu(k_i)^2 d_i,g rounded, times (u_i,d - 8).
What remains is float32 summation order (and the rare activation on a rounding boundary: test_native's
`_close` / `_synced` bounds). The exact FFN (the default) does not round the values' activation: it is
measurably off this reference, so a dense model that silently ran exact fails here."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from rwkv_edge.backends import native
from rwkv_edge.modelfile import convert, load_modelfile, open_tensors
from rwkv_edge.quant.q4 import unpack_q4
from test_native import _bundle, _close, _quantize, _quantizing_reference, _rel, _synced, _toks

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native backend: {native.available()[1]}")
KINDS = [("int8", None), ("int4", "int8")]


def kernel_dense_ffn(model, layer: int, xk: np.ndarray):
    """(A (T, F), y (T, D)) of a dense-mode NativeRWKV7's FFN core of `layer` on xk (T, D), T <= 64 (for tests):
    A its activations (int8 files relu(k s_k)^2 s_v, int4 relu(k)^2), y its output (csrc/nk_dense.c)."""
    lib = model._lib
    f = lib.nk_test_dense_ffn
    f.restype, f.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                                           ctypes.c_void_p, ctypes.c_void_p]
    xk = np.ascontiguousarray(np.atleast_2d(xk), np.float32)
    T, c = xk.shape[0], model.config
    A, y = np.empty((T, c.ffn_dim), np.float32), np.empty((T, c.n_embd), np.float32)
    if f(model._h, int(layer), xk.ctypes.data, T, A.ctypes.data, y.ctypes.data) != 0:
        raise ValueError("kernel_dense_ffn: the model is not in dense mode, or a bad layer or T")
    return A, y


@pytest.fixture(scope="module")
def files(tiny_ckpt, tmp_path_factory):
    """{(dtype, head_dtype, wide): path}: random 2-layer RWKV-7s, D 64 / F 256 and D 512 / F 2048."""
    d = tmp_path_factory.mktemp("native_dense")
    ck = {False: tiny_ckpt("x070"), True: tiny_ckpt("x070", n_embd=512, head_size=64, seed=3)}
    return {(dt, hd, w): str(convert(ck[w], d / f"m-{dt}-{hd}-{w}.rwkve", dt, head_dtype=hd))
            for dt, hd in KINDS for w in (False, True)}


def _dense_values(t, layer, A):
    """(T, D) value mat-vec of the dense FFN from its activations A (T, F) (int8 files: relu(k)^2 s_v; int4:
    relu(k)^2), on the file's own codes and scales, the activation rounded to int8 per 32 neurons."""
    p = f"blocks.{layer}.ffn."
    T, F = A.shape
    if p + "kv" in t:
        aq, s = _quantize(A)
        return (aq * s).reshape(T, F).astype(np.float32) @ np.asarray(t[p + "kv"])[:, 1, :].astype(np.float32)
    codes = unpack_q4(np.asarray(t[p + "kv4"])[:, 1, :]).astype(np.float32) - 8.0       # (F, D)
    d = np.asarray(t[p + "kv4_scale"])[:, 1, :].astype(np.float32)                     # (F, D / 32)
    y = np.zeros((T, codes.shape[1]), np.float32)
    for g in range(d.shape[1]):              # output group g: its own activation A d_g, rounded
        aq, s = _quantize(A * d[:, g])
        y[:, 32 * g:32 * g + 32] = (aq * s).reshape(T, F).astype(np.float32) @ codes[:, 32 * g:32 * g + 32]
    return y


def _activations(q, t, layer, xk):
    """(T, F) relu(xk @ W_k.T)^2 (x rounded as the kernels), times s_v in an int8 file."""
    p = f"blocks.{layer}.ffn."
    k = np.maximum(q.ops.linear(xk, q.blocks[layer].ffn_key), 0.0).astype(np.float32)
    a = k * k
    return a * np.asarray(t[p + "kv_scale"])[:, 1] if p + "kv" in t else a


def _dense_ffn(q, path):
    """FFN core (layer, xk (T, D)) -> (T, D) of the dense FFN in numpy (for q.with_ffn)."""
    t = open_tensors(path)
    return lambda layer, xk: _dense_values(t, layer, _activations(q, t, layer, xk))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("T", [1, 5, 64])
def test_ffn_core_matches_reference(files, kind, wide, T):
    """The FFN core alone (nk_test_dense_ffn) at every level and 1 / 2 threads: its activations equal
    numpy's keys up to float order; its output equals the numpy value math on those activations (the
    same int8 rounding, bit for bit; float order of the sums only). Both layers; VNNI == AVX2 exactly."""
    path = files[kind + (wide,)]
    t = open_tensors(path)
    D = 512 if wide else 64
    q = load_modelfile(path, backend=_quantizing_reference(D))
    rng = np.random.default_rng(T + D)
    xk = (rng.standard_normal((T, D)) * 2).astype(np.float32)
    outs = {}
    try:
        for lv in native.levels():
            native.set_level(lv)
            for threads in (1, 2):
                m = native.NativeRWKV7.open(path, threads=threads, ffn="dense")
                for layer in range(m.config.n_layer):
                    A, y = outs[lv, threads, layer] = kernel_dense_ffn(m, layer, xk)
                    want_a = _activations(q, t, layer, xk)
                    assert 0.2 < (A > 0).mean() < 0.8
                    np.testing.assert_allclose(A, want_a, rtol=1e-4, atol=1e-5 * np.abs(want_a).max(),
                                               err_msg=f"{lv} {threads}")
                    want = _dense_values(t, layer, A)
                    np.testing.assert_allclose(y, want, rtol=1e-4, atol=2e-6 * np.abs(want).max(),
                                               err_msg=f"{lv} {threads}")
    finally:
        native.set_level(None)
    # VNNI (int4: the fused 512-bit scale-and-round) equals AVX2 (two passes) bit for bit, 1 thread
    for layer in range(2):
        if ("vnni", 1, layer) in outs:
            assert all(np.array_equal(a, b) for a, b in zip(outs["vnni", 1, layer], outs["avx2", 1, layer]))


@pytest.mark.parametrize("kind, wide", [(KINDS[0], False), (KINDS[1], False), (KINDS[0], True)])
@pytest.mark.parametrize("threads", [1, 2])
def test_dense_matches_reference(files, kind, wide, threads):
    """The whole model: prefill chunks (the multi-token dots over the transposed values) and decode
    steps, each from the native state, against the dense reference; every key and value row counted;
    exact is off it. (int4 at D 512 rounds D / 32 = 16 activation vectors of F 2048 per token and
    layer: one of them lands on a rounding boundary, and rounds the other way than numpy's float
    order, about every token, moving the logits ~1e-2 (seen between the generic and AVX2 levels too);
    test_ffn_core_matches_reference checks it on the native's own activations instead.)"""
    path = files[kind + (wide,)]
    m = native.NativeRWKV7.open(path, threads=threads, ffn="dense")
    assert m.ffn_mode == "dense" and m.modelfile_dtype == kind[0]
    L, F, D = m.config.n_layer, m.config.ffn_dim, m.config.n_embd
    q = load_modelfile(path, backend=_quantizing_reference(D))
    qd = q.with_ffn(_dense_ffn(q, path))
    toks = _toks(40, seed=1)
    _synced(m, qd, toks, 4 if wide else 8)
    _synced(m, qd, toks[:16], 1)
    m.forward(toks[:5])
    assert (m.last_stats == 5 * F).all()                 # every key row and every value row, every token
    b0 = m.bytes_read
    m.step(toks[0])
    rb = D // 2 + D // 16 if kind[0] == "int4" else D + 4
    assert m.bytes_read - b0 == m._fixed_bytes + 2 * L * F * rb
    # the exact FFN (values' activation in float) against the same reference: most tokens off
    ex = native.NativeRWKV7.open(path, threads=threads)
    got, _ = ex.forward(toks[:8], full_output=True)
    want, _ = qd.forward(toks[:8], full_output=True)
    assert np.median([_rel(g, w) for g, w in zip(got, want)]) > 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_levels_agree(files, kind):
    """The plain C, AVX2 and VNNI dense models agree per chunk (D 64: see test_dense_matches_reference)."""
    path = files[kind + (False,)]
    toks = _toks(12, seed=8)
    outs = {}
    try:
        for lv in native.levels():
            native.set_level(lv)
            m = native.NativeRWKV7.open(path, ffn="dense")
            o1, s = m.forward(toks[:8], full_output=True)
            o2, _ = m.forward(toks[8:], s, full_output=True)
            outs[lv] = np.concatenate([o1, o2])
    finally:
        native.set_level(None)
    for lv, o in outs.items():
        _close(o, outs["generic"])
    if "vnni" in outs:
        _close(outs["vnni"], outs["avx2"])


@pytest.mark.parametrize("kind", KINDS)
def test_dense_close_to_exact_and_modes(files, kind):
    """Dense and exact logits differ by the values' activation rounding only (close, not equal); a
    dense model's with_ffn_mode("exact") is the exact model; sparse ignores the mode; bad modes raise."""
    path = files[kind + (False,)]
    ex = native.NativeRWKV7.open(path)
    de = native.NativeRWKV7.open(path, ffn="dense")
    toks = _toks(24, seed=2)
    a, _ = ex.forward(toks, full_output=True)
    b, _ = de.forward(toks, full_output=True)
    e = np.array([_rel(x, y) for x, y in zip(a, b)])
    assert 1e-4 < np.median(e) and e.max() < 3e-2, e          # D 64: medians ~1e-2, max 1.4-1.6e-2
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    assert np.array_equal(de.with_ffn_mode("exact").forward(toks, full_output=True)[0], a)
    bundle = _bundle(load_modelfile(path, backend="reference"), 2)
    s1, _ = ex.with_predictors(bundle).forward(toks, full_output=True)
    s2, _ = de.with_predictors(bundle).forward(toks, full_output=True)
    assert np.array_equal(s1, s2)
    with pytest.raises(ValueError, match="ffn"):
        native.NativeRWKV7.open(path, ffn="sparse")


def test_given_sets_with_all_keys(files):
    """with_sets(all_keys=True) (tools/bench.py --shape's exact row): the given sets' sums, as with_sets
    alone (float order of the keys only), but every key row read in decode (stats, bytes)."""
    from test_native import _FixedSets
    path = files["int8", None, False]
    m = native.NativeRWKV7.open(path)
    L, F = m.config.n_layer, m.config.ffn_dim
    sp, ak = m.with_sets(_FixedSets(F)), m.with_sets(_FixedSets(F), all_keys=True)
    toks = _toks(10, seed=3)
    a, sa = sp.forward(toks, full_output=True)
    b, sb = ak.forward(toks, full_output=True)
    _close(b, a)
    outs = []
    for t in toks[:6]:
        (x, sa), (y, sb) = sp.step(t, sa), ak.step(t, sb)
        outs.append((x, y))
        assert (ak.last_stats[:, 0] == F).all() and (sp.last_stats[:, 0] == [len(range(i, F, 3)) for i in range(L)]).all()
        assert (ak.last_stats[:, 1] == sp.last_stats[:, 1]).all()          # the same value rows
    _close(np.stack([y for _, y in outs]), np.stack([x for x, _ in outs]))
    assert not np.allclose(b, m.forward(toks, full_output=True)[0], rtol=1e-3)    # the sets do drop neurons
    ak.set_threads(2)                                                      # kept over a rebuild
    ak.step(toks[0])
    assert (ak.last_stats[:, 0] == F).all()


def test_bench_native_rows(files):
    """tools/bench.py --native: rows dense (every row), exact and sparse, each run in this process by
    run_one: weight bytes per token of dense = every key and value row; exact and sparse read fewer."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    import bench
    path = files["int8", None, True]
    base = dict(device="cpu", threads=1, tokens=4, rounds=1, prefill_tokens=8)
    cfgs = bench.native_cfgs(base, path, predictors=None, sets=None, dtype="int8")
    assert [c["name"] for c in cfgs] == ["native dense int8", "native exact int8"]
    m = native.NativeRWKV7.open(path)
    L, F, D = m.config.n_layer, m.config.ffn_dim, m.config.n_embd
    rows = {c["name"]: bench.run_one(c) for c in cfgs}
    assert rows["native dense int8"]["weight_bytes_per_token"] == m._fixed_bytes + 2 * L * F * (D + 4)
    assert rows["native exact int8"]["weight_bytes_per_token"] < rows["native dense int8"]["weight_bytes_per_token"]
    assert all(r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 for r in rows.values())
