"""The exact zero-skipping ONNX graph (model.exact.onnx): the FFN reads only the W_v rows of the
neurons with relu(k)^2 > 0. It must give the dense graph's logits (int8: bit for bit, since the
gathered rows are the dense graph's codes and the activation codes do not change) and the Python
runtime's; CLI export and verify. Tiny random x070 model (2 layers, D=64, F=256, V=256)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rwkv_edge import load_model  # noqa: E402
from rwkv_edge.export.export import export_onnx, read_sidecar  # noqa: E402
from rwkv_edge.export.onnx_graph import build_graph  # noqa: E402
from rwkv_edge.export.run_ort import OrtModel  # noqa: E402
from rwkv_edge.export.verify import compare  # noqa: E402

TOKENS = [int(t) for t in np.random.default_rng(3).integers(0, 256, 12)]


@pytest.fixture(scope="module")
def ckpt(tiny_ckpt):
    return tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, ffn_mult=4, vocab_size=256, seed=0)


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt, backend="reference")


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("fp16", 1e-5), ("int8", 0.0)])
def test_exact_graph_equals_the_dense_graph(model, tmp_path, dtype, tol):
    out = export_onnx(model, tmp_path / dtype, dtype, prefill=False, exact_sparse=True)
    assert read_sidecar(out)["graphs"]["exact_step"]["file"] == "model.exact.onnx"
    a, b = OrtModel(str(out), "dense"), OrtModel(str(out), "exact")
    sa, sb, worst = a.zero_state(), b.zero_state(), 0.0
    for t in TOKENS:
        la, sa = a.step(t, sa)
        lb, sb = b.step(t, sb)
        worst = max(worst, float(np.abs(la - lb).max()))
    assert worst <= tol, worst
    if dtype == "fp32":   # and the runtime, which the exact graph is verified against
        r = compare(str(out), model, TOKENS, "exact", greedy_tokens=4)
        assert r["max_abs_diff"] < 1e-4 and r["greedy_same"] == 4


def test_exact_graph_reads_gathered_value_rows(model):
    """The value matrix is only reached through a Gather of the non-zero neurons' rows."""
    m = build_graph(model, "int8", exact_ffn=True)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("NonZero") == model.config.n_layer
    consumers = [n for n in m.graph.node if "b0.ffn.value" in n.input]
    assert [n.op_type for n in consumers] == ["Gather"]
    shapes = {t.name: tuple(t.dims) for t in m.graph.initializer}
    assert shapes["b0.ffn.value"] == (model.config.ffn_dim, model.config.n_embd)   # rows = neurons
    with pytest.raises(ValueError, match="one-token"):
        build_graph(model, "fp32", seq=True, exact_ffn=True)


def test_cli_export_and_verify_exact(ckpt, tmp_path, capsys):
    from rwkv_edge.export.cli_commands import add_export_parser, add_verify_parser

    ap = argparse.ArgumentParser(prog="rwkv-edge")
    sub = ap.add_subparsers(dest="command")
    add_export_parser(sub)
    add_verify_parser(sub)

    def run(*argv):
        args = ap.parse_args([str(a) for a in argv])
        return args.func(args, sub.choices[args.command])
    out = tmp_path / "exp"
    assert run("export-onnx", "--model", ckpt, "--out", out, "--exact-sparse", "--no-prefill") == 0
    assert run("verify-onnx", "--onnx", out, "--model", ckpt, "--tokens", "8", "--greedy", "4",
               "--variant", "exact") == 0
    assert "exact (fp32): max |logit diff|" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run("verify-onnx", "--onnx", out, "--model", ckpt, "--variant", "sparse")
    assert e.value.code == 2


def test_int8_topk_graph_at_full_k_equals_the_dense_graph(model, tmp_path):
    """The int8 top-k graph multiplies the gathered int8 codes (MatMulInteger on both sides): with
    k = F every neuron is gathered and the logits are the dense int8 graph's, bit for bit."""
    F = model.config.ffn_dim
    out = export_onnx(model, tmp_path / "full8", "int8", sparse_topk=[F, F], prefill=False)
    ops = {n.op_type for n in __import__("onnx").load(str(out / "model.sparse.onnx")).graph.node}
    assert "MatMulInteger" in ops and "Cast" in ops
    a, b = OrtModel(str(out), "dense"), OrtModel(str(out), "sparse")
    sa, sb = a.zero_state(), b.zero_state()
    for t in TOKENS:
        la, sa = a.step(t, sa)
        lb, sb = b.step(t, sb)
        assert np.array_equal(la, lb)
