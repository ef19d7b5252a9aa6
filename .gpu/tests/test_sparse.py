"""SparseFFN plugged into whole models: with the true active set it reproduces the dense model."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.backends import numba_cpu as nb
from rwkv_edge.backends import numba_i8dot as i8d
from rwkv_edge.modelfile import convert, load_modelfile
from rwkv_edge.sparse import ReplayIndices, SparseFFN, exact_active_indices, layer_bundles

TOKENS = [5, 17, 200, 3, 99, 42, 7, 250, 0, 1, 128, 64]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256)


def _decode(model, tokens):
    s, out = None, []
    for t in tokens:
        logits, s = model.step(t, s)
        out.append(logits)
    return np.stack(out), s


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8"])
def test_sparse_model_with_exact_set_matches_dense(ckpt, tmp_path, dtype):
    dense = load_modelfile(convert(ckpt, tmp_path / "m.rwkve", dtype))
    want, s_want = dense.forward(TOKENS, full_output=True)
    sparse = dense.with_ffn(SparseFFN(dense, exact_active_indices(dense)))
    if dtype == "int8":  # prefill (all tokens in one kernel call); one dtype keeps numba compiles few
        got, s_got = sparse.forward(TOKENS, full_output=True)
        # the sparse prefill reads its key rows with the int8 integer dot (x rounded to int8 per 32,
        # numba_i8dot) where the CPU has it, the dense prefill with float BLAS
        lim = 3e-2 * np.abs(want).max() if i8d.active_for(dense.config.n_embd) else 1e-3
        assert np.abs(got - want).max() <= lim
    got_dec, s_dec = _decode(sparse, TOKENS)                         # decode: one token at a time
    if dtype == "int8":  # int8 decode rounds activations (numba_i8dot): compare with dense decode
        want, s_want = _decode(dense, TOKENS)
    assert np.abs(got_dec - want).max() <= 1e-3
    assert np.abs(s_dec.wkv - s_want.wkv).max() <= 1e-3
    assert 0.1 < sparse.ffn.density < 0.9                            # it really skipped neurons


def test_exact_mode_without_predictor(ckpt, tmp_path):
    dense = load_modelfile(convert(ckpt, tmp_path / "m.rwkve", "int8"))
    want, _ = _decode(dense, TOKENS)          # decode vs decode: int8 decode rounds activations (numba_i8dot)
    sparse = dense.with_ffn(SparseFFN(dense, None))
    got, _ = _decode(sparse, TOKENS)
    assert np.abs(got - want).max() <= 1e-3


def test_sparse_on_pth_model_and_reference_dense(ckpt):
    """A .pth model (float32 arrays, reference backend) gets bundles built by SparseFFN."""
    dense = rwkv_edge.load_model(ckpt, backend="reference")
    want, _ = dense.forward(TOKENS, full_output=True)
    for dtype, tol in (("fp32", 1e-4), ("fp16", 1e-2)):
        sp = SparseFFN(dense, exact_active_indices(dense), dtype=dtype)
        assert sp.bundles[0].kv.dtype == {"fp32": np.float32, "fp16": np.float16}[dtype]
        got, _ = _decode(dense.with_ffn(sp), TOKENS)
        assert np.abs(got - want).max() <= tol


def test_missing_neurons_change_the_output_like_a_masked_dense_ffn(ckpt):
    dense = rwkv_edge.load_model(ckpt, backend="reference")
    exact = exact_active_indices(dense)
    drop = lambda layer, x: exact(layer, x)[::2].copy()               # half of the true set
    sparse = dense.with_ffn(SparseFFN(dense, drop))

    def masked_hook(layer, k):                                        # the same set, dense math
        out = np.zeros_like(k)
        for t in range(k.shape[0]):
            idx = np.flatnonzero(k[t] > 0)[::2]
            out[t, idx] = k[t, idx]
        return out

    masked = rwkv_edge.load_model(ckpt, backend="reference")
    masked.hooks.ffn_activation.append(masked_hook)
    got, _ = _decode(sparse, TOKENS)
    want, _ = masked.forward(TOKENS, full_output=True)
    full, _ = dense.forward(TOKENS, full_output=True)
    assert np.abs(got - want).max() <= 1e-3
    assert np.abs(got - full).max() > 1e-2


def test_replay_indices_records_and_replays(ckpt, tmp_path):
    m = load_modelfile(convert(ckpt, tmp_path / "m.rwkve", "int8"))
    rep = ReplayIndices(m.config.n_layer)
    m.hooks.ffn_activation.append(rep.record)
    want, _ = _decode(m, TOKENS[:5])
    m.hooks.ffn_activation.clear()
    # the hooked (generic) decode computes the FFN keys in float, the fused and the sparse kernels with
    # the int8 integer dot: compare like with like (the recorded sets differ only at keys ~ 0)
    want, _ = _decode(m, TOKENS[:5])
    assert [len(s) for s in rep.sets] == [5, 5]
    sparse = m.with_ffn(SparseFFN(m, rep))
    got, _ = _decode(sparse, TOKENS[:5])
    assert np.abs(got - want).max() <= 1e-3
    rep.rewind()
    assert rep(0, None) is rep.sets[0][0]


def test_layer_bundles_reuse_the_model_file_bundles(ckpt, tmp_path):
    m = load_modelfile(convert(ckpt, tmp_path / "m.rwkve", "fp16"))
    assert layer_bundles(m)[1] is m.blocks[1].ffn_key.bundle
    assert layer_bundles(m, "int8")[1].kv.dtype == np.int8             # another dtype: rebuilt


def test_sparse_reads_fewer_bytes(ckpt, tmp_path):
    m = load_modelfile(convert(ckpt, tmp_path / "m.rwkve", "int8"))
    sparse = m.with_ffn(SparseFFN(m, exact_active_indices(m)))
    nb.counter.reset()
    nb.counter.enabled = True
    try:
        sparse.step(7)
        n_sparse = nb.counter.by_op["ffn"]
        nb.counter.reset()
        x = np.ones(64, np.float32)
        b = m.blocks[0].ffn_key.bundle
        nb.ffn_dense(x[None], b.key, b.value)
        assert nb.counter.by_op["ffn"] == b.nbytes
        assert n_sparse < 2 * b.nbytes                                  # two layers, each partly read
    finally:
        nb.counter.enabled = False
        nb.counter.reset()


def test_quantized_bundle_runs_fused_and_matches_the_generic_path(ckpt):
    """With the float select kernel the fused path is the generic one; the AVX2 int8 select (the
    default where available) may flip neurons within its error bound of the threshold only."""
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.calibrate import Calibration
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    model = rwkv_edge.load_model(ckpt, backend="reference")
    preds = []
    for b in model.blocks:
        p = QuantizedPredictor.fit(np.asarray(b.ffn_key), 4, group_size=32)
        p.calib = Calibration(threshold=-0.05)
        preds.append(p)
    bundle = PredictorBundle(preds, model.fingerprint, model.config, "quantized", bits=4)
    assert SparseFFN(model, bundle).fused is None          # the reference backend: float scores, unfused
    model = rwkv_edge.load_model(ckpt, backend="numba")
    simd = SparseFFN(model, bundle, dtype="int8")
    _decode(model.with_ffn(simd), TOKENS)
    nb.set_simd_select(False)
    try:
        fused = SparseFFN(model, bundle, dtype="int8")
        generic = SparseFFN(model, bundle, dtype="int8", fused=False)
        assert fused.fused is not None and generic.fused is None
        a, _ = _decode(model.with_ffn(fused), TOKENS)
        b, _ = _decode(model.with_ffn(generic), TOKENS)
        assert np.abs(a - b).max() <= 1e-3
        assert fused.n_active == generic.n_active and 0 < fused.density < 1
    finally:
        nb.set_simd_select(True)
    assert abs(simd.n_active - fused.n_active) <= 0.02 * fused.n_active
    # prefill goes through bundle.predict (a mask for all tokens) and agrees with decoding
    c, _ = model.with_ffn(SparseFFN(model, bundle, dtype="int8")).forward(TOKENS, full_output=True)
    assert np.abs(c - a).max() <= 1e-3


def test_device_sparse_ffn_matches_cpu_sparse_ffn_on_reference_ops(tiny_ckpt):
    """DeviceSparseFFN (the CUDA path's algorithm) run with the numpy ops equals the CPU SparseFFN
    for the same quantized bundle: decode step by step and a prefill."""
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge import load_model
    from rwkv_edge.sparse import DeviceSparseFFN, SparseFFN
    from rwkv_edge.predictors.quantized import QuantizedPredictor

    m = load_model(tiny_ckpt("x070"), backend="reference")
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, m.config.n_embd)).astype(np.float32)
    preds = []
    for b in m.blocks:
        p = QuantizedPredictor.fit(b.ffn_key, 4, 16)
        act = np.maximum(X @ b.ffn_key.T, 0) ** 2
        p.calibrate(X, act, 0.95, "mass", 0.0)
        preds.append(p)
    bundle = PredictorBundle(preds, m.fingerprint, m.config, "quantized", {})
    dev = m.with_ffn(DeviceSparseFFN(m, bundle))
    cpu = m.with_ffn(SparseFFN(m, bundle, fused=False))
    toks = [1, 5, 9, 2, 7]
    a, sa = dev.forward(toks, full_output=True)
    b_, sb = cpu.forward(toks, full_output=True)
    np.testing.assert_allclose(a, b_, atol=1e-3)
    for t in (3, 4):
        a, sa = dev.step(t, sa)
        b_, sb = cpu.step(t, sb)
        np.testing.assert_allclose(a, b_, atol=1e-3)
    assert 0 < dev.ffn.density < 1


def test_sparse_check_tool(tiny_ckpt, tmp_path):
    """tools/sparse_check.py: sparse on the exact set == dense, and sparse on a bundle's predicted sets
    == the dense math masked to the same sets, within 1e-3 (prefill + decode)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import TOKENIZER_JSON
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    tokjson = TOKENIZER_JSON
    if not tokjson.exists():
        pytest.skip(f"{tokjson} not present")
    path = tiny_ckpt("x070", vocab_size=16384)
    m = rwkv_edge.load_model(path, backend="reference")
    X = np.random.default_rng(0).standard_normal((256, m.config.n_embd)).astype(np.float32)
    preds = []
    for b in m.blocks:
        p = QuantizedPredictor.fit(b.ffn_key, 2, 32)
        p.calibrate(X, np.maximum(X @ b.ffn_key.T, 0) ** 2, 0.95, "mass", 0.0)
        preds.append(p)
    bpath = str(tmp_path / "b.npz")
    PredictorBundle(preds, m.fingerprint, m.config, "quantized", {}).save(bpath)
    text = tmp_path / "t.txt"
    text.write_text("The old man looked at the sea, and the sea looked back at him. " * 8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "tools/sparse_check.py", "--model", path, "--tokenizer", str(tokjson),
                        "--predictors", bpath, "--text", str(text), "--tokens", "24", "--steps", "6"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    vals = dict(re.findall(r"(\w+)=([-\d.e+]+)", r.stdout))
    assert float(vals["exact_max_abs_diff"]) <= 1e-3 and float(vals["bundle_max_abs_diff"]) <= 1e-3
    assert 0 < float(vals["bundle_density"]) < 1
