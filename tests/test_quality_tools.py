"""MaskedFFN (the backend-free sparse FFN) against SparseFFN, MLP probability bundles, plots, and
the sparsity table's resumable row files."""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge import plots
from rwkv_edge.candidates import MaskedFFN, mlp_threshold_bundle
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.predictors.mlp import MLPPredictor
from rwkv_edge.sparse import SparseFFN

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import sparsity_table  # noqa: E402

TOKENS = [5, 17, 200, 3, 99, 42, 7, 250, 0, 1, 128, 64]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return rwkv_edge.load_model(tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256))


class HalfByKey:
    """A predictor marking the neurons whose true key is above its per-token median."""

    def __init__(self, model):
        self.K = [np.asarray(b.ffn_key, np.float32) for b in model.blocks]

    def predict(self, layer, x):
        s = np.asarray(x, np.float32) @ self.K[layer].T
        return s >= np.median(s, axis=1, keepdims=True)

    def predict_indices(self, layer, x):
        return np.flatnonzero(self.predict(layer, x[None, :])[0]).astype(np.int32)


def test_masked_ffn_equals_sparse_ffn(model):
    pred = HalfByKey(model)
    want, _ = model.with_ffn(SparseFFN(model, pred)).forward(TOKENS, full_output=True)
    m = MaskedFFN(model, pred)
    got, _ = model.with_ffn(m).forward(TOKENS, full_output=True)
    dense, _ = model.forward(TOKENS, full_output=True)
    assert np.abs(got - want).max() <= 1e-4 and np.abs(dense - want).max() > 1e-3
    assert m.n_tokens == len(TOKENS) * 2 and m.density == pytest.approx(0.5, abs=0.02)


def test_mlp_probability_bundle(model):
    F, D = model.config.ffn_dim, model.config.n_embd
    rng = np.random.default_rng(0)
    preds = [MLPPredictor(rng.standard_normal((D, 8)).astype(np.float16), np.zeros(8, np.float32),
                          rng.standard_normal((8, F)).astype(np.float16), np.zeros(F, np.float32)) for _ in range(2)]
    b = PredictorBundle(preds, model.fingerprint, model.config, "mlp")
    b7 = mlp_threshold_bundle(b, 0.7)
    x = rng.standard_normal((5, D)).astype(np.float32)
    p = 1 / (1 + np.exp(-preds[0].score(x)))
    assert np.array_equal(b7.predict(0, x), p >= 0.7)
    assert preds[0].calib.threshold == float("-inf")                   # the original is untouched
    assert b7.predictors[1].calib.threshold == pytest.approx(math.log(0.7 / 0.3))


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"kind": "dense", "setting": "-", "kld_mean": 0.0, "tok_s": 10.0},
            {"kind": "2bit", "setting": "r0.99", "kld_mean": 0.02, "tok_s": 14.0, "layer_density": [0.1, 0.2]},
            {"kind": "4bit", "setting": "seed", "kld_mean": 0.01, "tok_s": 12.0, "layer_density": [0.05, 0.15]}]
    plots.plot_front(rows, tmp_path / "f.png")
    plots.plot_layer_density(rows, tmp_path / "d.png")
    rep = [{"layer": i, "recall": 0.9, "mass_recall": 0.99, "pred_sparsity": 0.8, "true_sparsity": 0.85} for i in range(3)]
    plots.plot_report([rep], ["b"], tmp_path / "r.png")
    for n in ("f.png", "d.png", "r.png"):
        assert (tmp_path / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plots.PlotError, match="pip install"):
        plots.plot_front([], tmp_path / "f.png")
    assert not list(tmp_path.iterdir())


