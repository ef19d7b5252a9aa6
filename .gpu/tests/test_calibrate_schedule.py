"""Per-layer percentile thresholds (the seed's schedule) and recalibrating a fitted bundle."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.predictors.calibrate import seed_schedule, threshold_for_percentile, topk_for_percentile
from rwkv_edge.predictors.collect import collect, labels, load_layer
from rwkv_edge.predictors.fit import fit, recalibrate


def test_threshold_for_percentile_predicts_that_share_inactive():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((200, 64)).astype(np.float32)
    act = np.maximum(scores + 0.3 * rng.standard_normal((200, 64)), 0).astype(np.float32) ** 2
    for pct in (0.5, 0.85, 0.95):
        c = threshold_for_percentile(scores, act, pct)
        assert abs(c.percentile - pct) <= 1.0 / scores.size + 1e-9
        pred = scores >= np.float32(c.threshold)
        assert c.recall == pytest.approx(act[pred].sum() / act.sum(), rel=1e-6)
    assert threshold_for_percentile(scores, act, 0.95).recall < threshold_for_percentile(scores, act, 0.5).recall
    with pytest.raises(ValueError):
        threshold_for_percentile(scores, act, 1.0)
    c = topk_for_percentile(scores, act, 0.75)                  # top-k predictors: k = 25% of 64
    assert c.k == 16 and c.percentile == 0.75 and 0 < c.recall < threshold_for_percentile(scores, act, 0.5).recall


def test_seed_schedule_maps_the_24_layer_seed():
    s = seed_schedule(24)
    assert s[:5] == [0.95] * 5 and s[5] == 0.85 and s[-1] == 0.80 and s[-4] == 0.85 and len(s) == 24
    assert seed_schedule(6) == [0.95, 0.85, 0.85, 0.85, 0.85, 0.80]
    assert seed_schedule(1) == [0.95] and len(seed_schedule(12)) == 12


def test_recalibrate_sets_targets_and_percentiles_on_the_fit_split(tiny_ckpt, tmp_path):
    model = rwkv_edge.load_model(tiny_ckpt("x070"))
    toks = np.random.default_rng(1).integers(0, 256, 1200).tolist()
    collect(model, toks, tmp_path / "c", chunk=256, progress=False)
    b = fit(model, str(tmp_path / "c"), "quantized", bits=2, group_size=16, target=0.9, heldout_frac=0.25,
            progress=False)
    t09 = [p.calib.threshold for p in b.predictors]
    recalibrate(b, model, str(tmp_path / "c"), target=0.9, heldout_frac=0.25)
    assert [p.calib.threshold for p in b.predictors] == t09          # same rows, same answer as fit
    recalibrate(b, model, str(tmp_path / "c"), target=0.99, heldout_frac=0.25)
    assert all(p.calib.threshold <= t for p, t in zip(b.predictors, t09))
    pcts = [0.9, 0.6]
    recalibrate(b, model, str(tmp_path / "c"), percentiles=pcts, heldout_frac=0.25)
    n = len(toks)
    for layer, p in enumerate(b.predictors):
        x = load_layer(str(tmp_path / "c"), layer, start=n - n // 4)
        assert 1.0 - b.predict(layer, x).mean() == pytest.approx(pcts[layer], abs=0.01)
        assert p.calib.recall == pytest.approx(float((labels(model, layer, x)[1] * b.predict(layer, x)).sum()
                                                     / labels(model, layer, x)[1].sum()), rel=1e-5)
    with pytest.raises(ValueError):
        recalibrate(b, model, str(tmp_path / "c"), percentiles=[0.9])
