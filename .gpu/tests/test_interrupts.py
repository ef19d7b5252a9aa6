"""Interrupted and repeated runs leave nothing half-written (issue 12, cases 6, 8, 11, 12):
SIGTERM / SIGKILL mid-write, collect killed before its first checkpoint or run again with more
tokens, bench's conversion cache, export directory modes, Ctrl-C in chat, progress and help text."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from test_bad_input import ROOT, assert_clean, message_lines, run_cmd

from rwkv_edge.errors import run_main
from rwkv_edge.fileio import atomic_write


def test_sigterm_mid_write_removes_the_temp_file(tmp_path, capsys):
    target = tmp_path / "out.bin"

    def body():
        with atomic_write(target, prefix=".rwkve-") as f:
            f.write(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGTERM)    # delivered at the next bytecode
            time.sleep(5)
        return 0

    assert run_main("prog", body) == 143
    assert os.listdir(tmp_path) == []
    assert message_lines(capsys.readouterr().err) == ["prog: terminated"]


def test_run_main_bad_input_is_one_line_and_bugs_keep_their_traceback(capsys):
    def bad():
        raise ValueError("m.pth: truncated\nsecond line")
    assert run_main("prog", bad) == 2
    assert capsys.readouterr().err == "prog: error: m.pth: truncated\n"

    def bug():
        raise TypeError("a programming error")
    with pytest.raises(TypeError):
        run_main("prog", bug)


def test_sigkilled_write_is_cleaned_by_the_next_convert(bad_input_assets, tmp_path):
    """A process killed with SIGKILL inside atomic_write leaves its temp file; the next convert into
    that directory removes it (its pid is gone), keeps a live writer's temp, and puts the
    tokenizer.json beside --out, not into the current directory."""
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir(), cwd.mkdir()
    code = ("import os, signal, sys\nfrom rwkv_edge.fileio import atomic_write\n"
            "with atomic_write(sys.argv[1], prefix='.rwkve-') as f:\n"
            "    f.write(b'x' * 100000); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n")
    r = subprocess.run([sys.executable, "-c", code, str(out / "m.rwkve")], cwd=ROOT)
    assert r.returncode == -signal.SIGKILL
    left = [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".rwkve-")
    live = out / f".rwkve-{os.getpid()}-live.tmp"        # a temp of a process still running: kept
    live.write_bytes(b"y")
    rc, o, err = run_cmd(["rwkv-edge", "convert", "--model", bad_input_assets["model"], "--out", str(out / "m.rwkve")],
                         {}, cwd=cwd)
    assert_clean(rc, o, err, 0, ["wrote"])
    assert sorted(os.listdir(out)) == sorted(["m.rwkve", "tokenizer.json", live.name])
    assert os.listdir(cwd) == []


def _collect_cmd(a, out, n):
    return ["rwkv-edge", "collect", "--model", a["model"], "--text", a["text"], "--out", str(out), "--tokens", str(n),
            "--no-progress", "--backend", "reference", "--chunk", "64"]


def test_collect_interrupted_before_first_checkpoint_resumes(bad_input_assets, tmp_path):
    from rwkv_edge import load_model
    from rwkv_edge.predictors.collect import collect, load_layer, read_manifest

    model = load_model(bad_input_assets["model"], backend="reference")
    toks = np.random.default_rng(1).integers(1, 257, 300).tolist()
    calls = []

    def stop(layer, xk):                               # Ctrl-C in the second window
        calls.append(layer)
        if len(calls) > model.config.n_layer:
            raise KeyboardInterrupt
    model.hooks.ffn_input.append(stop)
    with pytest.raises(KeyboardInterrupt):
        collect(model, toks, tmp_path / "a", chunk=64, progress=False)
    model.hooks.ffn_input.remove(stop)
    assert read_manifest(tmp_path / "a")["tokens"] == 0          # a manifest exists from the start
    man = collect(model, toks, tmp_path / "a", chunk=64, progress=False)
    collect(model, toks, tmp_path / "b", chunk=64, progress=False)
    assert man["tokens"] == 300 and man["complete"]
    for layer in range(model.config.n_layer):
        np.testing.assert_array_equal(load_layer(tmp_path / "a", layer), load_layer(tmp_path / "b", layer))


def test_collect_cli_resumes_old_partial_dirs_and_extends_on_more_tokens(bad_input_assets, tmp_path):
    a, out = bad_input_assets, tmp_path / "act"
    out.mkdir()
    (out / "L00_0000.npy").write_bytes(b"left by a run killed before its first manifest")
    rc, o, err = run_cmd(_collect_cmd(a, out, 200), {})
    assert_clean(rc, o, err, 0, ["collected 200 tokens"])
    rc, o, err = run_cmd(_collect_cmd(a, out, 400), {})        # more tokens of the same text: extends
    assert_clean(rc, o, err, 0, ["collected 400 tokens"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["tokens"] == 400 and all(layer["count"] == 400 for layer in man["layers"])
    other_text = tmp_path / "other.txt"
    other_text.write_text("A different text altogether. " * 40)
    cmd = _collect_cmd(a, out, 600)
    cmd[cmd.index("--text") + 1] = str(other_text)
    rc, o, err = run_cmd(cmd, {})
    assert_clean(rc, o, err, 2, ["another text"])


def test_bench_caches_conversions_per_model_fingerprint(bad_input_assets, tmp_path):
    """Two models with the same file name never share a cached conversion; a damaged cache entry
    is converted again."""
    sys.path.insert(0, str(ROOT / "tools"))
    import bench
    from rwkv_edge import load_model
    from rwkv_edge.modelfile import read_header

    a, b = bad_input_assets["model"], bad_input_assets["other_model"]     # both are named m.pth
    assert os.path.basename(a) == os.path.basename(b)
    fa, fb = (load_model(p, backend="reference").fingerprint for p in (a, b))
    work = tmp_path / "bench"
    pa = bench._model_file(a, "fp16", str(work), fa)
    pb = bench._model_file(b, "fp16", str(work), fb)
    assert pa != pb
    assert read_header(pa)["fingerprint"] == fa and read_header(pb)["fingerprint"] == fb
    Path(pb).write_bytes(Path(pb).read_bytes()[:1000])                  # damaged cache entry
    assert read_header(bench._model_file(b, "fp16", str(work), fb))["fingerprint"] == fb


def test_export_directory_follows_the_umask(bad_input_assets):
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(os.stat(bad_input_assets["onnx"]).st_mode) == 0o777 & ~mask


def _as_from_a_terminal():
    """Child side of fork: Ctrl-C as a terminal delivers it. A child inherits an ignored or blocked
    SIGINT from its parent (here the pytest process, after other tests' libraries ran in it), and a
    Python started with SIGINT ignored keeps ignoring it: the chat then waited on stdin forever."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_in_chat_prints_one_line_and_exits_130(bad_input_assets):
    cmd = [sys.executable, "-m", "rwkv_edge.cli", "chat", "--model", bad_input_assets["model"],
           "--max-tokens", "2", "--temperature", "0", "--backend", "reference"]
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         preexec_fn=_as_from_a_terminal)
    try:
        p.stdin.write(b"hi\n")
        p.stdin.flush()
        assert p.stdout.readline().startswith(b"Assistant:")     # the reply came: now waiting on stdin
        p.send_signal(signal.SIGINT)
        try:
            rc = p.wait(timeout=120)     # seconds under a loaded 2-core CI; it exits in ~1 s when idle
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("chat did not exit after Ctrl-C; stderr: " + p.stderr.read().decode()[-2000:])
        err = p.stderr.read().decode()
    finally:
        p.kill()
    assert rc == 130 and "Traceback" not in err
    assert message_lines(err) == ["rwkv-edge chat: interrupted"]


def test_generate_and_chat_help_show_defaults(capsys):
    from rwkv_edge.cli import main

    for cmd, wants in (("generate", ["(default: 100)", "(default: 1.0)"]),
                       ("chat", ["(default: 300)", "(default: 0.85)", "(default: 0.4)"])):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for w in wants:
            assert w in text, (cmd, w)


class _WordTok:
    ids = {"a": 1, " b": 2, " c": 3}

    def encode(self, text):
        return [self.ids[text]]


class _AlwaysB:
    """Predicts token 2 (" b") everywhere."""
    def forward(self, ids, state=None, full_output=False):
        logits = np.zeros((len(ids), 4), np.float32)
        logits[:, 2] = 5.0
        return (logits if full_output else logits[-1]), None


def test_lambada_progress_bar_shows_running_accuracy(capsys):
    from rwkv_edge.evaluate import score_lambada

    r = score_lambada(_AlwaysB(), _WordTok(), [("a", " b"), ("a", " c"), ("a", " b")], progress=True)
    assert r.accuracy == pytest.approx(2 / 3)
    assert "acc=0.6667" in capsys.readouterr().err