def test_table_rows_are_rebuilt_in_order(tmp_path):
    os.makedirs(tmp_path / "rows")
    for kind, setting, kld in (("4bit", "seed", 0.01), ("dense", "-", 0.0), ("2bit", "r0.99", 0.02)):
        (tmp_path / "rows" / f"{kind}__{setting}.json").write_text(json.dumps(
            {"kind": kind, "setting": setting, "kld_mean": kld, "density": 0.1, "tok_s": float("nan")}))
    rows = sparsity_table.write_tables(str(tmp_path), "header")
    assert [r["kind"] for r in rows] == ["dense", "2bit", "4bit"]
    md = (tmp_path / "table.md").read_text().splitlines()
    assert md[0] == "header" and md[5].startswith("| 2bit | r0.99 | 0.100 |") and len(md) == 7
    assert (tmp_path / "table.csv").read_text().splitlines()[0].startswith("kind,setting,density")


def test_ffn_bytes_per_token(model):
    cfg = model.config
    full = sparsity_table.ffn_bytes_per_token(cfg, 1.0, 4, 0)
    assert full == cfg.n_layer * cfg.ffn_dim * cfg.n_embd * 2 * 4
    assert sparsity_table.ffn_bytes_per_token(cfg, 0.1, 4, 1000) == round(full * 0.1) + 1000


def test_layer_stats_match_the_calibration_of_a_fitted_bundle(tiny_ckpt, tmp_path):
    from rwkv_edge.predictors.collect import collect
    from rwkv_edge.predictors.fit import fit

    model = rwkv_edge.load_model(tiny_ckpt("x070"))
    collect(model, np.random.default_rng(2).integers(0, 256, 1200).tolist(), tmp_path / "c", chunk=256, progress=False)
    b = fit(model, str(tmp_path / "c"), "quantized", bits=2, group_size=16, target=0.9, progress=False)
    s = sparsity_table.layer_stats(model, b, str(tmp_path / "c"))
    assert s["layer_density"] == pytest.approx([1 - p.calib.percentile for p in b.predictors], abs=1e-6)
    assert s["layer_recall"] == pytest.approx([p.calib.recall for p in b.predictors], abs=1e-5)


