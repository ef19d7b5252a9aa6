"""The native backend's decode steps on several threads against one thread (csrc/nk_rwkv7.c: the
LoRA pairs and the per-head time-mix as pool tasks; r/k/v/o rows, predictor rows, FFN neurons and the
head split by nk_pool). The helpers and the D 512 predictor bundle are tests/test_native.py's."""
from __future__ import annotations

import numpy as np
import pytest

import test_native as tn
from rwkv_edge.backends import native
from rwkv_edge.backends.native import NativeRWKV7
from rwkv_edge.modelfile import convert, load_modelfile

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native backend: {native.available()[1]}")


@pytest.fixture(scope="module")
def int8_file_wide(tiny_ckpt, tmp_path_factory):
    """D 512 in 8 heads of 64 (as tests/test_native.py's): the per-head tasks stay on one thread."""
    out = tmp_path_factory.mktemp("native_threads") / "wide-int8.rwkve"
    return str(convert(tiny_ckpt("x070", n_embd=512, head_size=64, seed=3), out, "int8"))


@pytest.fixture(scope="module")
def int8_file_heads16(tiny_ckpt, tmp_path_factory):
    """D 512 in 16 heads of 32: the decode's per-head time-mix tasks run on several threads (the pool
    splits calls of >= 16 items)."""
    out = tmp_path_factory.mktemp("native") / "heads16-int8.rwkve"
    return str(convert(tiny_ckpt("x070", n_embd=512, head_size=32, seed=4), out, "int8"))


def _close_steps(got, want):
    """tn._close for a run of decode steps: an activation on a rounding boundary that rounds the other way
    in one thread count moves the logits of that step and of the steps the recurrence carries it to (seen
    on int8_file_heads16, about 1 run in 30 at ee8141a: steps 4-9 of 12 at 4e-3 to 7e-3, when the FFN
    summed per-thread outputs in claim order; its pieces are now summed in a fixed order, so a thread count
    gives the same floats every run, still another order than 1 thread's), so the median of 12 steps may
    land on them. A wrong row, scale or split moves every step: at least a quarter of the steps within
    float order, and none beyond FLIP."""
    e = np.array([tn._rel(g, w) for g, w in zip(got, want)])
    assert np.percentile(e, 25) < 1e-4 and e.max() < tn.FLIP, e


@pytest.mark.parametrize("fixture", ["int8_file_wide", "int8_file_heads16"])
def test_decode_steps_threads_match_one_thread(request, fixture):
    """Decode steps (T = 1: the LoRA pairs as pool tasks, r/k/v/o rows, predictor rows, FFN neurons
    and the head split over threads) at 2 and 3 threads: the same sets as 1 thread, logits within float
    order (the threads' FFN outputs are summed in another order), for dense and sparse steps; the
    state after the steps too. (1 thread is bit-identical to the build before the time-mix tasks:
    each task computes the same floats.)"""
    path = request.getfixturevalue(fixture)
    ref = load_modelfile(path, backend="reference")
    bundle = tn._bundle(ref, 2)
    prompt, steps = tn._toks(6, seed=11), tn._toks(12, seed=12)
    L, F = 2, None
    runs = {}
    for threads in (1, 2, 3):
        m = NativeRWKV7.open(path, threads=threads)
        F = m.config.ffn_dim
        for mode, mm in (("dense", m), ("sparse", m.with_predictors(bundle))):
            _, s = mm.forward(prompt)
            outs, recs = [], []
            for t in steps:
                rec = np.zeros((1, L, F), np.uint8)
                o, s = mm.forward([t], s, record=rec if mode == "sparse" else None)
                outs.append(o)
                recs.append(rec)
            runs[threads, mode] = (np.stack(outs), np.stack(recs), s)
    for threads in (2, 3):
        for mode in ("dense", "sparse"):
            got, rec, s = runs[threads, mode]
            want, rec1, s1 = runs[1, mode]
            # layer 0's sets depend on nothing a thread count changes; a later layer's input carries the
            # FFN sums of the layers before in another order, so a score on the threshold may flip
            assert np.array_equal(rec[:, :, 0], rec1[:, :, 0])
            assert (rec != rec1).sum(-1).max() <= 8
            if mode == "sparse":
                assert rec.sum() > 0 and rec.mean() < 0.9
            if np.array_equal(rec, rec1):
                _close_steps(got, want)
                assert tn._rel(s.wkv, s1.wkv) < 1e-3 and tn._rel(s.ffn_x, s1.ffn_x) < 1e-3


