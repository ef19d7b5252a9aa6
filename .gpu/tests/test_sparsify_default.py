"""The embedded default package (rwkv_edge/data/default) is what `rwkv-edge sparsify` builds.

Rebuilding all of it (100k collected tokens, 6 candidates measured on 4096 held-out tokens) takes
minutes, too long for CI, so the test rebuilds a deterministic subset with the recorded settings:
- the recorded command parses (with the real `sparsify` parser) to the recorded settings, and the
  manifest's predictor section, figures and digests agree with the shipped parts;
- with ../shared present: the recorded command run `--until convert` gives the same token split
  (fitting and held-out tokens, by hash) and a byte-identical model.rwkve.
That later stages are deterministic (same inputs -> same bundle contents and choice) is tested on a
small random model in test_sparsify.py::test_rebuild_is_deterministic.
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from conftest import SHARED
from rwkv_edge import cli
from rwkv_edge.package import check_parts, read_manifest
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.runtime import DEFAULT_MODEL
from rwkv_edge.sparsify import bundle_digest, sha256_file
from rwkv_edge.sparsify_cli import add_sparsify_parser, settings_from_args

MAN = read_manifest(DEFAULT_MODEL)


def _recorded_args():
    words = shlex.split(MAN["build"]["command"])
    assert words[:2] == ["rwkv-edge", "sparsify"]
    sub = argparse.ArgumentParser().add_subparsers()
    return add_sparsify_parser(sub).parse_args(words[2:]), words[2:]


def test_shipped_package_was_built_by_sparsify():
    args, _ = _recorded_args()
    assert settings_from_args(args).key() == MAN["build"]["settings"]
    assert args.max_kld == MAN["build"]["max_kld"] and args.dtype == MAN["dtype"] == "int8"
    assert (args.model, args.text) == (MAN["source"], MAN["build"]["calibration_text"])
    check_parts(DEFAULT_MODEL, MAN)                       # model fingerprint/dtype, tokenizer and bundle hashes
    pred = Path(DEFAULT_MODEL) / MAN["files"]["predictors"]
    assert bundle_digest(str(pred)) == MAN["build"]["predictors_digest"]
    b = PredictorBundle.load(str(pred))
    p = MAN["predictor"]
    assert (b.kind, b.bits, b.target) == (p["kind"], p["bits"], p["target_recall"])
    assert [round(float(q.calib.threshold), 6) for q in b.predictors] == p["thresholds"]
    chosen = [c for c in MAN["build"]["candidates"] if c["bits"] == p["bits"] and c["target"] == p["target_recall"]]
    assert len(chosen) == 1 and chosen[0]["kld_mean"] <= MAN["build"]["max_kld"]
    ok = [c for c in MAN["build"]["candidates"] if c["kld_mean"] <= MAN["build"]["max_kld"]]
    assert chosen[0]["bytes_per_token"] == min(c["bytes_per_token"] for c in ok)
    assert (Path(DEFAULT_MODEL) / "model.rwkve").stat().st_size < 20e6


def test_recorded_command_rebuilds_the_same_tokens_and_model_file(tmp_path):
    pth, text = SHARED / "models" / MAN["source"], SHARED / "data" / MAN["build"]["calibration_text"]
    if not (pth.exists() and text.exists()):
        pytest.skip(f"{pth} or {text} not present")
    assert sha256_file(pth) == MAN["source_sha256"] and sha256_file(text) == MAN["build"]["text_sha256"]
    _, words = _recorded_args()
    values = {"--model": str(pth), "--text": str(text), "--out": str(tmp_path / "default")}
    argv = [values.get(words[i - 1], w) if i else w for i, w in enumerate(words)]
    rc = cli.main(["sparsify", *argv, "--until", "convert", "--keep-work", "--no-progress", "--quiet"])
    assert rc == 0
    work = tmp_path / "default.work"
    done = json.loads((work / "stages.json").read_text())["done"]
    assert done["tokens"]["tokens_sha256"] == MAN["build"]["tokens_sha256"]
    assert sha256_file(work / "model.rwkve") == MAN["model_sha256"]
