"""Early FFN-set predictors (predictors/early.py) and the hook points they read (att_input, ffn_shift)."""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.predictors.base import LayerPredictor
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.predictors.calibrate import threshold_for_target
from rwkv_edge.predictors.collect import labels
from rwkv_edge.predictors.early import (AffineQuantizedPredictor, EarlyMoments, EarlyPredictor, EarlyRows, MaskedFFN,
                                        add_shift_rows, capture, early_input, input_predict)
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
    """(moments of xk on ln1, moments of xk - mix prev on ln1, held-out rows per layer)."""
    mom = EarlyMoments(model.config, "ln1")
    mom_y = EarlyMoments(model.config, "ln1", target="y")

    def feed(layer, r):
        mom.add(layer, r)
        add_shift_rows(mom_y, layer, r["ln1"], r["prev"], r["ffn"], model.blocks[layer].ffn_xk)

    capture(model, TRAIN, feed, chunk=128)
    return mom, mom_y, _rows(model, HELD)


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


def test_early_rows_at_the_shift_hand_over_before_the_ffn_and_detach_cleanly(model):
    """at="shift": the rows (no "ffn" yet) arrive before the layer's FFN input; detach leaves no hook."""
    seen = []
    before = {k: len(getattr(model.hooks, k)) for k in ("att_input", "ffn_shift", "ffn_input")}
    rows = EarlyRows(lambda layer, r: seen.append(("rows", layer, sorted(r))), at="shift")
    rows.attach(model)
    model.hooks.ffn_input.append(lambda layer, xk: seen.append(("ffn", layer)))
    try:
        model.forward(HELD[:8].tolist())
    finally:
        rows.detach(model)
        model.hooks.ffn_input.pop()
    assert seen == [e for i in range(len(model.blocks))
                    for e in (("rows", i, ["ln1", "norm", "prev", "resid"]), ("ffn", i))]
    assert {k: len(getattr(model.hooks, k)) for k in before} == before
    with pytest.raises(ValueError, match="'ffn' or 'shift'"):
        EarlyRows(print, at="att")


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



def test_reduced_rank_fit_is_the_best_rank_r_map(model):
    D, r = model.config.n_embd, 5
    mom = EarlyMoments(model.config, "resid")
    A0 = RNG.normal(size=(D, r)) @ RNG.normal(size=(r, D)) / 8     # a known rank-r map
    B = RNG.normal(size=(D, D)) / 8                                  # and a full-rank one (layer 1)
    c, es = RNG.normal(size=D), []
    for _ in range(4):
        e = RNG.normal(size=(256, D)) + 0.5                          # non-zero mean: c must absorb it
        es.append(e)
        mom.add(0, {"resid": e, "ffn": e @ A0 + c})
        mom.add(1, {"resid": e, "ffn": e @ B + c + RNG.normal(size=(256, D)) * 0.1})
    A_full, c_full = mom.solve(1, ridge=0.0)
    for rank in (D, D + 3):                                          # rank >= D: the full fit, unchanged
        A_r, c_r = mom.solve(1, ridge=0.0, rank=rank)
        assert np.array_equal(A_r, A_full) and np.array_equal(c_r, c_full)
    A_r, c_r = mom.solve(0, ridge=0.0, rank=r)                       # exact on a rank-r map
    np.testing.assert_allclose(A_r, A0, atol=1e-8)
    np.testing.assert_allclose(c_r, c, atol=1e-8)
    # full-rank map: the rank-r fitted values are the best rank-r approximation (Eckart-Young) of the
    # centered least-squares fitted values, plus the least-squares mean
    e = np.concatenate(es)
    fit = e @ A_full + c_full
    u, s, vt = np.linalg.svd(fit - fit.mean(0), full_matrices=False)
    best = (u[:, :r] * s[:r]) @ vt[:r] + fit.mean(0)
    A_r, c_r = mom.solve(1, ridge=0.0, rank=r)
    np.testing.assert_allclose(e @ A_r + c_r, best, atol=1e-8)
    assert np.linalg.matrix_rank(A_r, tol=1e-8) == r
    # with a metric W^T W: the same for the scores W xk (the best rank-r scores, mapped back to A)
    W = RNG.normal(size=(4 * D, D))
    z = fit @ W.T
    u, s, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    A_w, c_w = mom.solve(1, ridge=0.0, rank=r, metric=W.T @ W)
    np.testing.assert_allclose((e @ A_w + c_w) @ W.T, (u[:, :r] * s[:r]) @ vt[:r] + z.mean(0), atol=1e-7)
    A_w, c_w = mom.solve(0, ridge=0.0, rank=r, metric=W.T @ W)      # still exact on the rank-r map
    np.testing.assert_allclose(A_w, A0, atol=1e-8)


