"""Early predictor scores of the fused decode (tune early_scores, backends/cuda_decode_early.py): the
device mask equals the numpy predictor's mask on the same early input (layer L's LN1 output, which the
reference leaves in its state's att_x[L]), and the logits equal the numpy reference whose FFN keeps
exactly the neurons the GPU kept, for every host launch of the scores and the FFN kernel's launch
options. Every test skips without a CUDA device (CI) or without Triton."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoints import make_checkpoint  # noqa: E402
from test_cuda_decode import HAS_TRITON, TOKENS, _bundle, _models  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                                reason="needs a CUDA device and Triton (run on a GPU machine)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("x070", tmp_path_factory.mktemp("early") / "m.pth", n_layer=3, n_embd=128,
                               head_size=32, vocab_size=300, dtype="float16"))


def _run(dec, ref, bundle):
    """Step both token by token; returns the worst logit error (relative to the logit scale) and the
    share of mask decisions that differ from numpy (scores within rounding of the threshold). Mask bytes:
    2 selected, 1 not; early_ready: every byte back to 0 after the step, the FFN's set in kbuf (>= 0)."""
    st, worst, bad, tot = None, 0.0, 0, 0
    for t in TOKENS:
        lg = dec.step(t).cpu().numpy()
        kb, mk = dec.kbuf.cpu().numpy(), dec.emask.cpu().numpy()
        if dec.ready:
            assert not mk.any()                                      # reset by ffn_early for the next step
            mk = np.where(kb >= 0, 2, 1)
        ref.hooks.ffn_activation[:] = [lambda i, k, kb=kb: k * (kb[i] > 0)]
        r, st = ref.step(t, st)
        worst = max(worst, float(np.abs(lg - r).max() / max(1.0, np.abs(r).max())))
        for i, p in enumerate(bundle.predictors):
            assert np.array_equal(kb[i] >= 0, mk[i] == 2)          # the FFN used exactly the mask
            want = p.score(np.asarray(st.att_x[i], np.float32)[None])[0] >= p.calib.threshold
            bad += int(((mk[i] == 2) != want).sum())
            tot += want.size
    return worst, bad / tot, st


def _run_checked(dec, ref, bundle):
    """_run, then: logits within 1e-4, <= 0.5% of mask decisions off numpy's, wkv and FFN shift state
    within 1e-4 of the reference."""
    worst, bad, st = _run(dec, ref, bundle)
    assert worst < 1e-4 and bad <= 0.005, (worst, bad)
    s = dec.state()
    assert np.abs(s.wkv.cpu().numpy() - st.wkv).max() < 1e-4
    assert np.abs(s.ffn_x.cpu().numpy() - st.ffn_x).max() < 1e-4


