"""The mmap-able model file: round trips per dtype, header, lazy mapping, atomic writes, clear errors."""
from __future__ import annotations

import json
import mmap
import os
import struct

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.backends import numba_cpu as nb
from rwkv_edge.backends import numba_i8dot as i8d
from rwkv_edge.config import ModelLoadError
from rwkv_edge.modelfile import ALIGN, MAGIC, convert, is_modelfile, load_modelfile, read_header

TOKENS = [5, 17, 200, 3, 99, 42, 7, 250, 0, 1]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256)


@pytest.fixture(scope="module")
def pth_logits(ckpt):
    m = rwkv_edge.load_model(ckpt, backend="reference")
    return m, m.forward(TOKENS, full_output=True)[0]


@pytest.fixture(scope="module")
def files(ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("mf")
    return {dt: convert(ckpt, d / f"tiny-{dt}.rwkve", dt) for dt in ("fp32", "fp16", "int8")}


def test_fp32_file_gives_identical_logits(files, pth_logits):
    model, want = pth_logits
    m = load_modelfile(files["fp32"], backend="reference")
    got, _ = m.forward(TOKENS, full_output=True)
    np.testing.assert_array_equal(got, want)
    assert m.fingerprint == model.fingerprint          # predictor bundles fitted on the .pth still match
    got_nb, _ = load_modelfile(files["fp32"]).forward(TOKENS, full_output=True)
    assert np.abs(got_nb - want).max() <= 1e-4 * np.abs(want).max()


@pytest.mark.parametrize("dtype, tol", [("fp16", 1e-2), ("int8", 0.1)])
def test_quantized_files_close_to_pth(files, pth_logits, dtype, tol):
    """fp16: max |logit diff| <= 1e-2. int8 (weights, LoRAs, FFN per-row/neuron scales): <= 0.1 with
    logits of std ~1, and the same top-1 token almost everywhere."""
    _, want = pth_logits
    for backend in ("numba", "reference"):
        m = load_modelfile(files[dtype], backend=backend)
        got, _ = m.forward(TOKENS, full_output=True)
        assert np.abs(got - want).max() <= tol, backend
        assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    # decode step by step gives the prefill logits
    m = load_modelfile(files[dtype])
    s = None
    for t, tok in enumerate(TOKENS):
        logits, s = m.step(tok, s)
    # int8 decode rounds the activations to int8 per 32 (numba_i8dot) where the CPU has integer kernels
    rel = 3e-2 if dtype == "int8" and i8d.active_for(m.config.n_embd) else 1e-4
    assert np.abs(logits - got[-1]).max() <= rel * np.abs(got).max()


def test_header_layout(files, pth_logits):
    model, _ = pth_logits
    for dt, path in files.items():
        assert is_modelfile(path)
        h = read_header(path)
        assert h["dtype"] == dt and h["config"] == model.config.to_dict()
        assert h["fingerprint"] == model.fingerprint
        assert h["data_start"] % ALIGN == 0 and all(t["offset"] % ALIGN == 0 for t in h["tensors"])
        assert os.path.getsize(path) == h["file_size"]
        names = {t["name"]: t for t in h["tensors"]}
        kv = names["blocks.1.ffn.kv"]
        assert kv["shape"] == [256, 2, 64] and kv["dtype"] == {"fp32": "float32", "fp16": "float16", "int8": "int8"}[dt]
        assert ("blocks.1.ffn.kv_scale" in names) == (dt == "int8")
        if dt == "int8":
            assert names["head.weight.q"]["dtype"] == "int8" and names["head.weight.scale"]["shape"] == [256]
            assert names["blocks.0.att.w1.qc"]["dtype"] == "int8"
        assert names["blocks.0.ln1.weight"]["dtype"] == "float32"


def test_weights_are_mapped_and_bundled(files, ckpt):
    m = load_modelfile(files["int8"])
    b = m.blocks[1]
    assert isinstance(b.ffn_key, nb.FFNKeyView) and b.ffn_value.bundle is b.ffn_key.bundle
    assert isinstance(b.att_r, nb.Int8Weight) and isinstance(m.head, nb.Int8Weight)
    kv = b.ffn_key.bundle.kv
    base = kv
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    assert isinstance(base, mmap.mmap)                  # a view on the mapping, not a copy
    # neuron j's key row and value column: one contiguous block of the file, equal to W_k[j], W_v[:, j]
    from rwkv_edge.weights import load_checkpoint
    _, w = load_checkpoint(ckpt)
    K, V = w["blocks.1.ffn.key.weight"], w["blocks.1.ffn.value.weight"]
    f16 = load_modelfile(files["fp16"]).blocks[1].ffn_key.bundle.kv
    np.testing.assert_array_equal(f16[7, 0], K[7].astype(np.float16))
    np.testing.assert_array_equal(f16[7, 1], V[:, 7].astype(np.float16))


def test_convert_from_weights_pair_and_model(tmp_path, ckpt):
    from rwkv_edge.weights import load_checkpoint
    config, w = load_checkpoint(ckpt)
    p = convert((config, w), tmp_path / "pair.rwkve", "fp16")
    assert read_header(p)["fingerprint"] == rwkv_edge.load_model(ckpt, backend="reference").fingerprint
    with pytest.raises(TypeError):
        convert(object(), tmp_path / "x.rwkve")
    with pytest.raises(ValueError, match="dtype"):
        convert(ckpt, tmp_path / "x.rwkve", "int5")


def test_failed_convert_leaves_nothing(tmp_path, ckpt, monkeypatch):
    import rwkv_edge.quant as quant
    def boom(*a, **k):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(quant, "quantize_int8_rows", boom)
    out = tmp_path / "m.rwkve"
    with pytest.raises(RuntimeError):
        convert(ckpt, out, "int8")
    assert os.listdir(tmp_path) == []


def _one_line_error(path):
    with pytest.raises(ValueError) as e:
        load_modelfile(path)
    assert "\n" not in str(e.value) and os.fspath(path) in str(e.value)
    return str(e.value)


def test_errors(tmp_path, files):
    data = open(files["fp16"], "rb").read()
    bad = tmp_path / "bad.rwkve"
    bad.write_bytes(b"NOTAMODEL" + data[9:])
    assert "magic" in _one_line_error(bad)
    bad.write_bytes(data[:8] + struct.pack("<I", 99) + data[12:])
    assert "version 99" in _one_line_error(bad)
    bad.write_bytes(data[: len(data) // 2])
    assert "truncated" in _one_line_error(bad)
    bad.write_bytes(data[:40])
    assert "truncated" in _one_line_error(bad)
    bad.write_bytes(b"")
    assert "magic" in _one_line_error(bad)
    hb = b'{"tensors": 5}'
    bad.write_bytes(MAGIC + struct.pack("<IIQ", 1, 0, len(hb)) + hb)
    assert "corrupt" in _one_line_error(bad)
    assert "cannot read" in _one_line_error(tmp_path / "missing.rwkve")
    with pytest.raises(ModelLoadError):
        load_modelfile(tmp_path / "missing.rwkve")
    assert not is_modelfile(tmp_path / "missing.rwkve")


def test_header_is_json_after_prefix(files):
    raw = open(files["int8"], "rb").read()
    assert raw[:8] == MAGIC
    (hlen,) = struct.unpack("<Q", raw[16:24])
    json.loads(raw[24:24 + hlen])


@pytest.mark.parametrize("version", ["x052", "x060"])
def test_rwkv5_rwkv6_round_trip(tiny_ckpt, tmp_path, version):
    ckpt = tiny_ckpt(version, n_layer=2, n_embd=64, head_size=16, vocab_size=256)
    want, _ = rwkv_edge.load_model(ckpt, backend="reference").forward(TOKENS, full_output=True)
    for dtype, tol in (("fp16", 1e-2), ("int8", 0.1)):
        m = load_modelfile(convert(ckpt, tmp_path / f"{dtype}.rwkve", dtype))
        assert m.config.version == version
        got, _ = m.forward(TOKENS, full_output=True)
        assert np.abs(got - want).max() <= tol, dtype


def test_cli_convert(ckpt, tmp_path, capsys):
    from rwkv_edge.cli import main
    out = tmp_path / "cli.rwkve"
    assert main(["convert", "--model", ckpt, "--out", str(out), "--dtype", "int8"]) == 0
    assert "dtype int8" in capsys.readouterr().out and read_header(out)["dtype"] == "int8"
    assert main(["convert", "--model", str(tmp_path / "cli.rwkve"), "--out", str(tmp_path / "x.rwkve")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err
