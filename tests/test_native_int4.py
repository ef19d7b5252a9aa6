"""The native C backend on int4 model files (csrc/nk_q4.c) against the numpy reference.

Kernels: the int4 row dots of every kernel set this CPU runs equal a numpy emulation of the integer
math (codes u = q + 8, activation rounded to int8 per 32, sum_g d_g xs_g (u . xq - 8 sum xq) with the
bracket exact), AVX2 and VNNI bit for bit; the value axpy equals float64 h @ V_hat. Whole model
(int4 body + int4 head, int4 body + int8 head "int4-h8", int8 body + int4 head): dense logits and
states equal models/v7.py on the numpy backend on the same (dequantized) weights with every
mat-vec's activation rounded as the kernels round it (test_native._quantizing_reference); prefill vs
steps; sparse on the very sets the native predictor chose; every level and 2 threads agree.
Tolerances as tests/test_native.py (float32 summation order only, plus the rare activation on a
rounding boundary: `_close`)."""
from __future__ import annotations

import numpy as np
import pytest

from rwkv_edge.backends import native
from rwkv_edge.modelfile import convert, load_modelfile
from rwkv_edge.quant.q4 import dequantize_q4, pack_q4, quantize_q4, unpack_q4
from test_native import _bundle, _close, _prefill_then_steps, _quantizing_reference, _rel, _synced, _toks

pytestmark = pytest.mark.skipif(not native.available()[0], reason=f"native backend: {native.available()[1]}")
RNG = np.random.default_rng(11)


def _emulate_dots4(packed, scale, x):
    """(T, n) float64: sum_g d_g xs_g (sum_i u xq - 8 sum_i xq), the bracket in exact integers."""
    n, I = packed.shape[0], 2 * packed.shape[1]
    G = I // 32
    xg = x.reshape(x.shape[0], G, 32)
    mx = np.abs(xg).max(-1)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127.0) / mx, np.float32(0.0)).astype(np.float32)
    xq = np.rint(xg * inv[..., None]).astype(np.int64)                        # (T, G, 32)
    xs = (mx / np.float32(127.0)).astype(np.float32)                           # (T, G)
    u = unpack_q4(packed).astype(np.int64).reshape(n, G, 32)
    brk = np.einsum("ngs,tgs->tng", u, xq) - 8 * xq.sum(-1)[:, None, :]        # (T, n, G) exact
    d = scale.astype(np.float32)                                               # (n, G)
    return (brk * (d[None] * xs[:, None, :]).astype(np.float64)).sum(-1)


@pytest.mark.parametrize("n, I, T", [(13, 64, 1), (64, 512, 3), (5, 96, 64), (8, 288, 2), (4, 32, 5),
                                     (70, 512, 1), (5, 96, 1), (9, 288, 1), (3, 32, 1), (41, 1120, 1), (9, 256, 64),
                                     (6, 1024, 64), (7, 2048, 64), (5, 4096, 37), (9, 256, 1), (37, 2048, 1),
                                     (6, 4096, 1), (3, 8192, 1)])
def test_dots4_equal_integer_emulation(n, I, T):
    """I 64: one pair; 512: the eight-group steps; 96 and 288: an odd last group; 32: that group alone.
    1120: eight-group steps, a pair left over and an odd group. T 1 (decode) prefetches further ahead
    (28 rows at I 512): 70 and 41 rows run past that distance. 256 with T 64: the 512-bit prefill
    kernel's full and partial token tiles; 1024-4096 with T 64 and 37: its token-pair buffer whole and in
    slices (csrc/nk_prefill_kernels.c, 96 KiB on the stack). T 1 with 256-4096 (G % 8 == 0, G <= 128): the
    decode's 512-bit kernel, two rows a register (37: a last register half empty); 8192: past it, 256-bit."""
    W = RNG.standard_normal((n, I)).astype(np.float32)
    packed, scale = quantize_q4(W)
    codes = unpack_q4(packed)
    codes[0] = 15                                     # the largest products (15 x 127 per byte pair)
    packed = pack_q4(codes)
    x = RNG.standard_normal((T, I)).astype(np.float32)
    x[0, :32] = 0.0                                   # an all-zero group: scale 0
    if T > 1:
        x[1, :32] = 3.0                               # xq = 127 throughout: no saturation anywhere
    want = _emulate_dots4(packed, scale, x)
    got = {lv: native.kernel_dots4(packed, scale, x, lv) for lv in native.levels()}
    for lv in got:
        np.testing.assert_allclose(got[lv], want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=lv)
    if "vnni" in got:              # the same int32 lanes as AVX2: identical floats
        assert np.array_equal(got["vnni"], got["avx2"])


