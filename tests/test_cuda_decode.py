"""The fused, capturable RWKV-7 decode step (backends/cuda_decode.py) against the numpy reference:
dense, exact-sparse and predicted-sparse (reference FFN restricted to the very sets the GPU used),
graph on and off, fp32 and fp16 weights; the device-side predictor mask against the numpy
predictor. Every test skips without a CUDA device (CI) or without Triton."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoints import make_checkpoint  # noqa: E402

import rwkv_edge  # noqa: E402

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except Exception:
    HAS_TRITON = False
pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                                reason="needs a CUDA device and Triton (run on a GPU machine)")
TOKENS = [3, 17, 250, 9, 44, 1, 128, 77]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cache = {}

    def make(dtype):
        if dtype not in cache:
            d = tmp_path_factory.mktemp(f"dec_{dtype}")
            cache[dtype] = str(make_checkpoint("x070", d / "m.pth", n_layer=3, n_embd=128, head_size=32,
                                               vocab_size=300, dtype=dtype))
        return cache[dtype]
    return make


def _models(path, dtype):
    from rwkv_edge.backends import cuda as C
    ref = rwkv_edge.load_model(path, backend="reference")
    C.set_dtype(dtype)
    try:
        gpu = rwkv_edge.load_model(path, backend="cuda")
    finally:
        C.set_dtype("fp32")
    return ref, gpu


def _bundle(ref, bits=2, group=32):
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    rng = np.random.default_rng(0)
    preds = []
    for b in ref.blocks:
        X = rng.standard_normal((64, ref.config.n_embd)).astype(np.float32)
        p = QuantizedPredictor.fit(b.ffn_key, bits, group)
        p.calibrate(X, np.maximum(X @ b.ffn_key.T, 0) ** 2, 0.95, "mass", 0.0)
        preds.append(p)
    return PredictorBundle(preds, ref.fingerprint, ref.config, "quantized", {})


@pytest.mark.parametrize("mode", ["dense", "exact", "predicted"])
@pytest.mark.parametrize("graph", [True, False])
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_fused_decode_matches_reference_with_the_same_sets(ckpt, mode, graph, dtype):
    """Logits and state after each token, within 1e-4 (relative to the logit scale) of the numpy
    reference whose FFN keeps exactly the neurons the GPU kept (k > 0 in the GPU's key buffer);
    weights stored in `dtype` in the file, so both sides use the same weights."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt({"fp32": "float32", "fp16": "float16"}[dtype]), dtype)
    dec = FusedDecode(gpu, mode=mode, bundle=_bundle(ref) if mode == "predicted" else None, graph=graph)
    st, worst = None, 0.0
    for t in TOKENS:
        lg = dec.step(t).cpu().numpy()
        kb = dec.kbuf.cpu().numpy()
        sets = [np.flatnonzero(kb[i] > 0) for i in range(ref.config.n_layer)]

        def keep(i, k, sets=sets):
            m = np.zeros_like(k)
            m[:, sets[i]] = 1.0
            return k * m
        ref.hooks.ffn_activation[:] = [keep]
        r, st = ref.step(t, st)
        worst = max(worst, float(np.abs(lg - r).max() / max(1.0, np.abs(r).max())))
    assert worst < 1e-4, worst
    s = dec.state()
    assert np.abs(s.wkv.cpu().numpy() - st.wkv).max() < 1e-4
    assert np.abs(s.ffn_x.cpu().numpy() - st.ffn_x).max() < 1e-4
    stats = dec.stats()
    assert stats["steps"] == len(TOKENS)
    if mode == "predicted":   # the predictor pruned something; active <= read
        assert stats["active_density"] <= stats["read_density"] < 1.0
    elif mode == "exact":
        assert stats["read_density"] == 1.0 and 0.2 < stats["active_density"] < 0.8
    else:                     # dense counts nothing
        assert stats["read_density"] == 1.0 and stats["active_density"] is None


def test_exact_equals_dense_and_the_unrestricted_reference(ckpt):
    """Exact sparse is lossless: same logits as dense (and as the plain numpy model) token by token."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, g1 = _models(ckpt("float16"), "fp16")
    _, g2 = _models(ckpt("float16"), "fp16")
    d, e = FusedDecode(g1, "dense"), FusedDecode(g2, "exact")
    st = None
    for t in TOKENS:
        a, b = d.step(t).cpu().numpy(), e.step(t).cpu().numpy()
        r, st = ref.step(t, st)
        assert np.abs(a - b).max() < 1e-4 and np.abs(b - r).max() < 1e-3


@pytest.mark.parametrize("words", [True, False])
def test_device_predictor_mask_matches_numpy(ckpt, words):
    """The predicted set (key buffer >= 0) equals the numpy predictor's mask on the same FFN inputs,
    except for scores within rounding of the threshold (at most 0.5% of the decisions); word-wise
    scores (score_perm, cuda_decode_score.py) and byte-wise ones."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    for bits, group in ((2, 32), (4, 64), (8, 128)):
        ref, gpu = _models(ckpt("float32"), "fp32")
        bundle = _bundle(ref, bits, group)
        xs = {}
        ref.hooks.ffn_input.append(lambda i, xk: xs.__setitem__(i, np.array(xk[0])))
        dec = FusedDecode(gpu, "predicted", bundle=bundle, tune={"score_perm": words})
        assert dec.words == words
        st, bad, tot = None, 0, 0
        for t in TOKENS:
            dec.step(t)
            kb = dec.kbuf.cpu().numpy()
            ref.hooks.ffn_activation[:] = [lambda i, k, kb=kb: k * (kb[i] > 0)]
            _, st = ref.step(t, st)
            for i, p in enumerate(bundle.predictors):
                want = p.score(xs[i][None])[0] >= p.calib.threshold
                bad += int(((kb[i] >= 0) != want).sum())
                tot += want.size
        assert bad <= 0.005 * tot, (bits, bad, tot)


def test_rebinding_keeps_the_generic_path(ckpt):
    """After FusedDecode rebinds the weights to stacked views, model.forward gives the same logits."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt("float16"), "fp16")
    before, _ = gpu.forward(TOKENS)
    FusedDecode(gpu, "dense", graph=False)
    after, _ = gpu.forward(TOKENS)
    assert np.abs(before - after).max() < 1e-5


def test_bad_arguments(ckpt):
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt("float32"), "fp32")
    with pytest.raises(ValueError, match="unknown mode"):
        FusedDecode(gpu, "fast")
    with pytest.raises(ValueError, match="needs a predictor bundle"):
        FusedDecode(gpu, "predicted")
    with pytest.raises(ValueError, match="cuda backend"):
        FusedDecode(ref, "dense")


def test_predicted_with_a_width_that_is_not_a_power_of_two(tmp_path):
    """n_embd 192: the predictor kernel takes its group-by-group path; same check as above."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    path = str(make_checkpoint("x070", tmp_path / "m.pth", n_layer=2, n_embd=192, head_size=32, vocab_size=300,
                               dtype="float16"))
    ref, gpu = _models(path, "fp16")
    dec = FusedDecode(gpu, "predicted", bundle=_bundle(ref, 2, 64))
    st = None
    for t in TOKENS:
        lg = dec.step(t).cpu().numpy()
        kb = dec.kbuf.cpu().numpy()
        ref.hooks.ffn_activation[:] = [lambda i, k, kb=kb: k * (kb[i] > 0)]
        r, st = ref.step(t, st)
        assert np.abs(lg - r).max() < 1e-4 * max(1.0, np.abs(r).max())
    assert dec.stats()["read_density"] < 1.0


