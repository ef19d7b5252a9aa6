"""Numba CPU backend vs the numpy reference: every op, every weight format, decode and prefill shapes."""
from __future__ import annotations

import numpy as np
import pytest

from checkpoints import make_state_dict
from rwkv_edge.backends import numba_common as nbc
from rwkv_edge.backends import numba_cpu as nb
from rwkv_edge.backends import numba_i8dot as i8d
from rwkv_edge.backends import numba_sparse as nbs
from rwkv_edge.backends import numba_v7 as nv7
from rwkv_edge.backends import reference as ref
from rwkv_edge.config import infer_config
from rwkv_edge.models import model_class

RNG = np.random.default_rng(0)


def rel_err(got, want):
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-30))


# int8 decode mat-vecs round the activations to int8 per 32 (numba_i8dot, where the CPU runs integer
# kernels): ~0.4% of a mat-vec's scale each, compounding through a block. Whole-path int8 comparisons
# against the float reference use this bound; the kernels themselves are checked to 1e-5 against the
# same math in numpy (tests/test_numba_i8dot.py and the int8 cases below).
INT8_ACT_TOL = 3e-2


def tol(fmt, exact=1e-4):
    return INT8_ACT_TOL if fmt == "int8" and i8d.level() else exact


def linear_ref(x, name, Wobj, Wref):
    """What nb.linear computes: for int8 decode shapes the quantized-activation math (numba_i8dot)."""
    if name == "int8" and i8d.active_for(x.shape[-1]) and x.shape[0] <= nbc.SMALL_T:
        return np.stack([i8d.reference_matvec(Wobj.q, Wobj.scale, r) for r in x])
    return ref.linear(x, Wref)


