"""Activation collection: shards + manifest, exact stored inputs, resume, refusing other models' data."""
from __future__ import annotations

import json

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.predictors.collect import (CollectError, collect, encode_text, labels, load_layer, read_manifest,
                                read_text_pieces)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return rwkv_edge.load_model(tiny_ckpt("x070"), backend="reference")


@pytest.fixture(scope="module")
def other_model(tiny_ckpt):
    return rwkv_edge.load_model(tiny_ckpt("x070", seed=1), backend="reference")


def _tokens(n, seed=0, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


def test_collect_writes_manifest_shards_and_exact_hook_input(model, tmp_path):
    captured = {}
    spy = lambda layer, xk: captured.setdefault(layer, []).append(np.array(xk))
    model.hooks.ffn_input.append(spy)          # runs next to collect's own hook, same forward calls
    try:
        man = collect(model, _tokens(300), tmp_path / "act", n_tokens=130, chunk=32, progress=False, shard_rows=50)
    finally:
        model.hooks.ffn_input.remove(spy)
    assert not model.hooks.ffn_input, "collect must remove its hook"
    on_disk = read_manifest(tmp_path / "act")
    assert on_disk == json.loads(json.dumps(man))
    assert on_disk["fingerprint"] == model.fingerprint and on_disk["config"] == model.config.to_dict()
    assert on_disk["tokens"] == 130 and on_disk["dim"] == model.config.n_embd
    D = model.config.n_embd
    for layer in range(model.config.n_layer):
        entry = on_disk["layers"][layer]
        assert entry["count"] == 130
        assert len(entry["shards"]) == 3                                   # 50 + 50 + 30 rows
        for s in entry["shards"]:
            arr = np.load(tmp_path / "act" / s["file"], mmap_mode="r")
            assert arr.dtype == np.float16 and arr.shape == (50, D)
        got = load_layer(tmp_path / "act", layer)
        want = np.concatenate(captured[layer])
        assert got.dtype == np.float32 and got.shape == (130, D)
        np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(load_layer(tmp_path / "act", layer, 45, 105), got[45:105])


def test_resume_equals_one_run(model, tmp_path):
    toks = _tokens(200, seed=3)
    collect(model, toks, tmp_path / "a", n_tokens=64, chunk=32, progress=False, shard_rows=40)
    man = collect(model, toks, tmp_path / "a", n_tokens=150, chunk=32, progress=False, shard_rows=40)
    collect(model, toks, tmp_path / "b", n_tokens=150, chunk=32, progress=False, shard_rows=40)
    assert man["tokens"] == 150
    for layer in range(model.config.n_layer):
        np.testing.assert_array_equal(load_layer(tmp_path / "a", layer), load_layer(tmp_path / "b", layer))


def test_refuses_other_models_data_and_foreign_dirs(model, other_model, tmp_path):
    toks = _tokens(64)
    collect(model, toks, tmp_path / "act", n_tokens=64, progress=False)
    before = (tmp_path / "act" / "manifest.json").read_text()
    with pytest.raises(CollectError, match="another model"):
        collect(other_model, toks, tmp_path / "act", n_tokens=128, progress=False)
    assert (tmp_path / "act" / "manifest.json").read_text() == before
    with pytest.raises(CollectError, match="another text"):
        collect(model, _tokens(64, seed=9), tmp_path / "act", n_tokens=128, progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(CollectError, match="not empty"):
        collect(model, toks, tmp_path / "junk", progress=False)
    with pytest.raises(CollectError, match="no manifest.json"):
        read_manifest(tmp_path / "junk")


def test_labels_are_relu_squared_of_wk(model):
    x = np.random.default_rng(0).standard_normal((5, model.config.n_embd)).astype(np.float32)
    active, act = labels(model, 1, x)
    pre = x @ model.blocks[1].ffn_key.T
    np.testing.assert_allclose(act, np.maximum(pre, 0) ** 2, rtol=1e-6)
    np.testing.assert_array_equal(active, pre > 0)
    assert 0.2 < active.mean() < 0.8


class _ByteTok:
    def encode(self, text):
        return list(text.encode("utf-8"))


def test_text_sampling_spreads_over_the_file(tmp_path):
    lines = [f"line {i:05d} " + "x" * 40 for i in range(4000)]
    p = tmp_path / "t.txt"
    p.write_text("\n".join(lines) + "\n")
    ids = encode_text(_ByteTok(), str(p), 3000)
    text = bytes(ids).decode()
    assert len(ids) == 3000
    assert "line 00000" in text and "line 03" in text          # the start and the far part of the file
    whole = "".join(read_text_pieces(str(p), None, piece_chars=1000))
    assert whole == p.read_text()
