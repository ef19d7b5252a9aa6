"""Predictors: calibration, each kind's held-out recall, quantized ranking, bundle files, report, CLI."""
from __future__ import annotations

import copy
import os
import re

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.predictors.calibrate import threshold_for_target, topk_for_target, topk_mask
from rwkv_edge.predictors.collect import collect, labels
from rwkv_edge.predictors.fit import fit, parse_kind
from rwkv_edge.predictors.pq import PQPredictor
from rwkv_edge.predictors.quantized import QuantizedPredictor
from rwkv_edge.predictors.report import report

FIT_KW = dict(target=0.95, metric="active", heldout_frac=0.25, hidden=32, epochs=24, batch_size=128, lr=5e-3,
              threads=1, pq_m=16, pq_nbits=4, group_size=16, progress=False)


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return rwkv_edge.load_model(tiny_ckpt("x070"), backend="reference")


@pytest.fixture(scope="module")
def data_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("act") / "calib"
    toks = np.random.default_rng(0).integers(0, 256, 2400).tolist()
    collect(model, toks, d, chunk=256, progress=False)
    return d


@pytest.fixture(scope="module")
def fresh_xk(model):
    """FFN inputs of text the predictors never saw: {layer: (n, D)}."""
    out = {}
    hook = lambda layer, xk: out.setdefault(layer, []).append(np.array(xk))
    model.hooks.ffn_input.append(hook)
    try:
        model.forward(np.random.default_rng(7).integers(0, 256, 600).tolist())
    finally:
        model.hooks.ffn_input.remove(hook)
    return {k: np.concatenate(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def bundles(model, data_dir):
    return {k: fit(model, data_dir, kind=k, bits=4, **FIT_KW) for k in ("quantized", "mlp", "pq", "quantized+mlp")}


# --------------------------------------------------------------------------- calibration


def test_threshold_is_the_sparsest_meeting_the_target():
    rng = np.random.default_rng(0)
    act = np.maximum(rng.standard_normal((400, 50)), 0) ** 2
    scores = np.sqrt(act) + 0.5 * rng.standard_normal(act.shape)          # noisy scores
    for metric in ("active", "mass"):
        c = threshold_for_target(scores.astype(np.float32), act, 0.9, metric)
        w = act if metric == "mass" else (act > 0)
        rec = lambda t: (w * (scores.astype(np.float32) >= t)).sum() / w.sum()
        assert rec(c.threshold) >= 0.9 and abs(rec(c.threshold) - c.recall) < 1e-9
        higher = np.min(scores[scores.astype(np.float32) > c.threshold])   # the next possible threshold
        assert rec(np.float32(higher)) < 0.9
        assert abs(c.percentile - (scores.astype(np.float32) < c.threshold).mean()) < 1e-9


def test_topk_is_the_smallest_k_meeting_the_target():
    rng = np.random.default_rng(1)
    act = np.maximum(rng.standard_normal((300, 64)), 0) ** 2
    scores = np.sqrt(act) + 0.3 * rng.standard_normal(act.shape)
    c = topk_for_target(scores, act, 0.95, "mass")
    rec = lambda k: (act * topk_mask(scores, k)).sum() / act.sum()
    assert rec(c.k) >= 0.95 > rec(c.k - 1)
    assert topk_mask(scores, c.k).sum(1).tolist() == [c.k] * 300


# --------------------------------------------------------------------------- predictors


@pytest.mark.parametrize("kind", ["quantized", "mlp", "pq", "quantized+mlp"])
def test_each_kind_reaches_its_calibrated_recall_on_unseen_rows(model, bundles, fresh_xk, kind):
    b = bundles[kind]
    assert b.kind == kind and b.fingerprint == model.fingerprint
    for layer in range(model.config.n_layer):
        active, _ = labels(model, layer, fresh_xk[layer])
        pred = b.predict(layer, fresh_xk[layer])
        recall = (pred & active).sum() / active.sum()
        assert recall >= 0.9, f"{kind} layer {layer}: recall {recall:.3f}"
        assert pred.mean() < 0.9, f"{kind} layer {layer}: predicts almost everything ({pred.mean():.3f})"


def test_quantized_ranking_improves_with_bits_and_8bit_is_near_exact(model):
    wk = model.blocks[0].ffn_key
    x = np.random.default_rng(2).standard_normal((64, wk.shape[1])).astype(np.float32)
    exact = x @ wk.T
    err = {}
    for bits in (1, 2, 4, 8):
        s = QuantizedPredictor.fit(wk, bits, group_size=None).score(x)
        err[bits] = np.abs(s - exact).mean() / np.abs(exact).mean()
    assert err[8] < err[4] < err[2] < err[1]
    s8 = QuantizedPredictor.fit(wk, 8, group_size=None).score(x)
    assert err[8] < 0.02
    rank = lambda a: np.argsort(np.argsort(a, axis=1), axis=1).astype(np.float64)
    rho = [np.corrcoef(rank(s8)[i], rank(exact)[i])[0, 1] for i in range(len(x))]
    assert min(rho) > 0.995
    top = lambda a: set(np.argsort(-a)[:32])
    assert np.mean([len(top(s8[i]) & top(exact[i])) / 32 for i in range(len(x))]) > 0.9


def test_mlp_training_is_deterministic_for_a_seed(model, data_dir):
    from rwkv_edge.predictors.collect import load_layer
    from rwkv_edge.predictors.mlp import MLPPredictor

    x, wk = load_layer(data_dir, 0, 0, 512), model.blocks[0].ffn_key
    a, b, c = (MLPPredictor.fit(x, wk, hidden=16, epochs=2, batch_size=128, seed=s, threads=1) for s in (3, 3, 4))
    for name in ("w1", "b1", "w2", "b2"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.w1.dtype == np.float16 and a.w1.shape == (model.config.n_embd, 16)
    assert not np.array_equal(a.w2, c.w2)


def test_pq_lookup_tables_match_decoded_scores_and_faiss(model):
    faiss = pytest.importorskip("faiss")
    wk = model.blocks[1].ffn_key
    p = PQPredictor.fit(wk, m=16, nbits=4, seed=0, codebook_dtype=np.float32)
    x = np.random.default_rng(3).standard_normal((5, wk.shape[1])).astype(np.float32)
    np.testing.assert_allclose(p.score_lut(x), p.score(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p.score_one(x[0]), p.score(x)[0], rtol=1e-4, atol=1e-4)
    # faiss' own search over the same codes returns the same approximate inner products
    index = faiss.IndexPQ(wk.shape[1], 16, 4, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(p.codebooks.astype(np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    index.add(np.ascontiguousarray(wk))
    dist, ids = index.search(x, 10)
    np.testing.assert_allclose(dist, np.take_along_axis(p.score(x), ids, 1), rtol=1e-3, atol=1e-3)
    assert p.nbytes < wk.astype(np.float16).nbytes


def test_union_is_calibrated_jointly(model, bundles, fresh_xk):
    """The union meets the target on the calibration rows and is never denser than its first member
    calibrated alone (giving up nothing to the second member is one of the options tried)."""
    from rwkv_edge.predictors.ensemble import UnionPredictor

    x = fresh_xk[1][:300]
    _, act = labels(model, 1, x)
    q, m = (copy.deepcopy(bundles[k].predictors[1]) for k in ("quantized", "mlp"))
    alone = copy.deepcopy(q).calibrate(x, act, 0.97, "mass")
    u = UnionPredictor([q, m])
    c = u.calibrate(x, act, 0.97, "mass")
    pred = u.mask(x)
    assert (act * pred).sum() / act.sum() >= 0.97 - 1e-9
    assert abs(c.percentile - (1 - pred.mean())) < 1e-9
    assert c.percentile >= alone.percentile - 1e-9
    assert u.members[1].calib.threshold > -np.inf


def test_independent_union_bundle_is_the_or_of_its_members(model, bundles, fresh_xk, tmp_path):
    q, m = bundles["quantized"], bundles["mlp"]
    u = PredictorBundle.union([q, m])
    u.save(tmp_path / "u.npz")
    u2 = PredictorBundle.load(tmp_path / "u.npz", model=model)
    assert u2.kind == "quantized+mlp" and u2.nbytes == q.nbytes + m.nbytes
    for layer in range(model.config.n_layer):
        x = fresh_xk[layer][:40]
        np.testing.assert_array_equal(u2.predict(layer, x), q.predict(layer, x) | m.predict(layer, x))
    with pytest.raises(ValueError):
        PredictorBundle.union([q])


def test_parse_kind():
    assert parse_kind("quantized") == ["quantized"]
    assert parse_kind("quantized+mlp") == ["quantized", "mlp"] == parse_kind("union:quantized,mlp")
    for bad in ("dense", "mlp+mlp", ""):
        with pytest.raises(ValueError):
            parse_kind(bad)


# --------------------------------------------------------------------------- bundles


@pytest.mark.parametrize("kind", ["quantized", "mlp", "pq", "quantized+mlp"])
def test_bundle_round_trip_gives_identical_predictions(model, bundles, fresh_xk, tmp_path, kind):
    b = bundles[kind]
    path = tmp_path / "b.npz"
    b.save(path)
    assert os.listdir(tmp_path) == ["b.npz"]
    b2 = PredictorBundle.load(path, model=model)
    assert (b2.kind, b2.bits, b2.target, b2.metric, b2.config) == (b.kind, b.bits, b.target, b.metric, b.config)
    assert b2.nbytes == b.nbytes > 0
    for layer in range(model.config.n_layer):
        x = fresh_xk[layer][:50]
        m = b.predict(layer, x)
        np.testing.assert_array_equal(b2.predict(layer, x), m)
        for t in (0, 17):
            idx = b2.predict_indices(layer, x[t])
            assert idx.dtype == np.int32 and np.all(np.diff(idx) > 0)
            np.testing.assert_array_equal(idx, np.flatnonzero(m[t]))


def test_bundle_load_rejects_other_models_and_non_bundles(model, tiny_ckpt, bundles, tmp_path):
    path = tmp_path / "b.npz"
    bundles["quantized"].save(path)
    other = rwkv_edge.load_model(tiny_ckpt("x070", seed=1), backend="reference")
    with pytest.raises(ValueError, match="another model"):
        PredictorBundle.load(path, model=other)
    bigger = rwkv_edge.load_model(tiny_ckpt("x070", n_layer=3), backend="reference")
    with pytest.raises(ValueError, match="config"):
        PredictorBundle.load(path, model=bigger)
    (tmp_path / "x.npz").write_bytes(b"definitely not a zip")
    np.savez(tmp_path / "y.npz", a=np.zeros(3))
    with np.load(path) as z:                                        # a bundle with one array missing
        np.savez(tmp_path / "z.npz", **{k: z[k] for k in z.files if k != "L1.calib"})
    for p in ("x.npz", "y.npz", "z.npz", "missing.npz"):
        with pytest.raises(ValueError):
            PredictorBundle.load(tmp_path / p)


def test_atomic_save_leaves_no_temp_file_on_failure(bundles, tmp_path, monkeypatch):
    path = tmp_path / "b.npz"
    bundles["quantized"].save(path)
    before = path.read_bytes()

    def boom(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        bundles["mlp"].save(path)
    assert os.listdir(tmp_path) == ["b.npz"]
    assert path.read_bytes() == before


# --------------------------------------------------------------------------- report and CLI


FINAL = re.compile(r"^mean_pred_sparsity=0\.\d{3} mean_recall=[01]\.\d{3} mean_mass_recall=[01]\.\d{3} "
                   r"predictor_bytes=(\d+) ffn_key_fp16_bytes=(\d+)$")


def test_report_final_line(model, bundles):
    b = bundles["quantized"]
    text = report(model, b, np.random.default_rng(5).integers(0, 256, 300).tolist(), chunk=128, progress=False)
    lines = text.splitlines()
    m = FINAL.match(lines[-1])
    assert m, lines[-1]
    cfg = model.config
    assert int(m.group(1)) == b.nbytes
    assert int(m.group(2)) == cfg.n_layer * cfg.ffn_dim * cfg.n_embd * 2
    assert sum(1 for l in lines if re.match(r"^\s+\d+ ", l)) == cfg.n_layer
    assert float(lines[-1].split()[1].split("=")[1]) >= 0.85        # mean recall near the 0.95 target
    # several bundles on one run: one table each, the same numbers as alone
    both = report(model, [bundles["mlp"], b], np.random.default_rng(5).integers(0, 256, 300).tolist(),
                  chunk=128, progress=False).splitlines()
    finals = [l for l in both if FINAL.match(l)]
    assert len(finals) == 2 and finals[1] == lines[-1]


def _byte_vocab(path):
    # A World-format vocab with one token per byte value 1..255 (ids 1..255; vocab_size 256).
    path.write_text("".join(f"{i} {bytes([i])!r} 1\n" for i in range(1, 256)))
    return str(path)


def test_cli_collect_fit_report(tiny_ckpt, tmp_path, capsys):
    from rwkv_edge.cli import main

    ckpt = tiny_ckpt("x070")
    vocab = _byte_vocab(tmp_path / "vocab.txt")
    text = tmp_path / "t.txt"
    text.write_text("".join(f"The {i}th line of a small text, about nothing at all.\n" for i in range(300)))
    act, bundle = str(tmp_path / "act"), str(tmp_path / "q.npz")
    base = ["--model", ckpt, "--no-progress"]
    assert main(["collect", *base, "--text", str(text), "--tokenizer", vocab, "--out", act, "--tokens", "1500"]) == 0
    assert main(["fit-predictors", *base, "--data", act, "--kind", "quantized", "--bits", "4", "--group-size", "16",
                 "--target-recall", "0.95", "--out", bundle, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["predictor-report", *base, "--predictors", bundle, "--text", str(text), "--tokenizer", vocab,
                 "--tokens", "400"]) == 0
    assert FINAL.match(capsys.readouterr().out.strip().splitlines()[-1])
    for bad in (["--target-recall", "1.5"], ["--kind", "dense"], ["--bits", "3"], ["--group-size", "7"]):
        with pytest.raises(SystemExit) as e:
            main(["fit-predictors", *base, "--data", act, "--out", bundle, *bad])
        assert e.value.code == 2
    other = tiny_ckpt("x070", seed=1)
    assert main(["fit-predictors", "--model", other, "--no-progress", "--data", act, "--out",
                 str(tmp_path / "o.npz")]) == 2
    assert "another model" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.npz")
