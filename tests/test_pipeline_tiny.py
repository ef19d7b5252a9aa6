"""The whole sparse pipeline on the embedded real model, through the CLI, in CI time: collect FFN
inputs -> fit a 2-bit predictor bundle -> sparse generate -> predictor report. The text is
tests/data/sample.txt (public-domain prose, unseen by the model), so no ../shared is needed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rwkv_edge.runtime import DEFAULT_MODEL

SAMPLE = Path(__file__).resolve().parent / "data" / "sample.txt"


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "rwkv_edge.cli", *map(str, args)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stderr[-3000:]}"
    return r


def test_collect_fit_generate_report(tmp_path):
    act, bundle = tmp_path / "act", tmp_path / "q2.npz"
    _cli("collect", "--model", DEFAULT_MODEL, "--text", SAMPLE, "--out", act, "--tokens", 6000, "--no-progress")
    _cli("fit-predictors", "--model", DEFAULT_MODEL, "--data", act, "--kind", "quantized", "--bits", 2,
         "--target-recall", 0.99, "--out", bundle)
    assert bundle.stat().st_size > 0
    r = _cli("generate", "--model", Path(DEFAULT_MODEL) / "model.rwkve", "--predictors", bundle,
             "--prompt", "The old man", "--max-tokens", 12, "--temperature", 0)
    assert len(r.stdout.strip()) > 0
    r = _cli("predictor-report", "--model", DEFAULT_MODEL, "--predictors", bundle, "--text", SAMPLE,
             "--tokens", 2000)
    last = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split() if "=" in kv)
    assert 0.5 < float(last["mean_pred_sparsity"]) < 0.98          # sparse, but not empty
    assert float(last["mean_mass_recall"]) > 0.9                    # calibrated on 0.99 of the mass


def test_early_bundle_pipeline(tmp_path):
    """collect --input early -> fit-predictors (an early bundle) -> predictor-report and eval on it."""
    act, bundle = tmp_path / "act", tmp_path / "early.npz"
    _cli("collect", "--model", DEFAULT_MODEL, "--text", SAMPLE, "--out", act, "--tokens", 4000, "--no-progress",
         "--input", "early")
    r = _cli("fit-predictors", "--model", DEFAULT_MODEL, "--data", act, "--kind", "quantized", "--bits", 2,
             "--target-recall", 0.99, "--out", bundle)
    assert "scored on early inputs" in r.stdout
    r = _cli("predictor-report", "--model", DEFAULT_MODEL, "--predictors", bundle, "--text", SAMPLE,
             "--tokens", 1000)
    last = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split() if "=" in kv)
    assert 0.3 < float(last["mean_pred_sparsity"]) < 0.98 and float(last["mean_mass_recall"]) > 0.9
    r = _cli("eval", "--model", DEFAULT_MODEL, "--predictors", bundle, "--text", SAMPLE, "--limit", 512,
             "--ctx", 256, "--backend", "numba", "--no-progress")
    last = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split() if "=" in kv)
    assert float(last["kld_mean"]) < 0.1 and 0.0 < float(last["density"]) < 0.9
