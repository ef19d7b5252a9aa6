"""Bad input through the real command lines (subprocess): one line on stderr, exit code 2, no
traceback, nothing half-written (issue 12). One row per case; add a row to add a case.

A row: (case id, command, stdin, expected exit code, words expected in the output).
- command: a list whose first item is "rwkv-edge" or a script path ("tools/bench.py", "export/run_ort.py");
  "{name}" items are replaced by the paths of tests/tiny_assets.py (plus the damaged files made below);
  bytes items are passed as raw argv bytes.
- exit code 2: stderr (progress bars left out) is exactly one line, "PROG: error: ...", holding every
  word (case-insensitive); exit code 0: the words are in stdout + stderr (notes, chat messages).
Every run must print no "Traceback" and leave no temp file (*.tmp) in the asset directories.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GEN = ["--max-tokens", "3", "--temperature", "0", "--backend", "reference"]   # no kernel compiles in CI

TABLE = [
    # 1. text that is not UTF-8: prompts and chat lines are repaired with a note; text files are refused
    ("1-prompt-bytes", ["rwkv-edge", "generate", "--model", "{model}", "--prompt", b"\xff\xfe hi", *GEN], None, 0,
     ["not valid UTF-8", "U+FFFD"]),
    ("1-chat-bytes", ["rwkv-edge", "chat", "--model", "{model}", *GEN], b"hello \xff\n", 0,
     ["not valid UTF-8", "Assistant:"]),
    ("1-run_ort-bytes", ["export/run_ort.py", "--onnx", "{onnx}", "--prompt", b"\xff", "--max-tokens", "2"], None, 0,
     ["not valid UTF-8"]),
    ("1-perplexity-binary", ["tools/perplexity.py", "--model", "{model}", "--text", "{binary}"], None, 2,
     ["not a UTF-8 text file"]),
    ("1-sparse_check-binary", ["tools/sparse_check.py", "--model", "{model}", "--text", "{binary}"], None, 2,
     ["not a UTF-8 text file"]),
    ("1-collect-binary", ["rwkv-edge", "collect", "--model", "{model}", "--text", "{binary}", "--out", "{work}/act",
                          "--tokens", "64", "--no-progress"], None, 2, ["not a UTF-8 text file"]),
    ("1-lambada-binary", ["tools/lambada.py", "--model", "{model}", "--data", "{binary}"], None, 2, ["not UTF-8"]),
    ("1-vocab-binary", ["rwkv-edge", "generate", "--model", "{model}", "--tokenizer", "{binary_vocab}",
                        "--prompt", "hi"], None, 2, ["not a UTF-8 World vocab"]),
    # 2. negative seed
    ("2-seed", ["rwkv-edge", "generate", "--model", "{model}", "--prompt", "hi", "--seed", "-1"], None, 2,
     ["--seed", ">= 0"]),
    # 3. chat /load of damaged or foreign states: the session goes on (the next reply still comes)
    ("3-load-truncated", ["rwkv-edge", "chat", "--model", "{model}", *GEN], b"/load {state_trunc}\nhi\n", 0,
     ["cannot load", "truncated", "Assistant:"]),
    ("3-load-crc", ["rwkv-edge", "chat", "--model", "{model}", *GEN], b"/load {state_crc}\nhi\n", 0,
     ["cannot load", "CRC", "Assistant:"]),
    ("3-load-nan", ["rwkv-edge", "chat", "--model", "{model}", *GEN], b"/load {state_nan}\nhi\n", 0,
     ["cannot load", "NaN", "Assistant:"]),
    ("3-load-other-model", ["rwkv-edge", "chat", "--model", "{model}", *GEN], b"/load {other_state}\nhi\n", 0,
     ["cannot load", "another model", "Assistant:"]),
    # 4. damaged ONNX exports
    ("4-verify-missing-graph", ["rwkv-edge", "verify-onnx", "--onnx", "{onnx_missing}", "--model", "{model}"], None, 2,
     ["model.onnx", "missing"]),
    ("4-verify-truncated-graph", ["rwkv-edge", "verify-onnx", "--onnx", "{onnx_trunc}", "--model", "{model}"], None, 2,
     ["model.onnx", "truncated"]),
    ("4-verify-list-sidecar", ["rwkv-edge", "verify-onnx", "--onnx", "{onnx_list}", "--model", "{model}"], None, 2,
     ["not an rwkv-edge ONNX sidecar"]),
    ("4-run_ort-missing-graph", ["export/run_ort.py", "--onnx", "{onnx_missing}", "--prompt", "hi"], None, 2,
     ["missing"]),
    ("4-run_ort-truncated-graph", ["export/run_ort.py", "--onnx", "{onnx_trunc}", "--prompt", "hi"], None, 2,
     ["truncated"]),
    ("4-run_ort-list-sidecar", ["export/run_ort.py", "--onnx", "{onnx_list}", "--prompt", "hi"], None, 2,
     ["not an rwkv-edge ONNX sidecar"]),
    # 5. bench / sparse_check with damaged, non-RWKV or foreign files (checked before any run)
    ("5-bench-truncated", ["tools/bench.py", "--model", "{model_trunc}", "--workdir", "{work}"], None, 2,
     ["truncated"]),
    ("5-bench-not-rwkv", ["tools/bench.py", "--model", "{not_rwkv}", "--workdir", "{work}"], None, 2,
     ["unknown layout"]),
    ("5-bench-other-bundle", ["tools/bench.py", "--model", "{model}", "--predictors", "{other_bundle}",
                              "--workdir", "{work}"], None, 2, ["another model"]),
    ("5-bench-random-bundle", ["tools/bench.py", "--model", "{model}", "--predictors", "{random}",
                               "--workdir", "{work}"], None, 2, ["not a predictor bundle"]),
    ("5-bench-model-file-dtype", ["tools/bench.py", "--model", "{model}", "--model-file", "int8={rwkve}",
                                  "--workdir", "{work}"], None, 2, ["--model-file", "holds fp16"]),
    ("5-bench-model-file-random", ["tools/bench.py", "--model", "{model}", "--model-file", "int4-h8={random}",
                                   "--workdir", "{work}"], None, 2, ["--model-file"]),
    ("5-sparse_check-truncated", ["tools/sparse_check.py", "--model", "{model_trunc}", "--text", "{text}"], None, 2,
     ["truncated"]),
    ("5-sparse_check-other-bundle", ["tools/sparse_check.py", "--model", "{model}", "--predictors", "{other_bundle}",
                                     "--text", "{text}"], None, 2, ["another model"]),
    # 7. non-finite weights are named at load and at convert (and nothing is written)
    ("7-generate-inf", ["rwkv-edge", "generate", "--model", "{model_inf}", "--prompt", "hi"], None, 2,
     ["blocks.1.att.key.weight", "NaN/inf"]),
    ("7-convert-inf", ["rwkv-edge", "convert", "--model", "{model_inf}", "--out", "{work}/inf.rwkve"], None, 2,
     ["blocks.1.att.key.weight", "NaN/inf"]),
    # 9. run-time failures of convert / collect / fit-predictors / predictor-report are exit 2 too
    ("9-convert-no-dir", ["rwkv-edge", "convert", "--model", "{model}", "--out", "{work}/no/such/dir/m.rwkve"], None, 2,
     ["does not exist"]),
    ("9-collect-other-model", ["rwkv-edge", "collect", "--model", "{other_model}", "--text", "{text}", "--out", "{act}",
                               "--tokens", "64", "--no-progress"], None, 2, ["another model"]),
    ("9-fit-other-model", ["rwkv-edge", "fit-predictors", "--model", "{other_model}", "--data", "{act}",
                           "--out", "{work}/q.npz", "--no-progress"], None, 2, ["another model"]),
    ("9-report-other-bundle", ["rwkv-edge", "predictor-report", "--model", "{model}", "--predictors", "{other_bundle}",
                               "--text", "{text}", "--no-progress"], None, 2, ["another model"]),
    # 10. a pickle with code in it is refused as unsafe; turning the protection off is never suggested
    ("10-unsafe-pickle", ["rwkv-edge", "generate", "--model", "{evil}", "--prompt", "hi"], None, 2,
     ["refused as unsafe"]),
]


def _damaged_files(a: dict, d: Path) -> dict:
    """The damaged variants the table names, made from the real assets."""
    import torch

    out = {"work": d / "work", "act": os.path.join(os.path.dirname(a["bundle"]), "act")}
    out["work"].mkdir()
    shutil.copy(a["binary"], d / "vocab.txt")
    out["binary_vocab"] = d / "vocab.txt"
    st = Path(a["state"]).read_bytes()
    (d / "state_trunc.npz").write_bytes(st[: len(st) // 2])
    crc = bytearray(st)
    mid = st.index(b"wkv.npy") + 200          # inside the wkv member's data: its CRC no longer matches
    crc[mid] ^= 0xFF
    (d / "state_crc.npz").write_bytes(bytes(crc))
    z = dict(np.load(a["state"]))
    z["wkv"] = z["wkv"].copy()
    z["wkv"][0, 0, 0, 0] = np.nan
    np.savez(d / "state_nan.npz", **z)
    for name in ("state_trunc", "state_crc", "state_nan"):
        out[name] = d / f"{name}.npz"
    for name in ("missing", "trunc", "list"):
        shutil.copytree(a["onnx"], d / f"onnx_{name}")
        out[f"onnx_{name}"] = d / f"onnx_{name}"
    os.unlink(d / "onnx_missing" / "model.onnx")
    g = (d / "onnx_trunc" / "model.onnx").read_bytes()
    (d / "onnx_trunc" / "model.onnx").write_bytes(g[: len(g) // 3])
    (d / "onnx_list" / "model.json").write_text("[]\n")
    m = Path(a["model"]).read_bytes()
    (d / "trunc.pth").write_bytes(m[: len(m) // 2])
    out["model_trunc"] = d / "trunc.pth"
    torch.save({"a": torch.zeros(3)}, d / "not_rwkv.pth")
    out["not_rwkv"] = d / "not_rwkv.pth"
    sd = torch.load(a["model"], weights_only=True)
    sd["blocks.1.att.key.weight"][3, 4] = float("inf")
    (d / "inf").mkdir()
    torch.save(sd, d / "inf" / "m.pth")
    out["model_inf"] = d / "inf" / "m.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "x": _Evil()}, d / "evil.pth")
    out["evil"] = d / "evil.pth"
    return {k: os.fspath(v) for k, v in out.items()}


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo this-must-never-run",))


@pytest.fixture(scope="module")
def files(bad_input_assets, tmp_path_factory):
    return {**bad_input_assets, **_damaged_files(bad_input_assets, tmp_path_factory.mktemp("damaged"))}


def run_cmd(command, files: dict, stdin: bytes | None = None, cwd=None, timeout=300):
    """Run a table command: returns (exit code, stdout str, stderr str)."""
    def fill(x):
        if isinstance(x, bytes):
            return os.fsdecode(x)            # raw argv bytes
        for k, v in files.items():
            x = x.replace("{" + k + "}", v)
        return x
    argv = [fill(x) for x in command]
    exe = [sys.executable, "-m", "rwkv_edge.cli"] if argv[0] == "rwkv-edge" else [sys.executable, str(ROOT / argv[0])]
    if stdin is not None:
        for k, v in files.items():
            stdin = stdin.replace(b"{" + k.encode() + b"}", os.fsencode(v))
    r = subprocess.run(exe + argv[1:], input=stdin if stdin is not None else b"", capture_output=True,
                       cwd=cwd or ROOT, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def message_lines(stderr: str) -> list:
    """stderr without tqdm progress bars and empty lines."""
    return [ln for ln in stderr.replace("\r", "\n").splitlines() if ln.strip() and "it/s]" not in ln
            and "%|" not in ln and "s/it]" not in ln and "tok/s]" not in ln]


def assert_clean(code, out, err, expected_code, words, dirs=()):
    assert "Traceback" not in err, err
    assert code == expected_code, f"exit {code}, expected {expected_code}\nstdout: {out[-500:]}\nstderr: {err[-2000:]}"
    if expected_code == 2:
        lines = message_lines(err)
        assert len(lines) == 1, f"expected one line on stderr, got: {lines}"
        assert ": error: " in lines[0], lines[0]
        text = lines[0]
    else:
        text = out + err
    for w in words:
        assert w.lower() in text.lower(), f"{w!r} not in {text!r}"
    for d in dirs:
        left = [str(p) for p in Path(d).rglob("*.tmp")]
        assert not left, f"temp files left: {left}"


@pytest.fixture(scope="module")
def table_results(files):
    """Every row run once, a few at a time (each is a fresh interpreter importing torch: ~2 s of CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2))) as pool:
        futures = {c[0]: pool.submit(run_cmd, c[1], files, c[2]) for c in TABLE}
        return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_bad_input(case, files, table_results):
    cid, command, stdin, code, words = case
    rc, out, err = table_results[cid]
    assert_clean(rc, out, err, code, words, dirs=[os.path.dirname(files["model"]), files["work"]])
    if cid == "10-unsafe-pickle":
        assert "weights_only" not in err and "this-must-never-run" not in out


def test_bad_input_writes_nothing(files, table_results):
    """No row is expected to write: the work directory is still empty after all of them (no partial
    model file from the failed converts, no bundle from the failed fit, no temp files)."""
    assert os.listdir(files["work"]) == []


def test_failed_load_keeps_the_chat_state(files):
    """A /load that fails leaves the conversation as it was: same greedy reply as without the /load."""
    chat = ["rwkv-edge", "chat", "--model", "{model}", "--max-tokens", "6", "--temperature", "0",
            "--backend", "reference", "--presence-penalty", "0", "--frequency-penalty", "0"]
    _, plain, _ = run_cmd(chat, files, b"hello\nhow are you\n")
    rc, loaded, err = run_cmd(chat, files, b"hello\n/load {state_nan}\nhow are you\n")
    assert rc == 0 and "Traceback" not in err
    replies = lambda s: [ln for ln in s.splitlines() if ln.startswith("Assistant:")]
    assert replies(loaded) == replies(plain) and len(replies(plain)) == 2