@pytest.mark.parametrize("fixture", ["int8_file_wide", "int8_file_heads16"])
def test_prefill_threads_match_one_thread(request, fixture):
    """A prefill of 40 tokens (one chunk; csrc/nk_prefill.c: norm + token shift + rounding + predictor
    prep split by token, the token before a thread's share normed again; LoRAs by token; wkv one head per
    item) at 2 and 3 threads against 1 thread. Layer 0 reads nothing whose float order a thread count
    changes (the FFN's per-thread output sums come after it), so its time-mix state (att_x, wkv) and the
    FFN's token shift (ffn_x) are bit-identical, and so are its sparse sets; the last logits and later
    layers within float order, where one activation on a rounding boundary may round the other way and
    the recurrence carries that to the end of the chunk (tn._close). From a non-zero state too (the
    shift of the first token reads att_x)."""
    path = request.getfixturevalue(fixture)
    bundle = tn._bundle(load_modelfile(path, backend="reference"), 2)
    first, toks = tn._toks(5, seed=21), tn._toks(40, seed=22)
    runs = {}
    for threads in (1, 2, 3):
        m = NativeRWKV7.open(path, threads=threads)
        L, F = m.config.n_layer, m.config.ffn_dim
        for mode, mm in (("dense", m), ("sparse", m.with_predictors(bundle))):
            s0 = NativeRWKV7.open(path).forward(first)[1]          # one thread: the same start for all
            rec = np.zeros((len(toks), L, F), np.uint8)
            o, s = mm.forward(toks, s0, record=rec if mode == "sparse" else None)
            runs[threads, mode] = (o, s, rec)
    for threads in (2, 3):
        for mode in ("dense", "sparse"):
            o, s, rec = runs[threads, mode]
            o1, s1, rec1 = runs[1, mode]
            assert np.array_equal(s.att_x[0], s1.att_x[0]) and np.array_equal(s.wkv[0], s1.wkv[0])
            assert np.array_equal(s.ffn_x[0], s1.ffn_x[0]) and np.array_equal(rec[:, 0], rec1[:, 0])
            if mode == "sparse":
                assert rec.sum() > 0 and rec.mean() < 0.9
            if np.array_equal(rec, rec1):      # the last token's logits: at most a rounding flip (tn.FLIP)
                assert tn._rel(o, o1) < tn.FLIP
                assert tn._rel(s.wkv, s1.wkv) < tn.FLIP and tn._rel(s.ffn_x, s1.ffn_x) < tn.FLIP


def test_threads_same_floats_every_run(int8_file_heads16):
    """The FFN's neurons go to threads in a fixed split whose pieces are summed in piece order (csrc/nk_ffn.c),
    so a prefill and decode steps at 2 threads give bit-identical logits and state run after run, whichever
    thread claims which piece (dense and sparse)."""
    bundle = tn._bundle(load_modelfile(int8_file_heads16, backend="reference"), 2)
    m = NativeRWKV7.open(int8_file_heads16, threads=2)
    prompt, steps = tn._toks(40, seed=31), tn._toks(6, seed=32)
    for mm in (m, m.with_predictors(bundle)):
        runs = []
        for _ in range(6):
            outs, s = [], None
            for toks in [prompt] + [[t] for t in steps]:
                o, s = mm.forward(toks, s)
                outs.append(np.array(o))
            runs.append((np.stack(outs), s))
        for outs, s in runs[1:]:
            assert np.array_equal(outs, runs[0][0])
            assert np.array_equal(s.wkv, runs[0][1].wkv) and np.array_equal(s.ffn_x, runs[0][1].ffn_x)


def test_pool_contention_guard():
    """csrc/nk_pool.c's contention guard: after two calls whose worker sat on its chunk (here it sleeps
    2 ms, as a worker descheduled by another process would), the caller runs the next NK_SOLO (256)
    calls alone, every item exactly once, then the threads share the calls again."""
    import ctypes
    lib = native._load()[0]
    lib.nk_test_pool_guard.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    calls, n = 2000, 256
    owner = np.full((calls, n), -2, np.int64)
    assert lib.nk_test_pool_guard(2, calls, n, owner.ctypes.data) == 0
    assert (owner >= 0).all() and (owner <= 1).all()      # every item of every call ran, on thread 0 or 1
    assert (owner[:2] == 1).any(1).all()                  # the stalling calls: the worker took a chunk
    assert (owner[2:200] == 0).all()                      # then the caller alone
    assert (owner[400:] == 1).any()                       # and the threads again
