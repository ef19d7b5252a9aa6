"""Early scores as int dot products (tune early_dp4a, backends/cuda_decode_score.py): the LN1 mix launch
writes an int8 copy of the scored vector (per group of GS columns x_q = round(x * 127 / amax), a float step
amax / 127 and the exact float group sum), the scorers take 4 codes a dp4a. That changes the scores'
rounding (x is quantized), so the checks are:
  - the repacked code words hold the same codes (CPU, runs in CI);
  - the device's int8 copy equals the numpy emulation of quant_x on the device's own vector;
  - the device mask equals the emulated int8 scores' mask, except within float rounding of the threshold;
  - against the float (numpy) predictor, at most 2e-3 of the decisions flip, and only rows whose float
    score is within the quantization's worst-case error of the threshold:
        |score_int8 - score| <= sum_g scale_jg * step_g / 2 * sum(codes_jg)   (|x - step x_q| <= step / 2);
  - logits and state within 1e-4 of the reference restricted to the GPU's sets (as every early test).
The GPU tests skip without a CUDA device (CI) or without Triton."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_cuda_decode import HAS_TRITON, TOKENS, _bundle, _models  # noqa: E402
from test_cuda_decode_early import _early_diag_bundle, _run, ckpt  # noqa: E402,F401

GPU = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                         reason="needs a CUDA device and Triton (run on a GPU machine)")


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_repack_dp4a_holds_the_codes(bits):
    """Byte i of word w holds at bits BITS*k the code of column w*4*PER + 4k + i (CPU)."""
    from rwkv_edge.backends.cuda_decode_score import repack_dp4a
    per, F, D = 8 // bits, 5, 128
    codes = np.random.default_rng(bits).integers(0, 1 << bits, (F, D))
    q = np.zeros((F, D // per), np.uint8)
    for s in range(per):
        q |= (codes[:, s::per] << (bits * s)).astype(np.uint8)
    w = repack_dp4a(torch.from_numpy(q), bits).numpy().view(np.uint32)
    assert w.shape == (F, D // (4 * per))
    for k in range(per):
        for i in range(4):
            got = (w >> (8 * i + bits * k)) & ((1 << bits) - 1)
            assert np.array_equal(got, codes[:, 4 * k + i::4 * per])


def _quant(eq, D, G):
    """The device's quant_x buffer (D / 4 int32 words, G steps, G sums) -> int8 codes (D,), steps, sums."""
    return (eq[:D // 4].view(np.int32).view(np.int8).astype(np.int32), eq[D // 4:D // 4 + G],
            eq[D // 4 + G:D // 4 + 2 * G])


def _check_scores(p, x, eq, mk, thr):
    """One layer: the device's int8 copy against quant_x_ref(x), its mask against the emulated int8
    scores (off only within 1e-5 of the threshold) and against the float scores (off only within the
    quantization bound). Returns the number of decisions that differ from the float scores."""
    from rwkv_edge.backends.cuda_decode_score import quant_x_ref
    qm = p.qm
    D, gs = x.size, qm.group_size or x.size
    xq, sx, xs = _quant(eq, D, D // gs)
    rq, rsx, rxs = quant_x_ref(x, gs)
    assert np.abs(xq - rq).max() <= 1 and (xq != rq).mean() <= 1e-3     # round-half ties may differ by 1 ulp
    np.testing.assert_allclose(sx, rsx, rtol=1e-6)
    np.testing.assert_allclose(xs, rxs, rtol=1e-5, atol=1e-5 * np.abs(x).sum())
    codes = qm.codes().astype(np.float64).reshape(-1, D // gs, gs)             # (F, G, GS)
    scale, zero = qm.scale.astype(np.float64), qm.zero.astype(np.float64)       # (F, G)
    idot = (codes * xq.reshape(D // gs, gs)).sum(2)
    emu = (scale * idot * sx + zero * xs).sum(1)
    tol = 1e-5 * max(1.0, np.abs(emu).max())
    sel = mk == 2
    assert np.all((sel == (emu >= thr)) | (np.abs(emu - thr) <= tol))
    ref = p.qm.matvec(x[None].astype(np.float32))[0].astype(np.float64)
    bound = (np.abs(scale) * sx / 2 * codes.sum(2)).sum(1) + tol
    flip = sel != (ref >= thr)
    assert np.all(np.abs(ref[flip] - thr) <= bound[flip])
    return int(flip.sum())


@GPU
@pytest.mark.parametrize("early", [1, 2, 3])
def test_dp4a_scores_of_ln1(ckpt, early):  # noqa: F811
    """Scores of the LN1 output (a plain bundle on the early path), every host launch of the scores."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt, "fp16")
    bundle = _bundle(ref)
    dec = FusedDecode(gpu, "predicted", bundle=bundle, tune={"early_scores": early, "early_dp4a": True})
    assert dec.dp4a and dec.early == early
    worst, bad, st = _run(dec, ref, bundle)       # bad: decisions off the float scores of the reference
    assert worst < 1e-4 and bad <= 5e-3, (worst, bad)
    ln1, eq, mk = dec.st.att_x.cpu().numpy(), dec.eq.cpu().numpy(), dec.emask.cpu().numpy()
    for i, p in enumerate(bundle.predictors):     # the last token: device vector, copy and mask
        _check_scores(p, ln1[i], eq[i], mk[i], p.calib.threshold)
    assert np.abs(dec.state().ffn_x.cpu().numpy() - st.ffn_x).max() < 1e-4


@GPU
@pytest.mark.parametrize("tune", [{}, {"early_scores": 3}, {"early_scores": 1, "fuse_ffn_mix": False},
                                  {"early_ready": 1}, {"evict_auto_l2x": 0},
                                  pytest.param({"evict_auto_l2x": 0, "early_pf": 3}, id="early_pf")])
def test_dp4a_scores_of_an_early_bundle(ckpt, tune):  # noqa: F811
    """An early diag bundle (the LN1 mix quantizes z): every token's int8 copy and mask checked against
    the emulation and the float predictor; logits within 1e-4 of the reference on the GPU's sets."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt, "fp16")
    bundle = _early_diag_bundle(ref)
    dec = FusedDecode(gpu, "predicted", bundle=bundle, tune=dict(tune, early_dp4a=True))
    assert dec.dp4a and dec.ez is not None
    big = "evict_auto_l2x" in tune     # EARLY_BUNDLE_AUTO: the rule for weights that stream from HBM, else 2 warps
    want = (4, False) if big else (2, True)
    assert (dec.tune["early_warps"], dec.tune["early_vsel"], dec.ready) == want + (tune.get("early_ready", 0),)
    if big:   # and from HBM evict_first on the GEMV tiles only, the W_k prefetch (early_pf 1) unless the tune sets it
        hbm = tuple(dec.tune[k] for k in ("evict_stream", "evict_key", "evict_value", "early_pf"))
        assert hbm == ("evict_first", "", "", tune.get("early_pf", 1)), hbm
    st, worst, flips, tot = None, 0.0, 0, 0
    for t in TOKENS:
        lg = dec.step(t).cpu().numpy()
        kb, ez, eq = dec.kbuf.cpu().numpy(), dec.ez.cpu().numpy(), dec.eq.cpu().numpy()
        mk = np.where(kb >= 0, 2, 1)                 # the rows the FFN took (also with early_ready)
        ref.hooks.ffn_activation[:] = [lambda i, k, kb=kb: k * (kb[i] > 0)]
        r, st = ref.step(t, st)
        worst = max(worst, float(np.abs(lg - r).max() / max(1.0, np.abs(r).max())))
        for i, p in enumerate(bundle.predictors):
            flips += _check_scores(p, ez[i], eq[i], mk[i], p.calib.threshold)
            tot += mk[i].size
    ref.hooks.ffn_activation[:] = []
    assert worst < 1e-4 and flips / tot <= 5e-3, (worst, flips / tot)
    assert np.abs(dec.state().wkv.cpu().numpy() - st.wkv).max() < 1e-4
    assert dec.stats().get("early_timeouts", 0) == 0


@GPU
def test_dp4a_refuses_what_it_cannot_run(ckpt):  # noqa: F811
    """8-bit codes (no word of 4 codes a byte) are refused; without early scores the knob does nothing."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    ref, gpu = _models(ckpt, "fp16")
    with pytest.raises(ValueError, match="early_dp4a"):
        FusedDecode(gpu, "predicted", bundle=_bundle(ref, bits=8), tune={"early_scores": 2, "early_dp4a": True})
    dec = FusedDecode(_models(ckpt, "fp16")[1], "predicted", bundle=_bundle(ref), tune={"early_dp4a": True})
    assert not dec.early and not dec.dp4a
