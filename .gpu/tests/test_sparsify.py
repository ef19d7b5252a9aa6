"""`rwkv-edge sparsify` end to end on a tiny random RWKV-7 (vocab 16384, so the shipped tokenizer.json
fits) and tests/data/sample.txt: stages, resume after a stop and after an interrupt, the package it
writes (parts, manifest figures, fingerprints), determinism of a rebuild, every command taking the
package, and the bad-input cases (one line, exit 2, no partial DIR). No ../shared needed."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TOKENIZER_JSON
from rwkv_edge import cli
from rwkv_edge.package import read_manifest
from rwkv_edge.sparsify import Settings, bundle_digest, select, sha256_file, split_tokens

SAMPLE = Path(__file__).resolve().parent / "data" / "sample.txt"
# small and fast: 2 layers, D 64, F 256; 2 candidates; 3 held-out windows of 128
ARGS = ["--tokens", "3000", "--heldout-tokens", "384", "--ctx", "128", "--bits", "2,4", "--targets", "0.99",
        "--max-kld", "1.0", "--speed-tokens", "8", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from checkpoints import make_checkpoint

    d = tmp_path_factory.mktemp("sparsify_ckpt")
    return str(make_checkpoint("x070", d / "rand.pth", n_layer=2, n_embd=64, vocab_size=16384, seed=3))


def _sparsify(ckpt, out, *extra, text=SAMPLE):
    """In-process `rwkv-edge sparsify` (numba kernels compile once per test session): (rc, stdout, stderr)."""
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        try:
            rc = cli.main(["sparsify", "--model", ckpt, "--text", str(text), "--out", str(out),
                           "--tokenizer", str(TOKENIZER_JSON), *ARGS, *map(str, extra)])
        except SystemExit as x:
            rc = x.code
    return rc, o.getvalue(), e.getvalue()


@pytest.fixture(scope="module")
def package(ckpt, tmp_path_factory):
    """The package, built in two runs: --until fit, then the same command (which resumes)."""
    out = tmp_path_factory.mktemp("pkg") / "pkg"
    rc1, _, err1 = _sparsify(ckpt, out, "--until", "fit")
    work = Path(str(out) + ".work")
    done1 = json.loads((work / "stages.json").read_text())["done"]
    rc2, stdout2, err2 = _sparsify(ckpt, out)
    return {"out": out, "rc": (rc1, rc2), "err": (err1, err2), "done1": done1, "stdout": stdout2, "work": work}


def test_stages_resume_and_package(package):
    assert package["rc"] == (0, 0), package["err"]
    assert set(package["done1"]) == {"tokens", "convert", "collect", "fit"}
    err2 = package["err"][1]
    for s in ("tokens", "convert", "collect", "fit"):
        assert f"{s}: done earlier" in err2
    assert "measure: " in err2 and "speed: " in err2
    assert not package["work"].exists(), "the work dir is removed after success"
    out = package["out"]
    assert sorted(os.listdir(out)) == ["model.json", "model.rwkve", "predictors.npz", "tokenizer.json"]
    assert package["stdout"].startswith(f"wrote {out}")


def test_manifest_holds_settings_and_measured_figures(package, ckpt):
    man = read_manifest(package["out"])
    assert man["format_version"] == 1 and man["dtype"] == "int8" and man["config"]["n_layer"] == 2
    assert man["source"] == "rand.pth" and man["source_sha256"] == sha256_file(ckpt)
    p, m, b = man["predictor"], man["measured"], man["build"]
    assert p["kind"] == "quantized" and p["bits"] in (2, 4) and p["target_recall"] == 0.99
    assert len(p["thresholds"]) == 2
    for k in ("density", "bytes_per_token", "dense_bytes_per_token", "kld_mean", "kld_p99", "same_top1",
              "ppl_ratio", "decode_tok_s", "dense_decode_tok_s", "date", "machine"):
        assert m[k] is not None, k
    assert 0 < m["density"] < 1 and m["bytes_per_token"] < m["dense_bytes_per_token"]
    assert m["heldout_tokens"] == 384 and 0 <= m["kld_mean"] <= 1.0
    assert [c["name"] for c in b["candidates"]] == ["q2-r0.99", "q4-r0.99"]
    # the chosen one is the candidate with the fewest bytes/token (all are within --max-kld 1.0)
    best = min(b["candidates"], key=lambda c: c["bytes_per_token"])
    assert (best["bits"], best["bytes_per_token"]) == (p["bits"], m["bytes_per_token"])
    assert b["settings"]["tokens"] == 3000 and "--tokens 3000" in b["command"]
    assert b["predictors_digest"] == bundle_digest(str(package["out"] / "predictors.npz"))
    assert man["model_sha256"] == sha256_file(package["out"] / "model.rwkve")


def test_rebuild_is_deterministic(package, ckpt, tmp_path):
    """The same command again (to --until fit, keeping the work dir): the same model file bytes, the
    same token split and the same predictor bundle contents as the package."""
    man = read_manifest(package["out"])
    out = tmp_path / "again"
    rc, _, err = _sparsify(ckpt, out, "--until", "fit", "--keep-work")
    assert rc == 0, err
    work = Path(str(out) + ".work")
    assert sha256_file(work / "model.rwkve") == man["model_sha256"]
    st = json.loads((work / "stages.json").read_text())
    assert st["done"]["tokens"]["tokens_sha256"] == man["build"]["tokens_sha256"]
    chosen = f"q{man['predictor']['bits']}-r0.99-f0.99.npz"          # candidate q{bits}-r0.99, fitted at 0.99
    assert bundle_digest(str(work / chosen)) == man["build"]["predictors_digest"]
    assert not out.exists()
    # another grid reuses the collection (and refits: the fit target, the grid's highest, changed)
    rc, _, err = _sparsify(ckpt, out, "--until", "fit", "--keep-work", "--bits", "2", "--targets", "0.99,0.995")
    assert rc == 0, err
    assert "collect: done earlier" in err and "fit: done earlier" not in err
    assert (work / "q2-r0.995-f0.995.npz").is_file()
    rc, _, err = _sparsify(ckpt, out, "--until", "fit", "--keep-work", "--tokens", "2000")
    assert rc == 2 and "other settings (tokens)" in err


def test_every_command_takes_the_package(package, tmp_path):
    out = str(package["out"])
    env = dict(os.environ)
    for extra in ([], ["--dense"]):
        r = subprocess.run([sys.executable, "-m", "rwkv_edge.cli", "generate", "--model", out, "--prompt", "Hi",
                            "--max-tokens", "4", "--temperature", "0", *extra], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "rwkv_edge.cli", "eval", "--model", out, "--text", str(SAMPLE),
                        "--ctx", "128", "--limit", "256", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = dict(kv.split("=") for kv in r.stdout.strip().splitlines()[-1].split() if "=" in kv)
    assert 0 < float(last["density"]) < 1 and float(last["kld_mean"]) >= 0     # the package sparse vs its dense
    tools = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
    r = subprocess.run([sys.executable, str(tools), "--model", out, "--tokens", "4", "--rounds", "1",
                        "--prefill-tokens", "16"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    by = {d.get("config"): d for d in lines}
    assert "dense int8" in by and "sparse int8" in by, r.stdout
    assert by["sparse int8"]["weight_bytes_per_token"] < by["dense int8"]["weight_bytes_per_token"]
    assert "speedup_sparse_vs_dense_int8=" in r.stdout.splitlines()[-1]


def test_export_onnx_takes_the_package(package, tmp_path, capsys):
    pytest.importorskip("onnx")
    for extra, sparse in (([], True), (["--dense"], False)):
        d = tmp_path / f"onnx{int(sparse)}"
        rc = cli.main(["export-onnx", "--model", str(package["out"]), "--out", str(d), "--no-prefill", *extra])
        assert rc == 0, capsys.readouterr().err
        meta = json.loads((d / "model.json").read_text())
        assert bool(meta.get("sparsity")) == sparse
        assert (d / "tokenizer.json").is_file()


# --------------------------------------------------------------------------- bad input


def _copy(package, tmp_path) -> Path:
    d = tmp_path / "copy"
    shutil.copytree(package["out"], d)
    return d


def _generate(path):
    return subprocess.run([sys.executable, "-m", "rwkv_edge.cli", "generate", "--model", str(path), "--prompt", "Hi",
                           "--max-tokens", "2"], capture_output=True, text=True, timeout=600)


def _one_line_exit2(r, *words):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_package_with_missing_part(package, tmp_path):
    d = _copy(package, tmp_path)
    (d / "predictors.npz").unlink()
    _one_line_exit2(_generate(d), "predictors.npz", "missing")


def test_package_with_swapped_parts(package, ckpt, tmp_path):
    """A bundle from another fit of the same model, and another model's model file: each named."""
    from checkpoints import make_checkpoint
    from rwkv_edge.modelfile import convert
    from rwkv_edge.predictors.bundle import PredictorBundle

    d = _copy(package, tmp_path)
    b = PredictorBundle.load(str(d / "predictors.npz"))
    b.predictors[0].calib.threshold += 1.0                          # same model, other thresholds
    b.save(str(d / "predictors.npz"))
    _one_line_exit2(_generate(d), "predictors.npz", "not the predictor bundle")

    d2 = tmp_path / "copy2"
    shutil.copytree(package["out"], d2)
    other = make_checkpoint("x070", tmp_path / "other.pth", n_layer=2, n_embd=64, vocab_size=16384, seed=4)
    convert(str(other), str(d2 / "model.rwkve"), "int8")
    _one_line_exit2(_generate(d2), "model.rwkve", "another model")

    d3 = tmp_path / "copy3"
    shutil.copytree(package["out"], d3)
    convert(ckpt, str(d3 / "model.rwkve"), "fp16")                 # same model, other dtype
    _one_line_exit2(_generate(d3), "model.rwkve", "fp16")