@pytest.mark.parametrize("n, D", [(13, 64), (8, 512), (3, 96), (6, 2048)])
def test_axpy4_equals_float_columns(n, D):
    V = RNG.standard_normal((n, D)).astype(np.float32)
    packed, scale = quantize_q4(V)
    h = RNG.standard_normal(n).astype(np.float32) ** 2
    out0 = RNG.standard_normal(D).astype(np.float32)
    Vh = dequantize_q4(packed, scale).astype(np.float64)
    want = out0 + h.astype(np.float64) @ Vh
    bound = 1e-6 * (np.abs(out0) + np.abs(h) @ np.abs(Vh)).max()             # float32 order of n + 1 terms
    got = {}
    for lv in native.levels():
        got[lv] = native.kernel_axpy4(packed, scale, h, out0, lv)
        assert np.abs(got[lv] - want).max() <= bound * (n + 1), lv
    wide = native.kernel_axpy4(packed, scale, h, out0, "vnni512") if D % 32 == 0 else None
    if wide is not None:               # the 512-bit twin (table lookups): the AVX2 kernel's floats
        assert np.array_equal(wide, got["avx2"])


# --- whole model -----------------------------------------------------------------------------------
KINDS = [("int4", None), ("int4", "int8"), ("int8", "int4")]