def randn(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture(params=[False, True], ids=["serial", "parallel"])
def par(request, monkeypatch):
    """Run a test with the serial kernels, then with every kernel forced onto the parallel path."""
    if request.param:
        monkeypatch.setattr(nbc, "PAR_MIN", 0)
    return request.param


def weight_formats(W):
    """(name, weight object, the float32 matrix the reference should use)."""
    W16 = W.astype(np.float16)
    Wi = nb.Int8Weight.from_float(W)
    return [("fp32", W, W), ("fp16", W16, W16.astype(np.float32)), ("int8", Wi, Wi.dequantize())]


@pytest.mark.parametrize("T", [1, 3, 20])
def test_linear_all_formats(T):
    W = randn(97, 52)                       # odd sizes: exercise the 4-row remainder paths
    x = randn(T, 52)
    for name, Wobj, Wref in weight_formats(W):
        got = nb.linear(x, Wobj)
        assert got.shape == (T, 97) and got.dtype == np.float32
        assert rel_err(got, linear_ref(x, name, Wobj, Wref)) < 1e-5, name


def test_linear_parallel_kernel(monkeypatch):
    monkeypatch.setattr(nbc, "PAR_MIN", 0)
    W = randn(203, 64)
    x = randn(1, 64)
    for name, Wobj, Wref in weight_formats(W):
        assert rel_err(nb.linear(x, Wobj), linear_ref(x, name, Wobj, Wref)) < 1e-5, name


def test_linear_accepts_1d_and_noncontiguous_input():
    W = randn(16, 8)
    x = randn(8, 3)[:, 1]                   # strided
    np.testing.assert_allclose(nb.linear(x, W), W @ x, rtol=1e-5, atol=1e-6)
    x2 = randn(4, 2, 8)
    assert nb.linear(x2, W.astype(np.float16)).shape == (4, 2, 16)


def test_int8_weight_roundtrip_and_array_protocol():
    W = randn(10, 12)
    Wi = nb.Int8Weight.from_float(W)
    assert Wi.shape == (10, 12) and Wi.q.dtype == np.int8
    assert np.abs(np.asarray(Wi) - W).max() <= Wi.scale.max() / 2 + 1e-7
    np.testing.assert_allclose(Wi[[1, 3]], Wi.dequantize()[[1, 3]])
    with pytest.raises(ValueError):
        nb.Int8Weight(np.zeros((3, 4), np.int8), np.zeros(4, np.float32))


@pytest.mark.parametrize("T", [1, 4, 12])
def test_matmul_formats(T):
    M = randn(24, 20)
    x = randn(T, 24)
    Mc = nb.Int8Cols.from_float(M)
    assert np.abs(Mc.dequantize() - M).max() <= Mc.scale.max() / 2 + 1e-7
    for Mobj, Mref in ((M, M), (M.astype(np.float16), M.astype(np.float16).astype(np.float32)),
                       (Mc, Mc.dequantize())):
        assert rel_err(nb.matmul(x, Mobj), x @ Mref) < 1e-5


def test_norms():
    x = randn(3, 64, scale=3.0) + 1.0
    w, b = randn(64), randn(64)
    assert rel_err(nb.layer_norm(x, w, b), ref.layer_norm(x, w, b)) < 1e-5
    assert rel_err(nb.group_norm(x, 4, w, b, 64e-5), ref.group_norm(x, 4, w, b, 64e-5)) < 1e-5


def _wkv_inputs(T, H=4, N=16):
    st = randn(H, N, N, scale=0.5)
    r, k, v, a, b = (randn(T, H * N, scale=0.5) for _ in range(5))
    w = RNG.uniform(0.3, 1.0, (T, H * N)).astype(np.float32)
    return st, r, w, k, v, a, b


@pytest.mark.parametrize("T", [1, 7])
def test_wkv7_matches_reference(T):
    st, r, w, k, v, a, b = _wkv_inputs(T)
    st0 = st.copy()
    y, s = nb.wkv7(st, r, w, k, v, a, b)
    y_ref, s_ref = ref.wkv7(st, r, w, k, v, a, b)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    np.testing.assert_array_equal(st, st0)          # the input state is not modified


def test_wkv7_token_by_token_equals_sequence():
    st, r, w, k, v, a, b = _wkv_inputs(6)
    s = st
    ys = []
    for t in range(6):
        y, s = nb.wkv7(s, r[t:t + 1], w[t:t + 1], k[t:t + 1], v[t:t + 1], a[t:t + 1], b[t:t + 1])
        ys.append(y)
    y_seq, s_seq = ref.wkv7(st, r, w, k, v, a, b)
    assert rel_err(np.concatenate(ys), y_seq) < 1e-5 and rel_err(s, s_seq) < 1e-5


@pytest.mark.parametrize("T", [1, 5])
def test_wkv5_wkv6_match_reference(T):
    st, r, w, k, v, _, _ = _wkv_inputs(T)
    u = randn(4, 16)
    for got, want in ((nb.wkv6(st, r, k, v, w, u), ref.wkv6(st, r, k, v, w, u)),
                      (nb.wkv5(st, r, k, v, w[0].reshape(4, 16), u), ref.wkv5(st, r, k, v, w[0].reshape(4, 16), u))):
        assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-5


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("group_size", [None, 32])
def test_quant_matvec_matches_quant_package(bits, group_size):
    from rwkv_edge.quant import QuantizedMatrix
    qm = QuantizedMatrix.quantize(randn(131, 64), bits, group_size)
    x = randn(64)
    assert rel_err(nb.quant_matvec(qm, x), qm.matvec(x)) < 1e-5


def test_quant_matvec_parallel(monkeypatch):
    from rwkv_edge.quant import QuantizedMatrix
    monkeypatch.setattr(nbc, "PAR_MIN", 0)
    qm = QuantizedMatrix.quantize(randn(131, 64), 2, 32)
    x = randn(64)
    assert rel_err(nb.quant_matvec(qm, x), qm.matvec(x)) < 1e-5


@pytest.fixture
def float_select():
    """The float32 predictor select kernel for one test (not numba_simd's int8 one)."""
    nb.set_simd_select(False)
    yield
    nb.set_simd_select(True)


@pytest.mark.parametrize("bits", [2, 4])
def test_sparse_ffn_quant_predicts_and_computes(bits, monkeypatch, float_select):
    """The float select kernel (the int8 one: test_predictor_select_kernels)."""
    from rwkv_edge.quant import QuantizedMatrix
    K, V = ffn_weights()
    bundle = nb.NeuronBundledFFN.from_dense(K, V, "int8")
    qm = QuantizedMatrix.quantize(K, bits, 32)
    x = randn(64)
    scores = qm.matvec(x)
    srt = np.sort(scores)
    thr = float(srt[119] + srt[120]) / 2               # between two scores: no boundary flips
    idx = np.flatnonzero(scores >= thr).astype(np.int32)
    for par_min in (nbc.PAR_MIN, 0):
        monkeypatch.setattr(nbc, "PAR_MIN", par_min)
        out, n = nb.sparse_ffn_quant(x, qm, thr, bundle)
        assert n == len(idx) == 80
        np.testing.assert_allclose(out, nb.sparse_ffn(x, idx, bundle), rtol=1e-5, atol=1e-6)


def test_predictor_select_kernels():
    """predictor_select: numba_simd's int8 kernel where AVX2 is there (flips only neurons within its
    error bound of the threshold), the float kernel when set_simd_select(False) or the format is not one it
    takes; both drive sparse_ffn_quant to the sparse FFN of the set they select."""
    from rwkv_edge.quant import QuantizedMatrix
    from rwkv_edge.backends import numba_simd as ns
    K, V = ffn_weights(F=512, D=128)
    bundle = nb.NeuronBundledFFN.from_dense(K, V, "fp32")
    x = randn(128)
    for bits in (2, 4):
        qm = QuantizedMatrix.quantize(K, bits, 32)
        scores = qm.matvec(x)
        thr = float(np.median(scores))
        exact = set(np.flatnonzero(scores >= thr))
        simd = ns.available() and ns.supports(qm)
        assert (nb.predictor_select(qm)[0] is ns.select_i8) == simd
        out, n = nb.sparse_ffn_quant(x, qm, thr, bundle)
        idx = np.empty(512, np.int32)
        sel, P, S, Z = nb.predictor_select(qm)
        assert sel(P, S, Z, x, bits, np.float32(thr), idx, 1) == n
        got = set(idx[:n])
        flipped = np.array(sorted(got ^ exact), np.int64)
        if simd:
            bound = ns.error_bound(qm, x)
            assert np.all(np.abs(scores[flipped] - thr) <= bound[flipped] + 1e-6)
            assert len(flipped) < 0.05 * 512
        else:
            assert len(flipped) == 0
        np.testing.assert_allclose(out, nb.sparse_ffn(x, idx[:n], bundle), rtol=1e-5, atol=1e-6)
        nb.set_simd_select(False)
        try:
            assert nb.predictor_select(qm)[0] is nbs._qselect
        finally:
            nb.set_simd_select(True)
    assert nb.predictor_select(QuantizedMatrix.quantize(K, 1, 32))[0] is nbs._qselect


# --- FFN ----------------------------------------------------------------------------------------
def ffn_weights(F=200, D=64):
    # pre-activations of std ~1 on unit-scale inputs, like a trained layer: about half are active
    return randn(F, D, scale=D ** -0.5), randn(D, F, scale=F ** -0.5)


def dense_ffn(x, K, V):
    return np.maximum(x @ K.T, 0.0) ** 2 @ V.T


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("T", [1, 3, 20])
def test_bundle_views_and_ffn_dense(dtype, T):
    K, V = ffn_weights()
    bundle = nb.NeuronBundledFFN.from_dense(K, V, dtype)
    Kd, Vd = bundle.dequantize()
    x = randn(T, 64)
    assert rel_err(nb.linear(x, bundle.key), x @ Kd.T) < 1e-4
    h = np.maximum(x @ Kd.T, 0.0) ** 2
    assert rel_err(nb.linear(h, bundle.value), h @ Vd.T) < 1e-4
    want = dense_ffn(x, Kd, Vd)
    if dtype == "int8" and T == 1:        # decode: keys from the integer dot products
        want = (np.maximum(i8d.reference_keys(bundle, x[0]), 0.0) ** 2 @ Vd.T)[None]
    assert rel_err(nb.ffn_dense(x, bundle.key, bundle.value), want) < 1e-4
    np.testing.assert_allclose(np.asarray(bundle.key), Kd)
    if dtype != "int8":   # fp32/fp16 bundles hold W_k and W_v exactly (up to the fp16 rounding)
        assert np.abs(Kd - K).max() < (1e-3 if dtype == "fp16" else 1e-7)


@pytest.mark.parametrize("dtype, par_min", [("fp32", None), ("fp16", None), ("int8", None), ("int8", 0)],
                         ids=["fp32", "fp16", "int8", "int8-parallel"])
def test_sparse_ffn_exact_set_equals_dense(dtype, par_min, monkeypatch):
    if par_min is not None:
        monkeypatch.setattr(nbc, "PAR_MIN", par_min)
    K, V = ffn_weights()
    bundle = nb.NeuronBundledFFN.from_dense(K, V, dtype)
    Kd, Vd = bundle.dequantize()
    for _ in range(5):
        x = randn(64)
        keys = i8d.reference_keys(bundle, x) if dtype == "int8" else Kd @ x
        idx = np.flatnonzero(keys > 0).astype(np.int32)
        want = np.maximum(keys, 0.0) ** 2 @ Vd.T
        got = nb.sparse_ffn(x, idx, bundle)
        assert np.abs(got - want).max() <= 1e-3
        assert rel_err(got, want) < 1e-4
        # false positives (inactive neurons) change nothing; the set may come in any order
        extra = np.union1d(idx, RNG.choice(200, 40, replace=False)).astype(np.int32)
        assert np.abs(nb.sparse_ffn(x, extra[::-1].copy(), bundle) - want).max() <= 1e-3


def test_sparse_ffn_subset_is_the_masked_dense_ffn():
    K, V = ffn_weights()
    bundle = nb.NeuronBundledFFN.from_dense(K, V, "fp32")
    x = randn(64)
    for k in (0, 1, 2, 3, 5, 37):                 # sizes around the 4-neuron blocks
        idx = np.sort(RNG.choice(200, k, replace=False)).astype(np.int32)
        mask = np.zeros(200, np.float32)
        mask[idx] = 1.0
        want = (np.maximum(K @ x, 0.0) ** 2 * mask) @ V.T
        assert np.abs(nb.sparse_ffn(x, idx, bundle) - want).max() <= 1e-5


def test_sparse_ffn_tokens_matches_per_token():
    K, V = ffn_weights()
    bundle = nb.NeuronBundledFFN.from_dense(K, V, "int8")
    X = randn(6, 64)
    sets = [np.sort(RNG.choice(200, n, replace=False)).astype(np.int32) for n in (0, 3, 50, 200, 7, 1)]
    offs = np.concatenate([[0], np.cumsum([len(s) for s in sets])])
    got = nb.sparse_ffn_tokens(X, np.concatenate(sets), offs, bundle)
    for t in range(6):
        np.testing.assert_allclose(got[t], nb.sparse_ffn(X[t], sets[t], bundle), rtol=1e-5, atol=1e-6)


def test_byte_counter():
    K, V = ffn_weights()
    bundle = nb.NeuronBundledFFN.from_dense(K, V, "int8")
    W = nb.Int8Weight.from_float(randn(32, 64))
    x = randn(64)
    nb.counter.reset()
    nb.linear(x[None], W)
    assert nb.counter.bytes_read == 0            # disabled by default
    nb.counter.enabled = True
    try:
        nb.linear(x[None], W)
        assert nb.counter.bytes_read == W.q.nbytes + W.scale.nbytes
        nb.counter.reset()
        idx = np.flatnonzero(bundle.dequantize()[0] @ x > 0).astype(np.int32)
        extra = np.union1d(idx, np.flatnonzero(bundle.dequantize()[0] @ x <= 0)[:10]).astype(np.int32)
        nb.sparse_ffn(x, extra, bundle)
        half = bundle.neuron_bytes // 2              # key row + scale; value column + scale
        assert nb.counter.by_op["ffn"] == (len(extra) + len(idx)) * half   # inactive: key row only
        nb.counter.reset()
        nb.ffn_dense(x[None], bundle.key, bundle.value)
        assert nb.counter.bytes_read == bundle.nbytes
    finally:
        nb.counter.enabled = False
        nb.counter.reset()


# --- fused time-mix and whole models -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    sd = make_state_dict("x070", n_layer=3, n_embd=64, head_size=16, vocab_size=256, seed=3)
    return infer_config({k: v.shape for k, v in sd.items()}), sd


def _with_formats(sd, fmt):
    """The weights dict with att/head matrices and LoRAs stored as `fmt`, and its dequantized twin."""
    w, wd = dict(sd), dict(sd)
    for k, v in sd.items():
        lin = k.endswith(("receptance.weight", "key.weight", "value.weight", "output.weight")) and ".att." in k
        lora = k.rsplit(".", 1)[-1] in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2")
        if fmt == "fp16" and (lin or lora):
            w[k] = v.astype(np.float16)
            wd[k] = w[k].astype(np.float32)
        elif fmt == "int8" and (lin or lora):
            w[k] = nb.Int8Weight.from_float(v) if lin else nb.Int8Cols.from_float(v)
            wd[k] = w[k].dequantize()
    return w, wd


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
def test_time_mix7_step_matches_model_time_mix(tiny, fmt, par):
    config, sd = tiny
    w, wd = _with_formats(sd, fmt)
    fast = model_class("x070")(config, w, backend="numba", fingerprint="t")
    slow = model_class("x070")(config, wd, backend="reference", fingerprint="t")
    st = slow.zero_state()
    st.att_x[:] = randn(*st.att_x.shape)
    st.wkv[:] = randn(*st.wkv.shape, scale=0.3)
    ctx = {}
    for i in range(config.n_layer):
        x = randn(1, 64)
        s_ref, c_ref = st.copy(), dict(ctx)
        want = slow.time_mix(i, x, s_ref, c_ref)
        wkv_in = st.wkv[i].copy()
        out, S, v = nv7.time_mix7_step(fast.blocks[i], x, st.att_x[i], st.wkv[i], ctx.get("v_first"))
        np.testing.assert_array_equal(st.wkv[i], wkv_in)             # not in place unless asked
        assert rel_err(out, want) < tol(fmt) and rel_err(S, s_ref.wkv[i]) < tol(fmt)
        nv7.time_mix7_step(fast.blocks[i], x, st.att_x[i], st.wkv[i], ctx.get("v_first"), wkv_out=st.wkv[i])
        assert rel_err(st.wkv[i], s_ref.wkv[i]) < tol(fmt)                # in place
        if i == 0:
            assert rel_err(v, c_ref["v_first"]) < tol(fmt, 1e-5)
            ctx["v_first"] = v


@pytest.mark.parametrize("fmt", ["fp32", "fp16", "int8"])
def test_whole_model_numba_matches_reference(tiny, fmt):
    config, sd = tiny
    w, wd = _with_formats(sd, fmt)
    fast = model_class("x070")(config, w, backend="numba", fingerprint="t")
    slow = model_class("x070")(config, wd, backend="reference", fingerprint="t")
    toks = [5, 17, 200, 3, 99, 42, 7, 250, 0, 1, 2, 3]
    want, s_want = slow.forward(toks, full_output=True)
    got, s_got = fast.forward(toks, full_output=True)
    assert rel_err(got, want) < 1e-4 and rel_err(s_got.wkv, s_want.wkv) < 1e-4     # T > SMALL_T: float BLAS
    s = None
    for t, tok in enumerate(toks):
        logits, s = fast.step(tok, s)
        assert rel_err(logits, want[t]) < tol(fmt)


@pytest.mark.parametrize("fmt", ["fp32", "int8"])
def test_fused_block_equals_generic_block_and_yields_to_hooks(tiny, fmt, tmp_path):
    """Decode runs each RWKV-7 block as one kernel (numba_v7.block7_step): same logits and state as the
    generic per-op path, for plain and neuron-bundled FFN weights; any FFN hook turns the fusion off."""
    from rwkv_edge.modelfile import convert, load_modelfile
    config, sd = tiny
    w, _ = _with_formats(sd, fmt)
    plain = model_class("x070")(config, w, backend="numba", fingerprint="t")
    calls = []
    plain.hooks.ffn_input.append(lambda i, xk: calls.append(i))        # forces the generic path
    fused = model_class("x070")(config, w, backend="numba", fingerprint="t")
    path = str(tmp_path / "m.pth")
    import torch
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, path)
    bundled = load_modelfile(convert(path, str(tmp_path / "m.rwkve"), "fp32"))
    b0 = bundled.blocks[0]
    assert type(b0.ffn_key) is nb.FFNKeyView
    sg = sf = sb = None
    for tok in [5, 17, 200, 3, 99]:
        lg, sg = plain.step(tok, sg)
        lf, sf = fused.step(tok, sf)
        lb, sb = bundled.step(tok, sb)
        assert rel_err(lf, lg) < 1e-5 and rel_err(sf.wkv, sg.wkv) < 1e-5 and rel_err(sf.ffn_x, sg.ffn_x) < 1e-6
        if fmt == "fp32":
            assert rel_err(lb, lg) < 1e-5 and rel_err(sb.att_x, sg.att_x) < 1e-6
    assert calls == list(range(config.n_layer)) * 5                 # the hook saw every layer of every token
    x = np.zeros((1, 64), np.float32)
    for m in (fused, bundled):                                       # both really run fused
        assert nv7.block7_step(m.blocks[0], x.copy(), sf.copy(), 0, {}, ffn=None) is True
    assert nv7.block7_step(plain.blocks[0], x, sf.copy(), 0, {}, ffn=lambda i, xk: xk) is False   # unknown FFN
