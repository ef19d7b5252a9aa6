"""`rwkv-edge eval`: the llama.cpp-style report, stored bases, candidates of every kind, bad input (exit 2)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import SHARED
from rwkv_edge import load_model
from rwkv_edge.cli import main
from rwkv_edge.modelfile import convert
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.predictors.calibrate import Calibration
from rwkv_edge.predictors.quantized import QuantizedPredictor

TOKJSON = SHARED / "models" / "tokenizer.json"
TEXT = ("The old man looked at the sea and saw the boat. It was late, and the wind had turned. "
        "She said nothing for a while, then asked him whether he would come back in the spring. ") * 12


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    if not TOKJSON.exists():
        pytest.skip(f"{TOKJSON} not present")
    d = tmp_path_factory.mktemp("eval")
    for name, seed in (("m", 0), ("other", 1)):
        (d / name).mkdir()
        shutil.copy(tiny_ckpt("x070", vocab_size=16384, seed=seed), d / name / "m.pth")
        shutil.copy(TOKJSON, d / name / "tokenizer.json")
    (d / "t.txt").write_text(TEXT)
    (d / "short.txt").write_text("Too short.")
    (d / "lam.jsonl").write_text("".join(json.dumps({"text": TEXT[i:i + 120].strip()}) + "\n" for i in (0, 90, 200)))
    model = load_model(str(d / "m" / "m.pth"))
    convert(str(d / "m" / "m.pth"), str(d / "m" / "m-int8.rwkve"), "int8")
    for name, thr in (("good", -np.inf), ("bad", None)):          # all neurons, or a raised threshold
        preds = []
        for b in model.blocks:
            p = QuantizedPredictor.fit(np.asarray(b.ffn_key, np.float32), 8, 16)
            s = p.score(np.random.default_rng(0).standard_normal((64, model.config.n_embd)).astype(np.float32))
            p.calib = Calibration(threshold=float(np.quantile(s, 0.95)) if thr is None else thr)
            preds.append(p)
        PredictorBundle(preds, model.fingerprint, model.config, "quantized", 8).save(str(d / f"{name}.npz"))
    return d


def kv(out: str) -> dict:
    return {k: v for k, v in (p.split("=") for p in out.strip().splitlines()[-1].split())}


def run(capsys, *args):
    rc = main(["eval", "--no-progress", "--ctx", "32", *map(str, args)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_report_stored_base_and_candidates(setup, capsys):
    d = setup
    m = d / "m" / "m.pth"
    rc, out, _ = run(capsys, "--model", m, "--candidate", d / "m" / "m-int8.rwkve", "--text", d / "t.txt",
                     "--save-base", d / "base.npz")
    assert rc == 0 and "====== KL divergence statistics ======" in out and "Same top p" in out
    q = kv(out)
    assert {"kld_mean", "kld_p99", "same_top1", "ppl_base", "ppl", "density"} <= set(q)
    assert 0 < float(q["kld_mean"]) < 0.05 and float(q["same_top1"]) > 0.8 and q["density"] == "na"
    rc, out2, _ = run(capsys, "--model", m, "--candidate", d / "m" / "m-int8.rwkve", "--text", d / "t.txt",
                      "--base", d / "base.npz")
    assert rc == 0 and kv(out2)["kld_mean"] == q["kld_mean"] and kv(out2)["ppl_base"] == q["ppl_base"]
    # the base itself as the candidate: KLD 0 (float16 base rows: ~1e-7), same top-1 1.0
    rc, out3, _ = run(capsys, "--model", m, "--candidate", m, "--text", d / "t.txt", "--base", d / "base.npz")
    assert float(kv(out3)["kld_mean"]) < 1e-5 and kv(out3)["same_top1"] == "1"
    # sparse bundles: all neurons -> KLD ~0 at density 1; a raised threshold -> 5% density, large KLD
    rc, good, _ = run(capsys, "--model", m, "--predictors", d / "good.npz", "--text", d / "t.txt", "--base",
                      d / "base.npz")
    rc, bad, _ = run(capsys, "--model", m, "--predictors", d / "bad.npz", "--text", d / "t.txt")
    g, b = kv(good), kv(bad)
    assert float(g["kld_mean"]) < 1e-4 and float(g["density"]) == 1.0
    assert float(b["density"]) < 0.2 and float(b["kld_mean"]) > 100 * float(g["kld_mean"])


@pytest.mark.parametrize("backend", ["auto", "native"])
def test_converted_file_run_sparse_on_predictors(setup, capsys, backend):
    """--candidate FILE --predictors B: the converted file run sparse (native: the C backend; the base
    runs on the default backend), against the same base as the file alone."""
    if backend == "native":
        from rwkv_edge.backends import native
        if not native.available()[0]:
            pytest.skip("native extension not built")
    d = setup
    m, f, t = d / "m" / "m.pth", d / "m" / "m-int8.rwkve", d / "t.txt"
    rc, alone, _ = run(capsys, "--model", m, "--candidate", f, "--text", t, "--backend", backend)
    rc2, good, _ = run(capsys, "--model", m, "--candidate", f, "--predictors", d / "good.npz", "--text", t,
                       "--backend", backend)
    rc3, bad, _ = run(capsys, "--model", m, "--candidate", f, "--predictors", d / "bad.npz", "--text", t,
                      "--backend", backend)
    a, g, b = kv(alone), kv(good), kv(bad)
    assert rc == rc2 == rc3 == 0 and "m-int8.rwkve + good.npz" in good
    # every neuron kept: the file's own KLD (the sparse kernels round in their own order); native counts
    # the density of decode steps only (eval runs windows as prefills): "na" there
    assert float(g["kld_mean"]) < 2 * float(a["kld_mean"]) + 1e-5
    assert g["density"] == ("na" if backend == "native" else "1")
    assert float(b["kld_mean"]) > 10 * float(a["kld_mean"])
    if backend == "native":   # the model file itself as --model, run sparse: the same sets, the same logits
        rc4, own, _ = run(capsys, "--model", f, "--predictors", d / "bad.npz", "--text", t, "--backend", backend,
                          "--tokenizer", d / "m" / "tokenizer.json")
        assert rc4 == 0 and float(kv(own)["kld_mean"]) > 0
    with pytest.raises(SystemExit) as e:
        run(capsys, "--model", m, "--candidate", d / "notexport", "--predictors", d / "good.npz", "--text", t)
    assert e.value.code == 2 and "must be a model file" in capsys.readouterr().err


def test_native_ffn_dense_candidate(setup, capsys):
    """--backend native --native-ffn dense: the converted file on the every-row dense FFN (its value
    activation rounded to int8): a KLD of its own, not the exact FFN's; other candidates: exit 2."""
    from rwkv_edge.backends import native
    if not native.available()[0]:
        pytest.skip("native extension not built")
    d = setup
    m, f, t = d / "m" / "m.pth", d / "m" / "m-int8.rwkve", d / "t.txt"
    rc, exact, _ = run(capsys, "--model", m, "--candidate", f, "--text", t, "--backend", "native")
    rc2, dense, _ = run(capsys, "--model", m, "--candidate", f, "--text", t, "--backend", "native",
                        "--native-ffn", "dense")
    assert rc == rc2 == 0 and "(native ffn dense)" in dense
    e, g = kv(exact), kv(dense)
    assert g["kld_mean"] != e["kld_mean"] and 0 < float(g["kld_mean"]) < 0.05 and float(g["same_top1"]) > 0.8
    with pytest.raises(SystemExit) as ex:
        run(capsys, "--model", m, "--candidate", f, "--text", t, "--backend", "numba", "--native-ffn", "dense")
    assert ex.value.code == 2 and "--native-ffn dense needs --backend native" in capsys.readouterr().err