@pytest.fixture(scope="module")
def files(tiny_ckpt, tmp_path_factory):
    """{(dtype, head_dtype, wide): path}: a random 2-layer RWKV-7 (D 64, F 256) and a wide one (D 512,
    eight-group steps and the AVX2 predictor path), in each int4 storage kind."""
    d = tmp_path_factory.mktemp("native4")
    ck = {False: tiny_ckpt("x070"), True: tiny_ckpt("x070", n_embd=512, head_size=64, seed=3)}
    return {(dt, hd, w): str(convert(ck[w], d / f"m-{dt}-{hd}-{w}.rwkve", dt, head_dtype=hd))
            for dt, hd in KINDS for w in (False, True)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wide", [False, True])
def test_dense_matches_reference(files, kind, wide):
    """Prefill chunks and decode steps, each from the native state, against the quantizing reference;
    the plain float reference within the activation rounding."""
    path = files[kind + (wide,)]
    m = native.NativeRWKV7.open(path)
    assert m.modelfile_dtype == kind[0]
    toks = _toks(40, seed=1)
    q = load_modelfile(path, backend=_quantizing_reference(m.config.n_embd))
    # D 512 (random weights with outliers) has activations near a rounding boundary often enough that
    # a chunk of 8 may hold one: its effect moves the rest of the chunk; chunks of 4 there
    got = _synced(m, q, toks, 4 if wide else 8)
    _synced(m, q, toks[:16], 1)
    plain, _ = load_modelfile(path, backend="reference").forward(toks[:8], full_output=True)
    assert 1e-4 < _rel(got[:8], plain) < 5e-2          # the activation rounding itself


def test_prefill_vs_steps_int4(files):
    """D 64: 70 prompt tokens (two chunks of 64) then 60 steps vs the quantizing reference carried the
    same way, and one prefill of all of them vs the steps."""
    _prefill_then_steps(files["int4", "int8", False], _toks(70, seed=2), _toks(60, seed=3), 1e-3, 2e-3)


@pytest.mark.parametrize("wide, bits", [(False, 2), (True, 2), (True, 4), (True, 1)])
def test_sparse_matches_reference_on_its_sets(files, wide, bits):
    """Sparse int4-h8 on the sets the native predictor chose (recorded), prefill chunks of 4 and decode
    steps, against the quantizing reference's dense math masked to those sets."""
    path = files["int4", "int8", wide]
    m = native.NativeRWKV7.open(path)
    ref = load_modelfile(path, backend="reference")
    sm = m.with_predictors(_bundle(ref, bits))
    assert sm.modelfile_dtype == "int4"
    toks = _toks(24, seed=4)
    L, F = m.config.n_layer, m.config.ffn_dim
    rec = np.zeros((len(toks), L, F), np.uint8)
    got, _ = sm.forward(toks, full_output=True, record=rec)
    assert 0.02 < rec.mean() < 0.9
    q = load_modelfile(path, backend=_quantizing_reference(m.config.n_embd))
    _synced(sm, q, toks, 4, bundle_sets=True)
    steps = _synced(sm, q, toks, 1, bundle_sets=True)
    assert 0.05 < sm.ffn.density < 0.95
    dense, _ = m.forward(toks, full_output=True)
    assert _rel(got, dense) > 1e-3                     # the sets really dropped neurons
    if not wide:                  # D 64 does not flip roundings here: prefill vs steps over all 24
        _close(steps, got)
    # bytes: an int4 FFN row is D / 2 codes + D / 16 bytes of scales
    b0 = sm.bytes_read
    sm.step(toks[0])
    D = m.config.n_embd
    assert sm.bytes_read - b0 == sm._fixed_bytes + int(sm.last_stats.sum()) * (D // 2 + D // 16)


def test_levels_agree_and_threads(files):
    """Every level x 1/2 threads, dense and sparse int4-h8 at D 512: a prefill chunk of 8, then 24
    steps, each from the generic one-thread model's state, within `_close`'s bounds of it per chunk
    (its largest token error; tokens whose sparse sets differ, a score on the threshold, skipped);
    VNNI equals AVX2 bit for bit.

    Per chunk, not per token: a rounding flip (an activation within ~1e-5 of a step's half, e.g.
    layer 1's k input at 10.500012 steps on token 0 from the zero state, which the generic and the
    AVX2 float order round apart) moves every later token of its prefill chunk through the
    recurrence, so per token the first chunk alone counted 8 of 20 "flipped" tokens and one or two
    flipped steps more (which ones depends on the float order, and at 2 threads on which thread
    claimed which FFN chunk) put the median over 1e-4. A wrong row, scale or kernel moves most chunks."""
    path = files["int4", "int8", True]
    toks = _toks(32, seed=5)
    bundle = _bundle(load_modelfile(path, backend="reference"), 2)
    models = {}
    try:
        for lv in native.levels():
            native.set_level(lv)
            for threads in (1, 2):
                m = native.NativeRWKV7.open(path, threads=threads)
                models[lv, threads] = (m, m.with_predictors(bundle))
    finally:
        native.set_level(None)
    L, F = 2, models["generic", 1][0].config.ffn_dim
    for sparse in (0, 1):
        s, errs = None, {k: [] for k in models}
        for chunk in [toks[:8]] + [[t] for t in toks[8:]]:
            outs = {}
            for k, pair in models.items():
                rec = np.zeros((len(chunk), L, F), np.uint8)
                outs[k] = pair[sparse].forward(chunk, s, full_output=True, record=rec if sparse else None)[:1] + (rec,)
            base, brec = outs["generic", 1]
            for k, (o, rec) in outs.items():
                same = (rec == brec).all(axis=(1, 2))
                e = [_rel(g, w) for g, w, ok in zip(o, base, same) if ok]
                if e:
                    errs[k].append(max(e))
            if ("vnni", 1) in outs:
                assert all(np.array_equal(x, y) for x, y in zip(outs["vnni", 1], outs["avx2", 1]))
            s = models["generic", 1][sparse].forward(chunk, s)[1]
        for k, e in errs.items():
            assert len(e) >= (len(toks) - 7) * 0.8 and np.median(e) < 1e-4 and max(e) < 1.5e-2, (k, sparse, e)


def test_native_still_rejects_other_dtypes(tiny_ckpt, tmp_path):
    from rwkv_edge.config import ModelLoadError
    f = str(convert(tiny_ckpt("x070"), tmp_path / "m-int4-h16.rwkve", "int4", head_dtype="fp16"))
    with pytest.raises(ModelLoadError, match="int8 and int4 model files"):
        native.NativeRWKV7.open(f)