def test_speed_pass_times_every_row_in_rounds_and_records_the_load(model, tmp_path):
    import argparse
    import fcntl

    from rwkv_edge.predictors.calibrate import Calibration
    from rwkv_edge.predictors.quantized import QuantizedPredictor

    os.makedirs(tmp_path / "rows"), os.makedirs(tmp_path / "bundles")
    preds = []
    for b in model.blocks:
        p = QuantizedPredictor.fit(np.asarray(b.ffn_key, np.float32), 4, 16)
        p.calib = Calibration(threshold=0.0)
        preds.append(p)
    PredictorBundle(preds, model.fingerprint, model.config, "quantized", 4).save(str(tmp_path / "bundles" / "4bit__r0.99.npz"))
    for kind, setting in (("dense", "-"), ("4bit", "r0.99")):
        (tmp_path / "rows" / f"{kind}__{setting}.json").write_text(json.dumps(
            {"kind": kind, "setting": setting, "density": 0.5, "pred_bytes": 100, "layer_stats": "measured"}))
    lock = tmp_path / "bench.lock"
    args = argparse.Namespace(out=str(tmp_path), data=None, bench_lock=str(lock), speed_tokens=3, speed_rounds=3)
    sparsity_table.speed_pass(model, args, lambda s: None)
    for name in ("dense__-.json", "4bit__r0.99.json"):
        r = json.loads((tmp_path / "rows" / name).read_text())
        assert len(r["tok_s_all"]) == 3 and r["tok_s"] > 0
        assert r["tok_s"] == pytest.approx(float(np.median(r["tok_s_all"])), rel=1e-3)
    info = json.loads((tmp_path / "speed.json").read_text())
    assert info["rounds"] == 3 and len(info["load_before"]) == 3
    with open(lock) as f:                                   # released
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_row_lock_is_shared_and_released(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setattr(sparsity_table.time, "sleep", lambda s: None)
    lock = str(tmp_path / "bench.lock")
    with sparsity_table.row_lock(lock):
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)         # another row may run beside it
            fcntl.flock(f, fcntl.LOCK_UN)
            with pytest.raises(BlockingIOError):                  # a timed run waits
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_row_claims_share_rows_between_runs_and_stale_claims_are_taken(tmp_path):
    import subprocess

    c = str(tmp_path / "2bit__r0.99.claim")
    assert sparsity_table.claim(c) and open(c).read() == str(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        open(c, "w").write(str(child.pid))              # a live run holds it
        assert not sparsity_table.claim(c)
    finally:
        child.kill()
        child.wait()
    assert sparsity_table.claim(c) and open(c).read() == str(os.getpid())   # its run is gone: taken over


def test_exclusive_waiters_are_read_from_proc_locks(tmp_path):
    lock = tmp_path / "bench.lock"
    lock.write_text("")
    ino = os.stat(lock).st_ino
    locks = tmp_path / "locks"
    locks.write_text(f"1: FLOCK  ADVISORY  READ  20499 fe:00:{ino} 0 EOF\n")
    assert not sparsity_table.exclusive_waiters(str(lock), str(locks))          # a holder, nobody waiting
    locks.write_text(f"1: FLOCK  ADVISORY  READ  20499 fe:00:{ino} 0 EOF\n1: -> FLOCK  ADVISORY  WRITE 16556 fe:00:{ino} 0 EOF\n")
    assert sparsity_table.exclusive_waiters(str(lock), str(locks))
    locks.write_text(f"1: -> FLOCK  ADVISORY  WRITE 16556 fe:00:{ino + 1} 0 EOF\n")           # another file
    assert not sparsity_table.exclusive_waiters(str(lock), str(locks))


def test_lambada_is_taken_from_an_earlier_run_only_for_the_same_candidate(model, tmp_path, monkeypatch):
    import argparse
    import csv

    from rwkv_edge import evaluate

    calls = []
    monkeypatch.setattr(evaluate, "score_lambada",
                        lambda cand, tok, items, progress=True: calls.append(1) or evaluate.LambadaResult(0.5, 9.0, 2))
    tokens = (TOKENS * 6)[:64]
    args = argparse.Namespace(data=None, out=str(tmp_path), ctx=32, progress=False, decode_tokens=0,
                              bench_lock=None, lambada_from=str(tmp_path / "earlier.csv"))
    ctx_ = {"tokens": tokens, "base": None, "lambada": [("a b", "c"), ("d e", "f")], "earlier": {}}
    fresh = sparsity_table.run_row(model, None, "dense", "-", ctx_, args, lambda s: None)
    assert calls == [1] and fresh["lambada_acc"] == 0.5 and "lambada_from" not in fresh

    def earlier(**change):                      # the earlier run's CSV row, as read back from disk
        r = {**fresh, "lambada_acc": 0.25, "lambada_ppl": 7.0, "lambada_n": 2, **change}
        with open(args.lambada_from, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(r))
            w.writeheader()
            w.writerow(r)
        return sparsity_table.read_earlier(args.lambada_from)

    ctx_["earlier"] = earlier()                 # same figures: LAMBADA not run, the earlier figures kept
    row = sparsity_table.run_row(model, None, "dense", "-", ctx_, args, lambda s: None)
    assert calls == [1] and row["lambada_acc"] == 0.25 and row["lambada_from"] == args.lambada_from
    assert row["lambada_from_dev"] <= sparsity_table.REUSE_TOL
    for change in ({"density": 0.999}, {"ppl": fresh["ppl"] * (1 + 1e-5)}, {"lambada_n": 3},
                   {"kld_mean": fresh["kld_mean"] + 1e-6}):
        ctx_["earlier"] = earlier(**change)     # another candidate (or item count): LAMBADA runs again
        row = sparsity_table.run_row(model, None, "dense", "-", ctx_, args, lambda s: None)
        assert row["lambada_acc"] == 0.5 and "lambada_from" not in row
    assert len(calls) == 5