@pytest.mark.parametrize("early", [1, 2, 3])
@pytest.mark.parametrize("graph", [True, False])
def test_early_scores_match_reference(ckpt, early, graph):
    """Scores of the LN1 output in the att_head launch (1), the GEMV launch (2) or their own launch (3):
    the mask equals numpy's on st.att_x (<= 0.5% of decisions, at the threshold), logits and state
    within 1e-4 of the reference restricted to the GPU's sets, and the predictor pruned something."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt, "fp16")
    bundle = _bundle(ref)
    dec = FusedDecode(gpu, "predicted", bundle=bundle, graph=graph, tune={"early_scores": early})
    assert dec.early == early and not dec.gather
    _run_checked(dec, ref, bundle)
    stats = dec.stats()
    assert stats["active_density"] <= stats["read_density"] < 1.0


def test_early_ffn_options_do_not_change_the_numbers(ckpt):
    """The early FFN's launch options (32-row programs gathering 8 rows at a time or one, value rows only
    of the active rows, 2 rows at a time, 8 warps, 16-row scoring programs, PDL off, the LN2 mix inside
    the FFN launch) give the same masks, logits and state as the default early launch (8-row masked
    tiles for a model that fits in L2), token by token."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, _ = _models(ckpt, "fp16")
    b = _bundle(ref)
    tunes = ({}, {"early_na": 8, "early_ffn_bn": 32}, {"early_na": 1, "early_ffn_bn": 32}, {"early_vsel": False},
             {"early_ffn_bn": 8, "early_na": 2},
             {"early_warps": 8, "early_bn": 16, "early_scores": 2}, {"pdl": False, "early_scores": 3},
             {"early_scores": 2, "fuse_ffn_mix": True},
             {"early_scores": 3, "fuse_ffn_mix": True, "early_na": 0, "early_ffn_bn": 8})
    decs = [FusedDecode(_models(ckpt, "fp16")[1], "predicted", bundle=b, tune=dict({"early_scores": 1}, **t))
            for t in tunes]
    assert decs[0].tune["early_na"] == 0 and decs[0].tune["early_ffn_bn"] == 8   # auto: fits in L2
    assert [d.mixin for d in decs] == [False] * 7 + [True] * 2 and [d.early for d in decs][-4:] == [2, 3, 2, 3]
    for t in TOKENS:
        outs = [d.step(t).cpu().numpy() for d in decs]
        masks = [d.emask.cpu().numpy() for d in decs]
        for j, o in enumerate(outs[1:], 1):
            assert np.abs(o - outs[0]).max() < 1e-4 * max(1.0, np.abs(outs[0]).max()), (j, t)
            assert np.mean(masks[j] != masks[0]) <= 0.005, (j, t)
        sts = [d.state() for d in decs]
        for s in sts[1:]:
            for f in ("att_x", "ffn_x", "wkv"):
                assert torch.allclose(getattr(s, f), getattr(sts[0], f), atol=1e-4, rtol=1e-4), f
    dens = [d.stats()["active_density"] for d in decs]
    assert max(dens) - min(dens) <= 0.002, dens


def test_early_scores_only_where_they_apply(ckpt):
    """Dense and exact ignore early_scores (no mask buffer either)."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    _, gpu = _models(ckpt, "fp16")
    for mode in ("dense", "exact"):
        d = FusedDecode(gpu, mode, tune={"early_scores": 1}, graph=False)
        assert d.early == 0 and d.emask.numel() == 1


@pytest.mark.parametrize("early,graph,tune", [
    (2, True, {"fuse_ffn_mix": True}), (2, False, {"fuse_ffn_mix": True}), (1, True, {}), (3, False, {}),
    (2, True, {"fuse_ffn_mix": True, "early_na": 8, "early_ffn_bn": 32, "early_nap": 100}),
    (2, False, {"pdl": False}), (2, True, {"fuse_ffn_mix": True, "early_spin": 0}),
    (2, True, {"fuse_ffn_mix": True, "early_ready": 2}), (1, False, {"early_ready": 2, "early_nap": 1000})])
def test_early_ready_matches_reference(ckpt, early, graph, tune):
    """early_ready (the mask bytes are per-row ready flags that ffn_early polls; no launch waits before it
    triggers; 2: the FFN triggers before its polls): for every host of the scores, graph on and off, two
    runs with reset() between, the FFN's sets equal numpy's masks (<= 0.5%), logits and state within 1e-4
    of the reference, every mask byte back to 0 after each step, and no poll ran out. early_spin 0 (one
    read, no polls): a program that finds its bytes incomplete counts it and reads the mask again after
    its wait, so the numbers hold."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt, "fp16")
    bundle = _bundle(ref)
    dec = FusedDecode(gpu, "predicted", bundle=bundle, graph=graph,
                      tune=dict({"early_ready": 1}, **tune, early_scores=early))
    assert dec.early == early and dec.ready == tune.get("early_ready", 1)
    for _ in range(2):
        dec.reset(None)
        _run_checked(dec, ref, bundle)
    stats = dec.stats()
    assert stats["active_density"] <= stats["read_density"] < 1.0
    if tune.get("early_spin", 1):
        assert stats["early_timeouts"] == 0, stats
    else:
        print("early_spin 0: incomplete first reads", stats["early_timeouts"])


