"""Installed names: `pip install .` puts quant/, predictors/ and export/ under the rwkv_edge namespace
(PyPI has unrelated top-level packages with those names) and ships the embedded default model.
Builds a wheel from this checkout (no network: no build isolation, no dependencies) and installs it
into a fresh venv that sees this machine's site-packages for numpy, numba and the rest."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = out.glob("rwkv_edge-*.whl")
    return whl


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"rwkv_edge"}, tops
    for sub in ("quant", "predictors", "export"):
        assert f"rwkv_edge/{sub}/__init__.py" in names
    for part in ("model.json", "model.rwkve", "predictors.npz", "tokenizer.json"):
        assert f"rwkv_edge/data/default/{part}" in names


def test_installed_imports(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    code = ("import importlib.util as u, rwkv_edge, rwkv_edge.quant, rwkv_edge.predictors, rwkv_edge.export\n"
            "from rwkv_edge.runtime import default_model_path\n"
            "assert 'site-packages' in rwkv_edge.__file__, rwkv_edge.__file__\n"
            "assert default_model_path() is not None\n"
            "for top in ('quant', 'predictors', 'export'):\n"
            "    assert u.find_spec(top) is None, top\n"
            "print('ok')\n")
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    r = subprocess.run([str(py), "-c", "import quant"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode != 0 and "No module named 'quant'" in r.stderr