def test_package_of_newer_format(package, tmp_path):
    d = _copy(package, tmp_path)
    man = json.loads((d / "model.json").read_text())
    man["format_version"] = 99
    (d / "model.json").write_text(json.dumps(man))
    _one_line_exit2(_generate(d), "newer")


def _cli_sub(*args):
    return subprocess.run([sys.executable, "-m", "rwkv_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_text_too_short(ckpt, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.\n" * 20)
    out = tmp_path / "pkg"
    r = _cli_sub("sparsify", "--model", ckpt, "--text", short, "--out", out, "--tokenizer", TOKENIZER_JSON, *ARGS)
    _one_line_exit2(r, "tokens")
    assert not out.exists() and not Path(str(out) + ".work").exists()


def test_unwritable_out(ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        parent = ro
        if os.access(ro, os.W_OK):              # root writes anywhere: use a directory that refuses mkdir
            parent = Path("/sys")
            if not parent.is_dir() or _mkdir_works(parent):
                pytest.skip("no unwritable directory available to this user")
        r = _cli_sub("sparsify", "--model", ckpt, "--text", SAMPLE, "--out", parent / "rwkv-edge-test-pkg",
                     "--tokenizer", TOKENIZER_JSON, *ARGS)
        _one_line_exit2(r, "not writable")
        assert not (parent / "rwkv-edge-test-pkg").exists() and not (parent / "rwkv-edge-test-pkg.work").exists()
    finally:
        ro.chmod(0o700)


def _mkdir_works(parent: Path) -> bool:
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
        return True
    except OSError:
        return False


def test_existing_out_and_missing_dir(ckpt, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for out, word in ((tmp_path / "full", "already exists"), (tmp_path / "nodir" / "pkg", "does not exist")):
        r = _cli_sub("sparsify", "--model", ckpt, "--text", SAMPLE, "--out", out, "--tokenizer", TOKENIZER_JSON, *ARGS)
        _one_line_exit2(r, word)
    assert os.listdir(tmp_path / "full") == ["x"]


def test_no_candidate_within_bound_then_rerun(ckpt, tmp_path):
    """--max-kld below every candidate: exit 1 with the best KLD, work kept, nothing at --out; the rerun
    with a larger bound reuses every stage up to the measurements."""
    out = tmp_path / "pkg"
    small = ("--targets", "0.9", "--bits", "2", "--tokens", "1000")
    rc, _, err = _sparsify(ckpt, out, "--max-kld", "1e-12", *small)
    assert rc == 1 and "no predictor setting" in err and not out.exists()
    rc, _, err = _sparsify(ckpt, out, *small)
    assert rc == 0, err
    assert "measure: done earlier" in err and read_manifest(out)["build"]["max_kld"] == 1.0


def test_interrupted_run_continues(ckpt, tmp_path, monkeypatch):
    """Ctrl-C in the fit stage: the rerun keeps tokens/convert/collect and finishes."""
    import importlib

    fitmod = importlib.import_module("rwkv_edge.predictors.fit")    # the module (the package exports a function `fit`)

    def boom(*a, **k):
        raise KeyboardInterrupt

    out = tmp_path / "pkg"
    monkeypatch.setattr(fitmod, "fit", boom)
    rc, _, _ = _sparsify(ckpt, out, "--bits", "2", "--tokens", "1000")
    assert rc == 130 and not out.exists()
    monkeypatch.undo()
    rc, _, err = _sparsify(ckpt, out, "--bits", "2", "--tokens", "1000")
    assert rc == 0, err
    assert "collect: done earlier" in err and "fit: done earlier" not in err


def test_split_and_select_units():
    ids = np.arange(10 * 16)
    fit_ids, held = split_tokens(ids, 100, 3, 16)
    assert len(held) == 48 and len(fit_ids) == 100 and not set(fit_ids) & set(held)
    assert held.min() > 0 and held.max() < 159                                   # spread, not one end
    m = {"a": {"kld_mean": 0.02, "bytes_per_token": 10, "density": .1, "target": .98},
         "b": {"kld_mean": 0.005, "bytes_per_token": 20, "density": .2, "target": .99},
         "c": {"kld_mean": 0.001, "bytes_per_token": 20, "density": .2, "target": .995}}
    assert select(m, 0.03) == "a" and select(m, 0.01) == "c"      # tie on bytes: the higher target
    assert Settings().key()["bits"] == [2, 4]