def test_diagonal_plus_low_rank_fit_is_exact_on_a_diagonal_map(model):
    D = model.config.n_embd
    mom = EarlyMoments(model.config, "resid")
    d, c = RNG.normal(size=D), RNG.normal(size=D)
    for _ in range(4):
        e = RNG.normal(size=(256, D)) @ (np.eye(D) + RNG.normal(size=(D, D)) / 8) + 0.3   # correlated channels
        mom.add(0, {"resid": e, "ffn": e * d + c})
    A, c2 = mom.solve(0, ridge=0.0, rank=1, diag=True)
    np.testing.assert_allclose(A, np.diag(d), atol=1e-8)
    np.testing.assert_allclose(c2, c, atol=1e-8)
    assert np.abs(mom.solve(0, ridge=0.0, rank=1)[0] - np.diag(d)).max() > 0.1      # rank 1 alone cannot

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
            p = EarlyPredictor.fit(mom_n, i, b.ffn_xk, QuantizedPredictor.fit(b.ffn_key, 2, 64, 2.0).qm)
            p.calibrate(early_input(cal), act_cal, 0.99)
            pred = p.mask(early_input(ev))
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


# --------------------------------------------------------------------------- collect --input early / fit / run


@pytest.fixture(scope="module")
def early_bundle(model, tmp_path_factory):
    from rwkv_edge.predictors.collect import collect
    from rwkv_edge.predictors.fit import fit

    d = tmp_path_factory.mktemp("early")
    collect(model, TRAIN, str(d / "act"), chunk=128, progress=False, input="early")
    return (fit(model, str(d / "act"), "quantized", bits=2, target=0.99, progress=False, early_map="full"),
            str(d / "act"))


def test_early_collection_holds_ln1_prev_and_xk_of_the_same_tokens(model, early_bundle):
    from rwkv_edge.predictors.collect import load_layer, read_manifest, split_rows

    man = read_manifest(early_bundle[1])
    D = model.config.n_embd
    assert (man["format_version"], man["input"], man["dim"]) == (2, "early", 3 * D)
    rows = _rows(model, TRAIN[:256])                         # the same windows of 128 from a fresh state
    for i in range(model.config.n_layer):
        x, xk = split_rows(man, load_layer(early_bundle[1], i, 0, 256))
        np.testing.assert_allclose(x, early_input(rows[i]), atol=2e-3 * np.abs(x).max())   # float16 storage
        np.testing.assert_allclose(xk, rows[i]["ffn"], atol=2e-3 * np.abs(xk).max())


def test_fitted_early_bundle_recall_and_round_trip(model, early_bundle, fitted, tmp_path):
    bundle = early_bundle[0]
    assert bundle.input == "early" and all(isinstance(p, EarlyPredictor) for p in bundle.predictors)
    held = fitted[2]
    for i in range(model.config.n_layer):
        active, act = labels(model, i, held[i]["ffn"])
        pred = bundle.predict(i, early_input(held[i]))
        assert act[pred].sum() / act.sum() >= 0.95                          # unseen rows, target 0.99
        assert 0.05 < pred.mean() < 0.9 and (pred & active).sum() / active.sum() > 0.8
    bundle.save(tmp_path / "b.npz")
    back = PredictorBundle.load(tmp_path / "b.npz", model=model)
    assert back.input == "early" and "early" in back.describe()
    for i in range(model.config.n_layer):
        np.testing.assert_array_equal(back.predict(i, early_input(held[i])), bundle.predict(i, early_input(held[i])))


def test_version_1_bundles_load_as_ffn_input(model, tmp_path):
    preds = [QuantizedPredictor.fit(b.ffn_key, 2, 64) for b in model.blocks]
    PredictorBundle(preds, model.fingerprint, model.config, "quantized", 2, 0.99).save(tmp_path / "b.npz")
    d = dict(np.load(tmp_path / "b.npz"))
    d["format_version"] = np.array(1, np.int64)
    del d["input"]
    np.savez(tmp_path / "v1.npz", **d)
    assert PredictorBundle.load(tmp_path / "v1.npz", model=model).input == "ffn"


