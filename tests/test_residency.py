"""Resident FFN memory following the active set: madvise'd neuron pages, hit rate, budget, errors."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_edge.config import ModelConfig
from rwkv_edge.memstat import PAGE, mapping_resident
from rwkv_edge.modelfile import load_modelfile
from rwkv_edge.residency import min_resident_mb, resident_sparse_ffn, weight_bytes
from rwkv_edge.sparse import SparseFFN
from rwkv_edge.synthetic import write_synthetic

# int8, D 2048: one neuron record (key row + value column) is exactly one 4 KiB page
CFG = ModelConfig("x070", 2, 2048, 64, 96, 64)
LORA = dict(w=16, a=16, v=8, g=16)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("res") / "m.rwkve", CFG, "int8", seed=5, lora=LORA)


def _sets(T, seed=0):
    """Overlapping random sets: each token keeps ~half of the previous set."""
    rng = np.random.default_rng(seed)
    out, cur = [], rng.choice(CFG.ffn_dim, 12, replace=False)
    for _ in range(T):
        keep = cur[rng.random(cur.size) < 0.5]
        cur = np.unique(np.r_[keep, rng.choice(CFG.ffn_dim, 12 - keep.size, replace=False)])
        out.append(cur.astype(np.int32))
    return out


@pytest.mark.parametrize("prefetch", [False, True])
def test_outputs_unchanged_and_pages_follow_the_window(path, prefetch):
    model = load_modelfile(path)
    sets = _sets(12)
    calls = {"n": [0] * CFG.n_layer}

    def predict(layer, x):
        t = calls["n"][layer]
        calls["n"][layer] += 1
        return sets[t]

    ffn = resident_sparse_ffn(model, predict, window=2, prefetch=prefetch)
    ref = SparseFFN(model, lambda layer, x: sets[ref_pos[layer]], fused=False)
    ref_pos = [0] * CFG.n_layer
    rng = np.random.default_rng(1)
    res = ffn.residency
    for t in range(12):
        for layer in range(CFG.n_layer):
            x = rng.standard_normal((1, CFG.n_embd)).astype(np.float32)
            want = ref(layer, x)
            ref_pos[layer] += 1
            got = ffn(layer, x)
            np.testing.assert_array_equal(got, want)             # dropped pages read back from the file
        hot = set().union(*(sets[u].tolist() for u in range(max(0, t - 1), t + 1)))
        # policy: the pages of the window's neurons (a record spans <= 2 pages) + 2 shared edge pages
        assert res.resident_policy_bytes() <= CFG.n_layer * (2 * len(hot) + 2) * PAGE
        # measured (pagemap) right after the token: nothing beyond the policy
        assert res.resident_measured_bytes() <= res.resident_policy_bytes()
    st = res.stats()
    assert st["tokens"] == 12 and 0.2 < st["hit_rate"] < 0.8
    hits = sum(len(np.intersect1d(sets[t], np.union1d(sets[t - 1], sets[t - 2] if t > 1 else []))) for t in range(1, 12))
    assert res.hits == CFG.n_layer * hits                     # window 2: a neuron used in the last 2 tokens is a hit


def test_budget_caps_resident_pages(path):
    model = load_modelfile(path)
    need = min_resident_mb(model)
    sets = _sets(10, seed=3)
    pos = [0] * CFG.n_layer

    def predict(layer, x):
        pos[layer] += 1
        return sets[pos[layer] - 1]

    ffn = resident_sparse_ffn(model, predict, window=100, max_resident_mb=need + 20 * PAGE / 2**20)
    x = np.ones((1, CFG.n_embd), np.float32)
    for _ in range(10):
        for layer in range(CFG.n_layer):
            ffn(layer, x)
        assert ffn.residency.resident_policy_bytes() <= (20 + 2 * CFG.n_layer) * PAGE
        assert ffn.residency.resident_measured_bytes() <= (20 + 2 * CFG.n_layer) * PAGE


def test_budget_below_non_ffn_weights_is_refused(path):
    model = load_modelfile(path)
    w = weight_bytes(model)
    assert w["ffn"] == CFG.n_layer * CFG.ffn_dim * 2 * CFG.n_embd
    assert w["other"] > 4 * CFG.n_embd ** 2 * CFG.n_layer              # attention matrices at least
    with pytest.raises(ValueError, match="the minimum is"):
        resident_sparse_ffn(model, lambda layer, x: np.arange(4, dtype=np.int32), max_resident_mb=1)


def test_mapping_resident_counts_the_model_file(path):
    model = load_modelfile(path)
    before = mapping_resident(path)
    model.forward([1, 2])
    after = mapping_resident(path)
    assert after > before and after >= w_other(model) * 0.5


def w_other(model):
    return weight_bytes(model)["other"]


def test_native_packed_loras_leave_the_process(path):
    """The native backend reads LoRAs from its packed copy alone at the VNNI level (csrc/nk_lora.c: decode,
    csrc/nk_prefill.c: prefill), so their file pages are given back at build (residency.drop_pages) and a
    prefill and steps do not fault them in again; a LoRA that does not pack (v1: 8 columns) is still read
    from the file. Pages shared with neighbouring tensors (the first and last) may stay."""
    from rwkv_edge.backends import native
    from rwkv_edge.memstat import resident_bytes
    if not native.available()[0] or native.level() != "vnni":
        pytest.skip("the packed LoRAs need the native backend's VNNI level")
    m = native.NativeRWKV7.open(path)
    lora = [m._t[f"blocks.1.att.{n}.qc"] for n in ("w1", "w2", "a1", "a2", "g1", "g2", "v2")]
    if resident_bytes(lora[0]) is None:
        pytest.skip("no /proc/self/pagemap")
    assert all(a.nbytes >= 4 * PAGE for a in lora)
    for toks in ([1, 2, 3, 4, 5, 6, 7, 8], [9], [10]):
        m.forward(toks)
        assert all(resident_bytes(a) <= 2 * PAGE for a in lora), [resident_bytes(a) for a in lora]
    v1 = m._t["blocks.1.att.v1.qc"]
    assert resident_bytes(v1) >= v1.nbytes - 2 * PAGE
    keep = np.arange(4 * PAGE, dtype=np.uint8)             # not a file mapping: left alone (DONTNEED would zero it)
    from rwkv_edge.residency import drop_pages
    assert drop_pages([keep]) == 0 and (keep == np.arange(4 * PAGE, dtype=np.uint8)).all()
