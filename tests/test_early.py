"""Early FFN-set predictors (predictors/early.py) and the hook points they read (att_input, ffn_shift)."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.predictors.base import LayerPredictor
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.predictors.calibrate import threshold_for_target
from rwkv_edge.predictors.collect import labels
from rwkv_edge.predictors.early import (AffineQuantizedPredictor, EarlyMoments, MaskedFFN, ShiftEarlyPredictor,
                                        capture, input_predict)
from rwkv_edge.predictors.quantized import QuantizedPredictor
from rwkv_edge.sparse import SparseFFN

RNG = np.random.default_rng(0)
TRAIN = RNG.integers(1, 256, 1536)
HELD = RNG.integers(1, 256, 512)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return rwkv_edge.load_model(tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16), backend="reference")


def _rows(model, tokens):
    out = [{} for _ in model.blocks]

    def keep(layer, rows):
        for k, v in rows.items():
            out[layer].setdefault(k, []).append(v)

    capture(model, tokens, keep, chunk=128)
    return [{k: np.concatenate(v) for k, v in d.items()} for d in out]


@pytest.fixture(scope="module")
def fitted(model):
    """(moments of xk on ln1, moments of the channel-mix input on ln1, held-out rows per layer)."""
    mom = EarlyMoments(model.config, "ln1")
    mom_n = EarlyMoments(model.config, "ln1", target="norm")
    capture(model, TRAIN, lambda layer, rows: (mom.add(layer, rows), mom_n.add(layer, rows)), chunk=128)
    return mom, mom_n, _rows(model, HELD)


def test_hooks_see_consistent_vectors_and_do_not_change_logits(model):
    want, _ = model.forward(HELD[:40].tolist(), full_output=True)
    rows = _rows(model, HELD[:40])                    # windows of 128: one window here
    got, _ = model.forward(HELD[:40].tolist(), full_output=True)
    assert np.abs(got - want).max() == 0.0            # the hooks were removed and only observed
    ops = model.ops
    for i, r in enumerate(rows):
        b = model.blocks[i]
        np.testing.assert_allclose(r["ln1"], ops.layer_norm(r["resid"], b.ln1_w, b.ln1_b), atol=1e-5)
        np.testing.assert_array_equal(r["prev"][1:], r["norm"][:-1])       # token shift: the previous row
        assert np.abs(r["prev"][0]).max() == 0.0                           # fresh state
        np.testing.assert_allclose(r["ffn"], r["norm"] + (r["prev"] - r["norm"]) * b.ffn_xk, atol=1e-6)


def test_least_squares_map_recovers_a_known_affine_map(model):
    D = model.config.n_embd
    A, c = RNG.normal(size=(D, D)) / 8, RNG.normal(size=D)
    mom = EarlyMoments(model.config, "resid")
    for _ in range(4):
        e = RNG.normal(size=(256, D))
        mom.add(0, {"resid": e, "ffn": e @ A + c})
    A2, c2 = mom.solve(0, ridge=0.0)
    np.testing.assert_allclose(A2, A, atol=1e-8)
    np.testing.assert_allclose(c2, c, atol=1e-8)


@pytest.mark.parametrize("early", ["ln1", "ln1+shift"])
def test_early_predictor_meets_its_calibrated_recall_on_labels(model, fitted, early):
    mom, mom_n, held = fitted
    half = len(HELD) // 2
    for i, b in enumerate(model.blocks):
        r = held[i]
        cal = {k: v[:half] for k, v in r.items()}
        ev = {k: v[half:] for k, v in r.items()}
        _, act_cal = labels(model, i, cal["ffn"])
        active, act_ev = labels(model, i, ev["ffn"])
        if early == "ln1":
            A, c = mom.solve(i)
            p = AffineQuantizedPredictor.fit_early(b.ffn_key, A, c, "ln1", 2, 64, cal["ln1"], act_cal, 0.99)
            p.calibrate(cal["ln1"], act_cal, 0.99)
            pred = p.mask(ev["ln1"])
        else:
            p = ShiftEarlyPredictor.fit(mom_n, i, b.ffn_xk, QuantizedPredictor.fit(b.ffn_key, 2, 64, 2.0).qm)
            p.calibrate(cal, act_cal, 0.99)
            pred = p.mask_rows(ev)
        assert p.calib.recall >= 0.99                                       # on the calibration rows
        mass = act_ev[pred].sum() / act_ev.sum()                            # on rows it never saw
        assert mass >= 0.95, (i, mass)
        assert pred.mean() < 0.9                                            # it does select
        assert (pred & active).sum() / active.sum() > 0.8


def test_affine_predictor_round_trips_through_arrays(model, fitted):
    mom, _, held = fitted
    A, c = mom.solve(1)
    p = AffineQuantizedPredictor.fit(model.blocks[1].ffn_key @ A.T, model.blocks[1].ffn_key @ c, "ln1", 2, 64, 2.0)
    p.calib = threshold_for_target(p.score(held[1]["ln1"]), labels(model, 1, held[1]["ffn"])[1], 0.99)
    q = LayerPredictor.from_arrays(p.to_arrays("L1"), "L1")
    assert (q.input, q.clip, q.calib) == ("ln1", 2.0, p.calib)
    np.testing.assert_array_equal(q.mask(held[1]["ln1"]), p.mask(held[1]["ln1"]))


def test_masked_run_with_true_sets_is_dense_and_matches_the_sparse_ffn(model, fitted):
    toks = HELD[:64].tolist()
    want, _ = model.forward(toks, full_output=True)
    Ks = [np.asarray(b.ffn_key, np.float32) for b in model.blocks]
    exact = MaskedFFN(lambda layer, rows: rows["ffn"] @ Ks[layer].T > 0, model.config.ffn_dim)
    got, _ = exact.attach(model).forward(toks, full_output=True)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    # a bundle of FFN-input predictors: the hook pair and SparseFFN (numpy path) run the same sets
    preds = [QuantizedPredictor.fit(b.ffn_key, 2, 64, 2.0) for b in model.blocks]
    for i, p in enumerate(preds):
        p.calibrate(fitted[2][i]["ffn"], labels(model, i, fitted[2][i]["ffn"])[1], 0.95)
    bundle = PredictorBundle(preds, model.fingerprint, model.config, "quantized", 2, 0.95)
    masked = MaskedFFN(input_predict(preds, "ffn"), model.config.ffn_dim)
    got, _ = masked.attach(model).forward(toks, full_output=True)
    sp = SparseFFN(model, bundle, fused=False)
    ref, _ = model.with_ffn(sp).forward(toks, full_output=True)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert masked.n_active == sp.n_active and 0 < masked.density < 1
    assert np.abs(got - want).max() > 1e-6                                # the sets are not all-active
