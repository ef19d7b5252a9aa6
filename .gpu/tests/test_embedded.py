"""The embedded default model (rwkv7-tiny-9m, a real trained RWKV-7 shipped as a model package inside
rwkv_edge): present in every checkout and install, checked against golden logits of the reference
`rwkv` package (tests/data/tiny_golden.npz, made by tools/make_golden.py), run dense and sparse,
used by the CLI when no --model is given, and its numba kernels loaded from the cache in fresh
processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.evaluate import log_softmax
from rwkv_edge.package import read_manifest
from rwkv_edge.runtime import DEFAULT_MODEL, default_model_path

GOLDEN = Path(__file__).resolve().parent / "data" / "tiny_golden.npz"


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def _run(model, golden):
    """(logits after the prompt, logits of each golden step) through model.forward / model.step."""
    logits, state = model.forward([int(t) for t in golden["prompt_ids"]])
    steps = []
    for t in golden["step_ids"]:
        out, state = model.step(int(t), state)
        steps.append(np.array(out, np.float32))
    return np.asarray(logits, np.float32), np.stack(steps)


def _kld(p_logits, q_logits):
    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float((np.exp(lp) * (lp - lq)).sum(-1).max())


def test_default_package_ships():
    assert default_model_path() == DEFAULT_MODEL
    man = read_manifest(DEFAULT_MODEL)
    assert man["config"]["n_layer"] == 6 and man["config"]["n_embd"] == 192
    assert man["files"]["predictors"], "the embedded package ships a predictor bundle"


def test_embedded_dense_matches_rwkv_package(golden):
    """Dense embedded model (int8 weights) vs the `rwkv` package's logits (cpu fp32 on the fp16
    checkpoint): within the int8 rounding (KL divergence, same greedy tokens); numba vs reference
    on the same weights within float error."""
    got = {}
    for backend in ("reference", "numba"):
        model = rwkv_edge.runtime.open_model(DEFAULT_MODEL, backend=backend, dense=True)
        assert model.fingerprint == str(golden["fingerprint"]) and model.modelfile_dtype == "int8"
        got[backend] = _run(model, golden)
    for prompt, steps in got.values():
        assert np.abs(prompt - golden["prompt"]).max() < 0.5 and np.abs(steps - golden["steps"]).max() < 0.5
        assert _kld(golden["prompt"], prompt) < 5e-3 and _kld(golden["steps"], steps) < 5e-3
        assert (steps.argmax(-1) == golden["steps"].argmax(-1)).all()
    # numba's int8 decode also rounds the activations to int8 per 32 (integer dot products; checked
    # exactly against a quantized-activation reference in test_numba_i8dot.py): close, not identical
    for a, b in zip(got["reference"], got["numba"]):
        assert _kld(a, b) < 1e-3 and np.abs(a - b).max() < 0.2


def test_tiny_checkpoint_matches_golden(golden):
    """The official .pth of the embedded model (when ../shared is here) vs the golden logits: exact
    up to float32 rounding."""
    pth = Path(__file__).resolve().parents[2] / "shared" / "models" / "rwkv7-tiny-9m.pth"
    if not pth.exists():
        pytest.skip(f"{pth} not present (the embedded int8 package is checked above)")
    prompt, steps = _run(rwkv_edge.load_model(pth, backend="reference"), golden)
    assert np.abs(prompt - golden["prompt"]).max() < 1e-4 and np.abs(steps - golden["steps"]).max() < 1e-4


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_embedded_sparse_runs_sparse_and_close(golden, backend):
    """The package's default: sparse FFN with its bundle; fewer neurons than dense, same predictions."""
    model = rwkv_edge.load_model(DEFAULT_MODEL, backend=backend)
    ffn = model.ffn
    assert ffn is not None, "a package with predictors opens sparse"
    prompt, steps = _run(model, golden)
    density = ffn.density
    assert 0.02 < density < 0.6
    assert _kld(golden["prompt"], prompt) < 0.05 and _kld(golden["steps"], steps) < 0.05
    assert (steps.argmax(-1) == golden["steps"].argmax(-1)).mean() >= 0.75


def _cli(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, "-m", "rwkv_edge.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def test_generate_without_model_uses_embedded(tmp_path):
    r = _cli("generate", "--prompt", "The old man", "--max-tokens", "8", "--temperature", "0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "embedded default model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert len(r.stdout.strip()) > 0


def _cache_bytes(cache: Path) -> int:
    return sum(f.stat().st_size for f in cache.rglob("*.nb*"))


def test_numba_cache_hits_in_fresh_processes(tmp_path):
    """40 fresh processes decode on the embedded model (dense and sparse, numba): each succeeds and the
    numba cache stops growing after the first (a cache keyed on per-process objects grew ~0.9 MB a run
    and broke after ~31 runs with 'underlying object has vanished')."""
    code = ("import rwkv_edge, numpy as np\n"
            "from rwkv_edge.runtime import DEFAULT_MODEL, open_model\n"
            "for dense in (True, False):\n"
            "    m = open_model(DEFAULT_MODEL, backend='numba', dense=dense)\n"
            "    x, s = m.forward([0, 510, 2000])\n"
            "    y, s = m.step(int(np.argmax(x)), s)\n"
            "    assert np.isfinite(y).all()\n"
            "print('ok')\n")
    cache = tmp_path / "numba-cache"                   # a cold cache of this test's own (no other process writes it)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    size = _cache_bytes(cache)
    assert size > 0
    procs = []
    for _ in range(39):                                # two at a time: CI has 2 cores
        procs.append(subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=env))
        if len(procs) % 2 == 0:
            for p in procs[-2:]:
                p.wait(timeout=600)
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and out.strip() == "ok", err[-2000:]
    assert _cache_bytes(cache) == size, "the numba cache grew after the first process"


def test_auto_backend_falls_back_with_one_warning(tmp_path):
    """Where numba cannot be imported, --backend auto runs the reference backend after one warning line."""
    code = ("import sys\nsys.modules['numba'] = None\n"          # `import numba` now raises ImportError
            "from rwkv_edge.cli import main\n"
            "sys.exit(main(['generate', '--prompt', 'Hi', '--max-tokens', '3', '--temperature', '0']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    warn = [l for l in lines if "warning" in l]
    assert len(warn) == 1 and "numba" in warn[0] and "reference" in warn[0], lines
    assert "Traceback" not in r.stderr and len(lines) == 2                 # the warning + the embedded-model note


def test_no_model_anywhere_is_one_line(tmp_path, monkeypatch):
    """An install whose embedded model was deleted: one line naming --model, exit 2."""
    code = ("import sys, rwkv_edge.runtime as rt\nrt.DEFAULT_MODEL = sys.argv[1]\n"
            "from rwkv_edge.cli import main\nsys.exit(main(['generate', '--prompt', 'Hi']))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "gone")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2 and "--model" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