@pytest.mark.parametrize("mode", ["dense", "exact", "predicted"])
def test_launch_options_do_not_change_the_numbers(ckpt, mode):
    """Programmatic dependent launch off, the sparse value rows in their own launch (not inside the
    key kernel), the masked-tile (not gathered) sparse kernel, one gathered row at a time, the FFN
    mix in its own launch, the split-K value pass, the selected rows' value rows loaded with their
    W_k rows, the persistent pipelined exact kernel (ffn_pipe: several tiles per program, deferred
    value sums, fused mix), L2 eviction hints off (and 16-row predicted key programs; and the
    gathered predicted programs that a model too large for L2 gets by default), the other predictor
    scores (word- or byte-wise, in the masked-tile and the gathered kernel) and the looped
    (not whole-width) tiles give the same logits and state as the default launch, token by token,
    and the separate value launch lists exactly the k > 0 rows."""
    from rwkv_edge.backends.cuda_decode import TUNE, FusedDecode
    ref, _ = _models(ckpt("float16"), "fp16")
    b = _bundle(ref) if mode == "predicted" else None
    other = not TUNE["score_perm"]    # the predictor scores the default does not use (word- or byte-wise)
    decs = [FusedDecode(_models(ckpt("float16"), "fp16")[1], mode, bundle=b, tune=t)
            for t in ({}, {"pdl": False}, {"fused_value": False, "gather_na": 0},
                      {"fused_value": False, "full_k": 64, "gemv_bk": 32,
                      "key_bk": 64, "value_bs": 8, "value_bd": 32, "value_per_sm": 1},
                      {"full_k": 64, "key_bk": 64, "key_value_bd": 32, "fused_key_bn": 4},
                      {"fuse_ffn_mix": True, "gather_na": 4}, {"fuse_ffn_mix": True},
                      {"gather_na": 1, "sparse_bn": 32, "sparse_warps": 4},
                      {"gather_na": 2, "sparse_bn": 8, "pdl": False}, {"split_value": [64, 32]},
                      {"value_on_sel": True, "fused_key_bn": 8}, {"fused_key_bn": 32, "key_warps": 8},
                      {"pipe_bn": 8, "pipe_per_sm": 0.05, "pipe_stages": 1},
                      {"pipe_bn": 4, "pipe_per_sm": 0.1, "pipe_defer": True, "fuse_ffn_mix": True, "pipe_warps": 4},
                      {"pipe_bn": 16, "pdl": False, "evict_stream": "evict_first", "evict_value": "evict_last",
                       "evict_key": "evict_last"},
                      {"evict_auto_l2x": 0, "pred_key_bn": 16, "gather_na": 0}, {"evict_auto_l2x": 0},
                      {"score_perm": other}, {"score_perm": other, "gather_na": 8})]
    assert decs[5].mixin and decs[6].mixin == (mode == "dense") and not decs[0].mixin
    assert decs[7].gather == (mode != "dense")
    assert decs[10].vsel == (mode == "predicted")
    assert all(d.pipe == (mode == "exact") for d in decs[12:15]) and not decs[0].pipe
    assert decs[13].mixin == (mode != "predicted") and decs[12].pipe_grid < 16   # several tiles a program
    # L2 hints: on by default for a model whose weights fit in L2, off with evict_auto_l2x 0
    assert decs[0].tune["evict_value"] == "evict_last" and decs[15].tune["evict_stream"] == ""
    # gathered predicted programs (8 rows at a time) by default where the weights do not fit in L2
    assert decs[16].gather == (mode == "predicted") and not decs[15].gather and not decs[0].gather
    assert decs[17].words == decs[18].words == (mode == "predicted" and other) and decs[18].gather == (mode != "dense")
    for t in TOKENS:
        outs = [d.step(t).cpu().numpy() for d in decs]
        for j, o in enumerate(outs[1:], 1):
            assert np.abs(o - outs[0]).max() < 1e-4 * max(1.0, np.abs(outs[0]).max()), (j, t)
        sts = [d.state() for d in decs]
        for s in sts[1:]:
            for f in ("att_x", "ffn_x", "wkv"):
                assert torch.allclose(getattr(s, f), getattr(sts[0], f), atol=1e-4, rtol=1e-4), f
        if mode != "dense":
            for d in decs[2:4]:   # the list of active rows for the separate value launch
                kb, n = d.kbuf.cpu().numpy(), d.slot.cpu().numpy()[:, 1]
                for i in range(ref.config.n_layer):
                    want = np.flatnonzero(kb[i] > 0)
                    assert n[i] == want.size
                    assert np.array_equal(np.sort(d.idx[i, :n[i]].cpu().numpy()), want)
    if mode != "dense":   # every variant counted the same active rows (up to sign flips of ~0 keys)
        dens = [d.stats()["active_density"] for d in decs]
        assert max(dens) - min(dens) <= 0.002, dens
