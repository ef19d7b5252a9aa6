"""Synthetic official-shape models streamed to the model file, and replayed active sets."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.backends import numba_i8dot as i8d
from rwkv_edge.config import ModelConfig
from rwkv_edge.modelfile import convert, load_modelfile, open_tensors, read_header
from rwkv_edge.replay import ActiveSets, ReplayedSets, map_indices, replayed_sparse_ffn
from rwkv_edge.synthetic import (SHAPES, lora_dims, shape_config, synthetic_weights, tensor_chunks,
                                 write_synthetic)

# a tiny x070 with more than one generated chunk per large tensor (CHUNK_ELEMS patched below)
CFG = ModelConfig("x070", 3, 64, 16, 256, 512)
REF_TOKENS = [int(t) for t in np.random.default_rng(0).integers(0, 256, 40)]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr("rwkv_edge.synthetic.CHUNK_ELEMS", 64 * 48)   # 48 rows of 64: several chunks


def test_official_shapes():
    c = shape_config("1.5b")
    assert (c.n_layer, c.n_embd, c.ffn_dim, c.vocab_size, c.head_size) == (24, 2048, 8192, 65536, 64)
    assert SHAPES["0.1b"] == (12, 768) and SHAPES["0.4b"] == (24, 1024)
    assert lora_dims(2048) == dict(w=96, a=96, v=64, g=256) and lora_dims(768)["g"] == 128
    with pytest.raises(ValueError, match="unknown shape"):
        shape_config("7b")


def test_chunks_are_seeded_and_independent():
    a = list(tensor_chunks("x.weight", (200, 64), ("n", 0.1, 0.0), seed=3))
    b = list(tensor_chunks("x.weight", (200, 64), ("n", 0.1, 0.0), seed=3))
    c = list(tensor_chunks("x.weight", (200, 64), ("n", 0.1, 0.0), seed=4))
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], a[1])


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_streamed_file_equals_convert_of_materialised(tmp_path, dtype):
    lora = dict(w=16, a=16, v=8, g=32)
    streamed = write_synthetic(tmp_path / "s.rwkve", CFG, dtype, seed=7, lora=lora)
    w = synthetic_weights(CFG, seed=7, lora=lora)
    conv = convert((CFG, w), tmp_path / "c.rwkve", dtype)
    hs, hc = read_header(streamed), read_header(conv)
    assert hs["fingerprint"] == hc["fingerprint"] and hs["tensors"] == hc["tensors"]
    ts, tc = open_tensors(streamed), open_tensors(conv)
    for name in tc:
        assert np.array_equal(ts[name], tc[name]), name
    m = load_modelfile(streamed)
    assert m.config == CFG and np.isfinite(m.forward([1, 2, 3])[0]).all()


@pytest.fixture(scope="module")
def ref_sets(tiny_ckpt):
    ref = rwkv_edge.load_model(tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256))
    return ref, ActiveSets.record(ref, REF_TOKENS, chunk=16)


def test_record_matches_dense_activations(ref_sets):
    ref, sets = ref_sets
    assert (sets.n_tokens, sets.n_layer, sets.ffn_dim) == (40, 2, 256)
    k_seen = {}
    m = ref.with_ffn(None)
    m.hooks.ffn_activation.append(lambda i, k: k_seen.setdefault(i, k))
    m.forward(REF_TOKENS)
    for layer in range(2):
        for t in (0, 17, 39):
            assert np.array_equal(sets.indices(layer, t), np.flatnonzero(k_seen[layer][t] > 0))
    d = sets.density()
    assert d.shape == (2,) and 0.2 < d.min() and d.max() < 0.8          # random weights: ~half active
    assert sets.overlap().shape == (2,)


def test_save_load_roundtrip_and_errors(ref_sets, tmp_path):
    ref, sets = ref_sets
    p = sets.save(tmp_path / "sets.npz")
    back = ActiveSets.load(p, fingerprint=ref.fingerprint)
    assert np.array_equal(back.bits, sets.bits) and back.ffn_dim == 256
    with pytest.raises(ValueError, match="recorded on model"):
        ActiveSets.load(p, fingerprint="0" * 16)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not an active-set recording"):
        ActiveSets.load(tmp_path / "junk.npz")


def test_mapping_keeps_density_and_overlap(ref_sets):
    _, sets = ref_sets
    ref = np.array([1, 5, 200, 255], np.int32)
    assert map_indices(ref, 256, 600).tolist() == [1, 5, 200, 255, 257, 261, 456, 511, 513, 517]
    assert map_indices(ref, 256, 100).tolist() == [1, 5]
    rep = ReplayedSets(sets, n_layer=5, ffn_dim=1024)
    assert rep.ref_layer == [0, 0, 0, 1, 1]
    for layer in range(5):
        for t in (0, 9, 40 + 9):                            # wraps around after T tokens
            a, b = rep.indices(layer, t), sets.indices(rep.ref_layer[layer], t)
            assert len(a) == 4 * len(b) and np.array_equal(a[: len(b)], b)
    t = [rep.predict_indices(2) for _ in range(3)]
    assert np.array_equal(t[2], rep.indices(2, 2)) and rep.pos[2] == 3


@pytest.mark.parametrize("dtype", ["fp16", "int8"])
def test_replayed_sparse_ffn_equals_masked_dense(ref_sets, tmp_path, dtype):
    _, sets = ref_sets
    path = write_synthetic(tmp_path / "m.rwkve", CFG, dtype, seed=1, lora=dict(w=16, a=16, v=8, g=32))
    model = load_modelfile(path)
    ffn = replayed_sparse_ffn(model, sets, start=3)
    sets.save(tmp_path / "sets.npz")
    rep = ReplayedSets.from_file(tmp_path / "sets.npz", model, start=3)     # the tools' way in
    assert rep.ref_layer == ReplayedSets(sets, CFG.n_layer, CFG.ffn_dim).ref_layer
    rng = np.random.default_rng(0)
    for layer in range(CFG.n_layer):
        K, V = ffn.bundles[layer].dequantize()
        X = rng.standard_normal((5, CFG.n_embd)).astype(np.float32)
        got = np.concatenate([ffn(layer, X[:1]), ffn(layer, X[1:])])       # decode, then a 4-token prefill
        b = ffn.bundles[layer]
        if b.kv.dtype == np.int8:     # the sparse kernels' int8 keys: x rounded to int8 per 32 (numba_i8dot)
            k = np.maximum(np.stack([i8d.reference_keys(b, x) for x in X]), 0.0) ** 2
        else:
            k = np.maximum(X.astype(np.float64) @ K.T, 0.0) ** 2
        k *= np.stack([rep.mask(layer, 3 + t) for t in range(5)])
        want = k @ V.T
        assert 0.05 < np.mean(k > 0) < 0.5                   # the replayed set, not all neurons
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_replayed_model_matches_reference_with_masked_hook(ref_sets, tmp_path):
    _, sets = ref_sets
    path = write_synthetic(tmp_path / "m.rwkve", CFG, "fp16", seed=2, lora=dict(w=16, a=16, v=8, g=32))
    sparse = load_modelfile(path)
    sparse = sparse.with_ffn(replayed_sparse_ffn(sparse, sets))
    ref = load_modelfile(path, backend="reference")
    rep = ReplayedSets(sets, CFG.n_layer, CFG.ffn_dim)
    ref.hooks.ffn_activation.append(lambda i, k: k * np.stack([rep.mask(i, t) for t in range(k.shape[0])]))
    toks = [3, 1, 4, 1, 5, 9]
    got, _ = sparse.forward(toks, full_output=True)
    want, _ = ref.forward(toks, full_output=True)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    st = None                                               # decode one token at a time, same sets
    sparse.ffn.predictor.rewind()
    for t, tok in enumerate(toks):
        lg, st = sparse.step(tok, st)
    np.testing.assert_allclose(lg, want[-1], rtol=1e-3, atol=1e-3 * np.abs(want).max())