def _early_diag_bundle(ref, share=0.3):
    """An early bundle (EarlyPredictor with a diagonal map, input "early") for the test model: d and c
    random around the crude map xk ~ (1 - mix) ln1, thresholds at a share of the scores of the reference's
    own early inputs over TOKENS, so both sides decide near, not at, the threshold."""
    import dataclasses
    import types

    from rwkv_edge.predictors.early import EarlyPredictor
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    rng = np.random.default_rng(1)
    preds = []
    for b in ref.blocks:
        mix = np.asarray(b.ffn_xk, np.float32).reshape(-1)
        d = (1 - mix) * rng.uniform(0.8, 1.2, mix.size)
        c = 0.05 * rng.standard_normal(mix.size)
        preds.append(EarlyPredictor(d, c, mix, QuantizedPredictor.fit(b.ffn_key, 2, 32).qm))
    xs, st = [[] for _ in preds], None
    for t in TOKENS:
        prev = None if st is None else np.array(st.ffn_x)
        _, st = ref.step(t, st)
        for i in range(len(preds)):
            pv = np.zeros_like(st.ffn_x[i]) if prev is None else prev[i]
            xs[i].append(np.concatenate([st.att_x[i], pv]).astype(np.float32))
    for i, p in enumerate(preds):
        sc = p.score(np.stack(xs[i]))
        p.calib = dataclasses.replace(p.calib, threshold=float(np.quantile(sc, 1 - share)))
    return types.SimpleNamespace(predictors=preds, input="early")


@pytest.mark.parametrize("tune", [{}, {"early_scores": 3}, {"early_scores": 1, "fuse_ffn_mix": False}])
@pytest.mark.parametrize("graph", [True, False])
def test_early_bundle_scores_z_like_the_numpy_predictor(ckpt, tune, graph):
    """An early bundle with a diagonal map (the LN1 mix writes z = ln1 * d + c + mix * prev): the device
    mask equals EarlyPredictor.mask on [ln1, prev] of the reference (prev = the FFN shift state before the
    token; <= 0.5% of decisions, at the threshold), z equals the predictor's xk_hat, logits and state within
    1e-4 of the reference restricted to the GPU's sets; a full (D, D) map is refused."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt, "fp16")
    bundle = _early_diag_bundle(ref)
    dec = FusedDecode(gpu, "predicted", bundle=bundle, graph=graph, tune=tune)
    assert dec.early == tune.get("early_scores", 2) and dec.ez is not None
    st, worst, bad, tot = None, 0.0, 0, 0
    for t in TOKENS:
        prev = np.zeros_like(dec.ez.cpu().numpy()) if st is None else np.array(st.ffn_x)
        lg = dec.step(t).cpu().numpy()
        kb, mk, ez = dec.kbuf.cpu().numpy(), dec.emask.cpu().numpy(), dec.ez.cpu().numpy()
        ref.hooks.ffn_activation[:] = [lambda i, k, kb=kb: k * (kb[i] > 0)]
        r, st = ref.step(t, st)
        worst = max(worst, float(np.abs(lg - r).max() / max(1.0, np.abs(r).max())))
        for i, p in enumerate(bundle.predictors):
            x = np.concatenate([st.att_x[i], prev[i]]).astype(np.float32)[None]
            np.testing.assert_allclose(ez[i], p.xk_hat(x)[0], atol=1e-4 * max(1.0, np.abs(ez[i]).max()))
            assert np.array_equal(kb[i] >= 0, mk[i] == 2)     # bytes: 1 scored, 2 selected
            bad += int(((mk[i] == 2) != p.mask(x)[0]).sum())
            tot += mk[i].size
    ref.hooks.ffn_activation[:] = []
    assert worst < 1e-4 and bad / tot <= 0.005, (worst, bad / tot)
    s = dec.state()
    assert np.abs(s.ffn_x.cpu().numpy() - st.ffn_x).max() < 1e-4
    assert np.abs(s.wkv.cpu().numpy() - st.wkv).max() < 1e-4
    stats = dec.stats()
    assert 0.1 < stats["read_density"] < 0.6 and stats["active_density"] <= stats["read_density"]
    from rwkv_edge.predictors.early import EarlyPredictor
    full = [EarlyPredictor(np.diag(p.d), p.c, p.mix, p.qm) for p in bundle.predictors]
    import types
    with pytest.raises(ValueError, match="diagonal map"):
        FusedDecode(_models(ckpt, "fp16")[1], "predicted", bundle=types.SimpleNamespace(predictors=full, input="early"))