def test_lambada_mode_reports_both_accuracies(setup, capsys):
    d = setup
    rc, out, _ = run(capsys, "--model", d / "m" / "m.pth", "--candidate", d / "m" / "m.pth", "--lambada",
                     d / "lam.jsonl", "--limit", "2")
    q = kv(out)
    assert rc == 0 and q["lambada_n"] == "2" and q["lambada_acc"] == q["lambada_acc_base"]
    assert q["lambada_ppl"] == q["lambada_ppl_base"] and q["kld_mean"] == "0"


def swapped_tokenizer(d):
    """tokenizer.json with the strings of two ids swapped: a valid tokenizer with another id map."""
    path = d / "swapped.json"
    if not path.exists():
        tj = json.loads(TOKJSON.read_text(encoding="utf-8"))
        vocab = tj["model"]["vocab"]
        a, b = [k for k, v in vocab.items() if v in (300, 301)]
        vocab[a], vocab[b] = vocab[b], vocab[a]
        path.write_text(json.dumps(tj), encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["limit0", "short", "other_model_base", "other_tokenizer_base", "other_text_base",
                                  "dir", "nothing"])
def test_bad_input_is_one_line_exit_2(setup, capsys, case):
    d = setup
    m, t = d / "m" / "m.pth", d / "t.txt"
    if case in ("other_model_base", "other_tokenizer_base", "other_text_base"):
        rc, *_ = run(capsys, "--model", m, "--text", t, "--save-base", d / "b2.npz")
        assert rc == 0
    (d / "notexport").mkdir(exist_ok=True)
    args = {"limit0": ["--model", m, "--candidate", m, "--text", t, "--limit", "0"],
            "short": ["--model", m, "--candidate", m, "--text", d / "short.txt"],
            "other_model_base": ["--model", d / "other" / "m.pth", "--candidate", d / "other" / "m.pth", "--text", t,
                                 "--base", d / "b2.npz"],
            "other_tokenizer_base": ["--model", m, "--tokenizer", swapped_tokenizer(d), "--candidate", m, "--text", t,
                                     "--base", d / "b2.npz"],
            "other_text_base": ["--model", m, "--candidate", m, "--text", t, "--limit", "32", "--base", d / "b2.npz"],
            "dir": ["--model", m, "--candidate", d / "notexport", "--text", t],
            "nothing": ["--model", m, "--text", t]}[case]
    with pytest.raises(SystemExit) as e:
        run(capsys, *args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "error:" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or case in ("limit0", "nothing")     # argparse adds its usage line
    if case == "other_tokenizer_base":
        assert "another tokenizer" in err


def test_save_base_is_atomic(setup, capsys, monkeypatch):
    """A write that fails midway leaves the previous base file as it was and no temp file behind."""
    import rwkv_edge.quality as Q

    d = setup / "atomic"
    d.mkdir(exist_ok=True)
    m, t = setup / "m" / "m.pth", setup / "t.txt"
    rc, *_ = run(capsys, "--model", m, "--text", t, "--save-base", d / "b.npz")
    before = (d / "b.npz").read_bytes()

    def savez(f, **arrays):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(Q.np, "savez", savez)
    rc2, _, err = run(capsys, "--model", m, "--text", t, "--limit", "64", "--save-base", d / "b.npz")
    assert rc == 0 and rc2 != 0 and "No space left" in err and len(err.strip().splitlines()) == 1
    assert (d / "b.npz").read_bytes() == before and sorted(p.name for p in d.iterdir()) == ["b.npz"]


def test_embedded_package_runs_sparse_against_its_dense_weights(setup, capsys):
    from rwkv_edge.runtime import default_model_path

    if default_model_path() is None:
        pytest.skip("no embedded model package in this install")
    rc, out, _ = run(capsys, "--text", setup / "t.txt", "--limit", "64")        # no --model: the embedded one
    q = kv(out)
    assert rc == 0 and "(sparse)" in out and 0 < float(q["density"]) < 0.6
    assert 0 < float(q["kld_mean"]) < 0.1 and float(q["same_top1"]) > 0.8


def test_onnx_export_candidate(setup, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    from rwkv_edge.export.export import export_onnx

    d = setup
    model = load_model(str(d / "m" / "m.pth"))
    F = model.config.ffn_dim
    export_onnx(model, tmp_path / "onnx", "fp32", sparse_topk=[F // 4] * model.config.n_layer, prefill=False)
    rc, dense, _ = run(capsys, "--model", d / "m" / "m.pth", "--candidate", tmp_path / "onnx", "--onnx-variant",
                       "dense", "--text", d / "t.txt", "--limit", "64")
    rc2, sparse, _ = run(capsys, "--model", d / "m" / "m.pth", "--candidate", tmp_path / "onnx", "--text",
                         d / "t.txt", "--limit", "64")
    q, s = kv(dense), kv(sparse)
    assert rc == rc2 == 0 and float(q["kld_mean"]) < 1e-5 and q["same_top1"] == "1" and q["density"] == "na"
    assert float(s["density"]) == pytest.approx(0.25) and float(s["kld_mean"]) > 100 * float(q["kld_mean"])
