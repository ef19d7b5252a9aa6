"""Footprint: kernels warmed before the weights, LLVM's code pages released, the fused sparse prefill
without a float32 predictor copy, and the --max-resident-mb path through open_model and the CLI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from rwkv_edge.backends import numba_cpu as nb
from rwkv_edge.config import ModelConfig
from rwkv_edge.memstat import smaps_by_path
from rwkv_edge.modelfile import load_modelfile
from rwkv_edge.sparse import SparseFFN
from rwkv_edge.synthetic import write_synthetic

CFG = ModelConfig("x070", 2, 128, 64, 512, 64)
LORA = dict(w=16, a=16, v=16, g=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.calibrate import Calibration
    from rwkv_edge.predictors.quantized import QuantizedPredictor

    d = tmp_path_factory.mktemp("lean")
    path = write_synthetic(d / "m.rwkve", CFG, "int8", seed=3, lora=LORA)
    model = load_modelfile(path)
    preds = []
    for b in model.blocks:
        p = QuantizedPredictor.fit(np.asarray(b.ffn_key, np.float32), 2, 64)
        p.calib = Calibration(threshold=0.5)
        preds.append(p)
    bundle = d / "b.npz"
    PredictorBundle(preds, model.fingerprint, model.config, "quantized", bits=2).save(str(bundle))
    return str(path), str(bundle)


def test_release_compiler_pages_keeps_numba_working(files):
    from rwkv_edge.lean import release_compiler_pages, warm_kernels

    warm_kernels("int8", sparse=True)
    llvm = lambda: sum(v for k, v in smaps_by_path().items() if "libllvmlite" in k)  # noqa: E731
    assert llvm() > 0
    assert release_compiler_pages() > 0
    assert llvm() < 32 << 20          # only relocated data left; the machine code pages are gone
    m = load_modelfile(files[0])
    want, _ = load_modelfile(files[0], backend="reference").forward([1, 2, 3, 4])
    got, _ = m.forward([1, 2, 3, 4])                 # kernels still run (LLVM pages fault back on demand)
    # int8 mat-vecs round the activations to int8 per 32 (numba_i8dot): 3e-2, as for int8 decode elsewhere
    np.testing.assert_allclose(got, want, rtol=3e-2, atol=3e-2 * np.abs(want).max())


def test_fused_prefill_uses_the_decode_select_and_no_float_copy(files):
    from rwkv_edge.predictors.bundle import PredictorBundle

    m = load_modelfile(files[0])
    bundle = PredictorBundle.load(files[1], model=m)
    nb.set_simd_select(False)               # the float select: prefill sets == decode sets exactly
    try:
        pre = SparseFFN(m, bundle)
        dec = SparseFFN(m, bundle)
        assert pre.fused is not None
        X = np.random.default_rng(0).standard_normal((6, CFG.n_embd)).astype(np.float32)
        for layer in range(CFG.n_layer):
            a = pre(layer, X)
            b = np.concatenate([dec(layer, X[t:t + 1]) for t in range(6)])
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
        assert pre.n_active == dec.n_active and 0 < pre.density < 1
        assert all(p.qm._qf is None for p in bundle.predictors)   # no cached float32 codes
    finally:
        nb.set_simd_select(True)


def test_open_model_resident_mode_and_cli_errors(files):
    from rwkv_edge.runtime import open_model

    m = open_model(files[0], backend="numba", predictors=files[1], max_resident_mb=float("inf"), resident_window=2)
    ref = open_model(files[0], backend="numba", predictors=files[1])
    toks = [5, 6, 7, 8, 9]
    st = st2 = None
    nb.set_simd_select(False)       # the float select: the fused sets are the generic path's
    try:
        for t in toks:
            a, st = m.step(t, st)
            b, st2 = ref.step(t, st2)
    finally:
        nb.set_simd_select(True)
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(b).max())
    assert m.ffn.n_active == ref.ffn.n_active
    assert m.ffn.select_layers is not None          # the bundle selects on its packed codes
    s = m.ffn.residency.stats()
    assert s["tokens"] == len(toks) and s["hit_rate"] is not None
    cmd = [sys.executable, "-m", "rwkv_edge.cli", "generate", "--model", files[0], "--backend", "numba",
           "--tokenizer", "world", "--prompt", "hi", "--max-tokens", "1"]
    r = subprocess.run(cmd + ["--predictors", files[1], "--max-resident-mb", "0.01"], capture_output=True, text=True)
    assert r.returncode == 2 and "minimum is" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd + ["--max-resident-mb", "100"], capture_output=True, text=True)
    assert r.returncode == 2 and "needs --predictors" in r.stderr
