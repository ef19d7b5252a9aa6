"""Fuzz every loader with random bytes and random truncations of real files (issue 12).

The files are tests/tiny_assets.py's real model (.pth), converted model file, predictor bundle,
chat state and ONNX export (graph + model.json). Each damaged variant goes to every loader; a
loader must either raise its documented error (ValueError, which ModelLoadError is) or, for the
intact file it reads, succeed. A truncated or random file that loads without an error would be
"silently wrong" and fails the test. Seeded and bounded in time: about `BUDGET_S` seconds per
kind of file, and a few variants go through the real command lines as well.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from test_bad_input import assert_clean, run_cmd

BUDGET_S = 4.0          # per kind of source file
MAX_VARIANTS = 40


def _variants(data: bytes, rng: np.random.Generator):
    """Yield (label, bytes): the empty file, random bytes, and truncations (incl. one byte short)."""
    yield "empty", b""
    yield "one-short", data[:-1]
    for _ in range(MAX_VARIANTS):
        if rng.random() < 0.3:
            yield "random", rng.bytes(int(rng.integers(1, 4096)))
        else:
            yield "truncated", data[: int(rng.integers(1, len(data)))]


def _loaders(a: dict):
    """(name, function(path)) for every file loader; each raises ValueError on bad input."""
    from rwkv_edge import State, load_model
    from rwkv_edge.predictors.bundle import PredictorBundle

    model = load_model(a["model"], backend="reference")
    return [
        ("load_model", lambda p: load_model(p, backend="reference")),
        ("PredictorBundle.load", lambda p: PredictorBundle.load(p, model=model)),
        ("State.load", lambda p: State.load(p, model.config, fingerprint=model.fingerprint)),
    ]


def _onnx_loaders():
    from rwkv_edge.export.export import read_sidecar
    from rwkv_edge.export.run_ort import OrtModel

    return [("read_sidecar", read_sidecar), ("OrtModel", lambda d: OrtModel(str(d)))]


def _expect_error(name, fn, path, label):
    try:
        fn(path)
    except ValueError:
        return
    except Exception as e:   # anything else reaches users as a traceback or an unclear message
        pytest.fail(f"{name}({label} variant of {os.path.basename(str(path))}) raised {type(e).__name__}: {e}")
    pytest.fail(f"{name} accepted a {label} variant of {os.path.basename(str(path))} without an error")


@pytest.mark.parametrize("kind", ["model", "rwkve", "bundle", "state"])
def test_fuzz_file_loaders(kind, bad_input_assets, tmp_path):
    a = bad_input_assets
    loaders = _loaders(a)
    data = Path(a[kind]).read_bytes()
    rng = np.random.default_rng(1234 + len(kind))
    target = tmp_path / ("f" + Path(a[kind]).suffix)
    t0, n = time.perf_counter(), 0
    for label, blob in _variants(data, rng):
        target.write_bytes(blob)
        for name, fn in loaders:
            _expect_error(name, fn, str(target), label)
        n += 1
        if time.perf_counter() - t0 > BUDGET_S:
            break
    assert n >= 5, f"only {n} variants in {BUDGET_S} s"
    # the intact files load with the loader made for them
    for name, fn in loaders:
        ok = {"load_model": ("model", "rwkve"), "PredictorBundle.load": ("bundle",), "State.load": ("state",)}[name]
        if kind in ok:
            fn(a[kind])


@pytest.mark.parametrize("member", ["model.onnx", "model.json"])
def test_fuzz_onnx_export(member, bad_input_assets, tmp_path):
    pytest.importorskip("onnxruntime")
    src = Path(bad_input_assets["onnx"])
    data = (src / member).read_bytes()
    rng = np.random.default_rng(99 + len(member))
    t0, n = time.perf_counter(), 0
    for label, blob in _variants(data, rng):
        if blob.rstrip() == data.rstrip():
            continue       # only trailing whitespace of model.json cut: the same JSON, rightly accepted
        d = tmp_path / f"v{n}"
        shutil.copytree(src, d)
        (d / member).write_bytes(blob)
        for name, fn in _onnx_loaders():
            _expect_error(name, fn, d, label)
        shutil.rmtree(d)
        n += 1
        if time.perf_counter() - t0 > BUDGET_S:
            break
    assert n >= 5
    for name, fn in _onnx_loaders():
        fn(src)


def test_fuzz_through_the_command_lines(bad_input_assets, tmp_path):
    """One random truncation of each kind through the CLI: one line, exit 2 (a failed /load keeps chat)."""
    a = bad_input_assets
    rng = np.random.default_rng(7)

    def cut(key, name):
        data = Path(a[key]).read_bytes()
        p = tmp_path / name
        p.write_bytes(data[: int(rng.integers(1, len(data)))])
        return str(p)

    files = {"m": cut("model", "m.pth"), "b": cut("bundle", "b.npz"), "s": cut("state", "s.npz"),
             "model": a["model"], "rwkve": cut("rwkve", "m.rwkve")}
    onnx = tmp_path / "onnx"
    shutil.copytree(a["onnx"], onnx)
    g = (onnx / "model.onnx").read_bytes()
    (onnx / "model.onnx").write_bytes(g[: int(rng.integers(1, len(g)))])
    files["onnx"] = str(onnx)
    for cmd, stdin, code, words in [
        (["rwkv-edge", "generate", "--model", "{m}", "--prompt", "hi"], None, 2, ["m.pth"]),
        (["rwkv-edge", "generate", "--model", "{rwkve}", "--prompt", "hi"], None, 2, ["m.rwkve"]),
        (["rwkv-edge", "generate", "--model", "{model}", "--predictors", "{b}", "--prompt", "hi"], None, 2, ["b.npz"]),
        (["rwkv-edge", "chat", "--model", "{model}", "--max-tokens", "2", "--backend", "reference"],
         b"/load {s}\nhi\n", 0, ["cannot load"]),
        (["export/run_ort.py", "--onnx", "{onnx}", "--prompt", "hi"], None, 2, ["model.onnx"]),
    ]:
        rc, out, err = run_cmd(cmd, files, stdin)
        assert_clean(rc, out, err, code, words, dirs=[tmp_path])