def test_early_bundle_runs_sparse_like_the_hook_pair_reference(model, early_bundle, fitted):
    from rwkv_edge.runtime import run_sparse

    bundle, toks = early_bundle[0], HELD[:48].tolist()
    with pytest.raises(ValueError, match="early"):
        SparseFFN(model, bundle)
    sparse = run_sparse(model, bundle)
    got, st = sparse.forward(toks, full_output=True)
    ref = MaskedFFN(lambda layer, rows: bundle.predict(layer, early_input(rows)), model.config.ffn_dim)
    want, _ = ref.attach(model).forward(toks, full_output=True)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert sparse.ffn.n_active == ref.n_active and 0 < sparse.ffn.density < 0.9
    # decode: one token at a time from the prefill's state, the sets scored from the state's shift rows
    nxt = HELD[48:52].tolist()
    full, _ = ref.attach(model).forward(toks + nxt, full_output=True)
    for j, t in enumerate(nxt):
        lg, st = sparse.step(t, st)
        assert np.abs(lg - full[48 + j]).max() <= 1e-4 * np.abs(full[48 + j]).max()


def test_diagonal_early_map_is_stored_as_d_and_scores_as_the_full_form(model, early_bundle, fitted, tmp_path):
    """fit (early_map "diag", the default): every layer's map is A = diag(d), stored as d (D,) float32
    (format version 3, no "A" array), xk_hat = ln1 * d + c + mix * prev equals the full form with
    A = diag(d), and the bundle round-trips; a version-2 file (A stored) still loads."""
    from rwkv_edge.predictors.fit import fit

    D = model.config.n_embd
    diag = fit(model, early_bundle[1], "quantized", bits=2, target=0.99, progress=False)     # default: diag
    held = fitted[2]
    for i, p in enumerate(diag.predictors):
        assert p.diag and p.d.shape == (D,) and p.A.dtype == np.float32
        full = EarlyPredictor(np.diag(p.d), p.c, p.mix, p.qm, p.clip)       # the same map as a (D, D) A
        x = early_input(held[i])
        np.testing.assert_allclose(p.xk_hat(x), full.xk_hat(x), atol=2e-3 * np.abs(full.xk_hat(x)).max())
        assert p.nbytes < early_bundle[0].predictors[i].nbytes - D * D
        active, act = labels(model, i, held[i]["ffn"])
        assert act[diag.predict(i, x)].sum() / act.sum() >= 0.95
    assert diag.meta["early_map"] == "diag" and "* d" in diag.describe()
    diag.save(tmp_path / "d.npz")
    raw = np.load(tmp_path / "d.npz")
    assert int(raw["format_version"]) == 3 and "L0.d" in raw and "L0.A" not in raw
    back = PredictorBundle.load(tmp_path / "d.npz", model=model)
    for i in range(model.config.n_layer):
        x = early_input(held[i])
        assert back.predictors[i].diag
        np.testing.assert_array_equal(back.predict(i, x), diag.predict(i, x))
    early_bundle[0].save(tmp_path / "f.npz")                                # full A, written as version 2 was
    d2 = dict(np.load(tmp_path / "f.npz"))
    d2["format_version"] = np.array(2, np.int64)
    np.savez(tmp_path / "v2.npz", **d2)
    old = PredictorBundle.load(tmp_path / "v2.npz", model=model)
    assert not old.predictors[0].diag and old.predictors[0].A.shape == (D, D)
    with pytest.raises(ValueError, match="early map"):
        fit(model, early_bundle[1], "quantized", progress=False, early_map="lowrank")


def test_fit_with_diag_and_rank_zero_keeps_the_per_channel_slopes(model, fitted):
    mom_y = fitted[1]
    A, c = mom_y.solve(0, rank=0, diag=True)
    p = EarlyPredictor.fit(mom_y, 0, model.blocks[0].ffn_xk, QuantizedPredictor.fit(model.blocks[0].ffn_key, 2, 64).qm,
                           rank=0, diag=True)
    np.testing.assert_allclose(np.diag(np.diagonal(A)), A, atol=1e-12)     # rank 0: nothing off the diagonal
    np.testing.assert_allclose(p.d, np.diagonal(A), rtol=1e-6)
    np.testing.assert_allclose(p.c, c, rtol=1e-6, atol=1e-7)
