"""Numba kernels for RWKV-7 decode (T == 1): the time-mix of one token, and a whole block in one call.

A 58M model spends as long in Python between kernels (one dispatch per op, a dozen ops per layer)
as in the kernels themselves, so decode runs one kernel call per block:

    block7_step(b, x, state, i, ctx, ffn)    x (1, D) += time_mix(ln1 x); x += channel_mix(ln2 x)

with the FFN dense over a neuron-bundled layer, dense over plain W_k / W_v, or sparse: the n-bit
W_k predictor picks {j : (W_hat xk)_j >= threshold} and only those neurons are read. It is the math
of models/v7.py `time_mix` + `channel_mix` (tests check it against the model, dense and sparse); the
model calls it only when no hook would be skipped. `time_mix7_step` is the time-mix alone.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import njit as _njit
from numba import prange as _prange
from numba import types as _types
from numba.extending import intrinsic as _intrinsic

from . import numba_common as _common
from .numba_common import (_NO_SCALE, FFNKeyView, FFNValueView, Int4Weight, Int8Weight, _get_num_threads, _kernel_array,
                           _mv_range, _nchunk, _prefetch, counter)
from .numba_cpu import _layer_norm, _margs, _wkv7_step, _xm1
from . import numba_simd as _ns
from .numba_i8dot import mv_any, mv_parallel
from .numba_sparse import _all_neurons, _ffn_parallel, _ffn_range, _qselect, predictor_select


# --- fused RWKV-7 time-mix of one token ----------------------------------------------------------
@_njit(fastmath=True, cache=True, parallel=True)
def _rkv_parallel(Wr, sr, Wk, sk, Wv, sv, xs, rkv, nchunk):
    """rkv[0] = Wr xs[0], rkv[1] = Wk xs[2], rkv[2] = Wv xs[3] (each (1, D)), rows split over threads."""
    O = Wr.shape[0]
    for c in _prange(3 * nchunk):
        m, q = c // nchunk, c % nchunk
        r0 = (q * O // nchunk) // 4 * 4
        r1 = O if q == nchunk - 1 else ((q + 1) * O // nchunk) // 4 * 4
        if m == 0:
            mv_any(Wr, sr, xs[0], rkv[0], r0, r1)
        elif m == 1:
            mv_any(Wk, sk, xs[2], rkv[1], r0, r1)
        else:
            mv_any(Wv, sv, xs[3], rkv[2], r0, r1)


@_intrinsic
def _bits_to_f32(typingctx, i):
    """Reinterpret int32 bits as float32."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], _ir.FloatType())
    return _types.float32(_types.int32), codegen


@_njit(fastmath=True, cache=True, inline="always")
def _exp(x):
    """float32 exp that LLVM can vectorise (libm expf is a scalar call): 2^n * P(f) with
    n = round(x log2 e), |f| <= 1/2, P of degree 6; relative error < 1e-6 for |x| < 87."""
    z = min(max(x * np.float32(1.4426950408889634), np.float32(-126.0)), np.float32(126.0))
    n = np.floor(z + np.float32(0.5))
    f = z - n
    p = np.float32(1.5403530393381606e-4)
    p = p * f + np.float32(1.3333558146428443e-3)
    p = p * f + np.float32(9.6181291076284772e-3)
    p = p * f + np.float32(5.5504108664821580e-2)
    p = p * f + np.float32(2.4022650695910071e-1)
    p = p * f + np.float32(6.9314718055994531e-1)
    p = p * f + np.float32(1.0)
    return p * _bits_to_f32((np.int32(n) + np.int32(127)) << np.int32(23))


@_njit(fastmath=True, cache=True, inline="always")
def _sigmoid(z):
    return np.float32(1.0) / (np.float32(1.0) + _exp(-z))


@_njit(fastmath=True, cache=True, inline="always")
def _prefetch_all(a):
    for l in range(0, a.size * a.itemsize, 64):
        _prefetch(a, l)


@_njit(fastmath=True, cache=True)
def _tm7(x, prev, mix, Wr, sr, Wk, sk, Wv, sv, Wo, so, w0, w1, s_w1, w2, s_w2, a0, a1, s_a1, a2, s_a2,
         g1, s_g1, g2, s_g2, v0, v1, s_v1, v2, s_v2, k_k, k_a, r_k, lnx_w, lnx_b, S_in, S,
         v_first, has_vres, out, v_out, nchunk):
    """RWKV-7 time-mix of one token: the math of models/v7.py `time_mix` for T == 1.
    x, prev (D,); mix (6, D) = x_r, x_w, x_k, x_v, x_a, x_g; S_in -> S (H, N, N) (may alias);
    writes out (1, D) and v_out (D,), the value that layer 0 hands on as v_first."""
    D = x.shape[0]
    H, N = S.shape[0], S.shape[1]
    xs = np.empty((6, 1, D), np.float32)     # (1, D) slabs: C-contiguous 2-D views for _mv_range
    for c in range(6):
        for d in range(D):
            xs[c, 0, d] = x[d] + (prev[d] - x[d]) * mix[c, d]
    rkv = np.empty((3, 1, D), np.float32)
    if nchunk > 1:
        _rkv_parallel(Wr, sr, Wk, sk, Wv, sv, xs, rkv, nchunk)
    else:
        mv_any(Wr, sr, xs[0], rkv[0], 0, D)
        mv_any(Wk, sk, xs[2], rkv[1], 0, D)
        mv_any(Wv, sv, xs[3], rkv[2], 0, D)
    r, k, v = rkv[0, 0], rkv[1, 0], v_out
    v[:] = rkv[2, 0]
    # the LoRAs and the recurrence below compute on little data: fetch the output projection meanwhile
    _prefetch_all(Wo)
    # LoRAs: decay w, in-context learning rate a, output gate g, value-residual gate
    t = np.empty(w1.shape[1], np.float32)
    _xm1(xs[1, 0], w1, s_w1, t)
    for j in range(t.shape[0]):
        t[j] = np.float32(2.0) * _sigmoid(np.float32(2.0) * t[j]) - np.float32(1.0)     # tanh
    w = np.empty(D, np.float32)
    _xm1(t, w2, s_w2, w)
    t = np.empty(a1.shape[1], np.float32)
    _xm1(xs[4, 0], a1, s_a1, t)
    a = np.empty(D, np.float32)
    _xm1(t, a2, s_a2, a)
    t = np.empty(g1.shape[1], np.float32)
    _xm1(xs[5, 0], g1, s_g1, t)
    for j in range(t.shape[0]):
        t[j] = _sigmoid(t[j])
    g = np.empty(D, np.float32)
    _xm1(t, g2, s_g2, g)
    if has_vres:
        t = np.empty(v1.shape[1], np.float32)
        _xm1(xs[3, 0], v1, s_v1, t)
        gv = np.empty(D, np.float32)
        _xm1(t, v2, s_v2, gv)
        for d in range(D):
            v[d] += (v_first[d] - v[d]) * _sigmoid(v0[d] + gv[d])
    kk = np.empty(D, np.float32)
    bb = np.empty(D, np.float32)
    for d in range(D):
        a[d] = _sigmoid(a0[d] + a[d])
        kk[d] = k[d] * k_k[d]
        w[d] = _exp(np.float32(-0.606531) * _sigmoid(w0[d] + w[d]))
    for h in range(H):
        o = h * N
        kh, bh, ah, kah, khh = kk[o:o + N], bb[o:o + N], a[o:o + N], k_a[o:o + N], k[o:o + N]
        ss = np.float32(0.0)
        for j in range(N):
            ss += kh[j] * kh[j]
        inv = np.float32(1.0) / max(np.sqrt(ss), np.float32(1e-12))
        for j in range(N):
            kh[j] *= inv
            bh[j] = kh[j] * ah[j]
            khh[j] = khh[j] * (np.float32(1.0) + (ah[j] - np.float32(1.0)) * kah[j])
            ah[j] = -kh[j]                    # a is used up: it now holds the wkv's "a" = -kk
    # wkv, in place in S (reads and writes through two names that may alias do not vectorise)
    if S.ctypes.data != S_in.ctypes.data:
        S[:] = S_in
    y = np.empty((1, D), np.float32)
    for h in range(H):
        o = h * N
        _wkv7_step(S[h], r[o:o + N], w[o:o + N], k[o:o + N], v[o:o + N], a[o:o + N], bb[o:o + N], y[0, o:o + N])
    # group norm per head (eps 64e-5) + bonus (r . k * r_k) v, output gate, output projection
    for h in range(H):
        o = h * N
        yh, rh, kh, vh, gh, lw, lb = y[0, o:o + N], r[o:o + N], k[o:o + N], v[o:o + N], g[o:o + N], \
            lnx_w[o:o + N], lnx_b[o:o + N]
        mu = np.float32(0.0)
        for j in range(N):
            mu += yh[j]
        mu /= N
        var = np.float32(0.0)
        for j in range(N):
            c = yh[j] - mu
            var += c * c
        inv = np.float32(1.0) / np.sqrt(var / N + np.float32(64e-5))
        bonus = np.float32(0.0)
        for j in range(N):
            bonus += rh[j] * kh[j] * r_k[h, j]
        for j in range(N):
            yh[j] = ((yh[j] - mu) * inv * lw[j] + lb[j] + bonus * vh[j]) * gh[j]
    if nchunk > 1:
        mv_parallel(Wo, so, y, out, nchunk)
    else:
        mv_any(Wo, so, y, out, 0, D)


def _wargs(W):
    """(kernel array, per-row scale) of a linear weight."""
    if type(W) is Int8Weight:
        return W.q, W.scale
    if type(W) is Int4Weight:
        return W.q, W._s
    return _kernel_array(np.asarray(W)), _NO_SCALE


def _tm7_static(b, has_v):
    """The per-block kernel arguments, built once and cached on the block (weights never change)."""
    key = "_nb_tm7_v" if has_v else "_nb_tm7"
    args = b.__dict__.get(key)
    if args is None:
        mix = np.ascontiguousarray(np.stack([b.x_r, b.x_w, b.x_k, b.x_v, b.x_a, b.x_g]), np.float32)
        v0, v1, v2 = (b.v0, b.v1, b.v2) if has_v else (b.w0, b.w1, b.w2)   # placeholders in layer 0
        args = (mix, *_wargs(b.att_r), *_wargs(b.att_k), *_wargs(b.att_v), *_wargs(b.att_o),
                b.w0, *_margs(b.w1), *_margs(b.w2), b.a0, *_margs(b.a1), *_margs(b.a2),
                *_margs(b.g1), *_margs(b.g2), v0, *_margs(v1), *_margs(v2), b.k_k, b.k_a, b.r_k, b.lnx_w, b.lnx_b)
        nbytes = (sum(m.nbytes for m in (b.att_r, b.att_k, b.att_v, b.att_o)),
                  sum(m.nbytes for m in (b.w1, b.w2, b.a1, b.a2, b.g1, b.g2)) + ((b.v1.nbytes + b.v2.nbytes) if has_v else 0))
        args = b.__dict__[key] = (args, nbytes, 1 if b.att_r.shape[0] * b.att_r.shape[1] * 3 < _common.PAR_MIN else 0)
    return args


def time_mix7_step(b, x: np.ndarray, prev: np.ndarray, wkv: np.ndarray, v_first, wkv_out=None):
    """The whole RWKV-7 time-mix of one token in one kernel call.

    b: a block of models/v7.py (`model.blocks[i]`); x (1, D): the ln1-normalised input; prev (D,): the
    token-shift state; wkv (H, N, N): the state; v_first (1, D): layer 0's value, None in layer 0.
    wkv_out: where the new state goes (may be `wkv` itself, updated in place); a new array if None.
    Returns (out (1, D), new wkv, v (1, D)): equal to v7 `time_mix` with T == 1. The block's weights
    are gathered once and cached on `b` (replace the block, not its arrays, to change weights).
    """
    D = x.shape[-1]
    has_v = v_first is not None
    static, nbytes, serial = _tm7_static(b, has_v)
    out = np.empty((1, D), np.float32)
    v = np.empty((1, D), np.float32)
    S = np.empty_like(wkv) if wkv_out is None else wkv_out
    _tm7(x.reshape(-1), prev, *static, wkv, S, v_first.reshape(-1) if has_v else v[0], has_v,
         out, v[0], 1 if serial else _nchunk())
    if counter.enabled:
        counter.add("linear", nbytes[0])
        counter.add("matmul", nbytes[1])
    return out, S, v


# --- one whole block --------------------------------------------------------------------------------
FFN_BUNDLED, FFN_SPARSE_Q, FFN_PLAIN = 0, 1, 2     # FFN kinds of the block kernel (see _ffn_spec)

_NO_KV = np.zeros((0, 2, 1), np.float32)
_NO_SC2 = np.zeros((0, 2), np.float32)
_NO_W = np.zeros((0, 1), np.float32)
_NO_PT = np.zeros((0, 1, 1), np.uint8)
_NO_ST = np.zeros((0, 1), np.uint16)
_NO_IDX = np.zeros(0, np.int32)


@_njit(fastmath=True)
def _block7_mix(x, ln, tm, att_x, S, ffn_x, v_first, has_vres, v_out, ffn_xk, nchunk):
    """First half of a block: x (1, D) += time-mix(ln1 x), updating att_x and S in place; returns the
    token-shifted FFN input xk (1, D) (ffn_x updated) and a scratch row o (1, D) for the FFN output.
    ln (4, D) = ln1 w, b, ln2 w, b; tm: the _tm7 weight arguments."""
    D = x.shape[1]
    xa = np.empty((1, D), np.float32)
    _layer_norm(x, ln[0], ln[1], np.float32(1e-5), xa)
    o = np.empty((1, D), np.float32)
    _tm7(xa[0], att_x, *tm, S, S, v_first, has_vres, o, v_out, nchunk)
    att_x[:] = xa[0]
    for d in range(D):
        x[0, d] += o[0, d]
    _layer_norm(x, ln[2], ln[3], np.float32(1e-5), xa)
    xk = np.empty((1, D), np.float32)
    for d in range(D):
        xk[0, d] = xa[0, d] + (ffn_x[d] - xa[0, d]) * ffn_xk[d]
    ffn_x[:] = xa[0]
    return xk, o


@_njit(fastmath=True)
def _block7_ffn(x, xk, o, kind, n, kv, sc, idx, Wk, sk, Wv, sv, nchunk):
    """Second half: x += FFN(xk). FFN by `kind`: FFN_BUNDLED (kv, sc over all neurons, idx = 0..F-1),
    FFN_SPARSE_Q (kv, sc over the n predicted neurons idx[:n]), FFN_PLAIN (W_k (F, D) and W_v (D, F)
    with optional per-row scales). Returns (neurons whose key row was read, value columns read)."""
    D = x.shape[1]
    nval = 0
    if kind == FFN_PLAIN:
        F = Wk.shape[0]
        k = np.empty((1, F), np.float32)
        if nchunk > 1:
            mv_parallel(Wk, sk, xk, k, nchunk)
        else:
            mv_any(Wk, sk, xk, k, 0, F)
        for j in range(F):
            k[0, j] = k[0, j] * k[0, j] if k[0, j] > 0 else np.float32(0.0)
        if nchunk > 1:
            mv_parallel(Wv, sv, k, o, nchunk)
        else:
            mv_any(Wv, sv, k, o, 0, D)
        n, nval = F, F
    elif nchunk > 1 and kind == FFN_BUNDLED:
        nval = _ffn_parallel(kv, sc, xk[0], idx, o[0], True, nchunk)
    else:
        o[0, :] = 0.0
        nval = _ffn_range(kv, sc, xk[0], idx[:n], 0, n, o[0], kind == FFN_BUNDLED)
    for d in range(D):
        x[0, d] += o[0, d]
    return n, nval


# The cached entry points: one whole block per call. The predictor's select kernel is called by name
# in each, never passed in: a dispatcher argument is a new type in every process (and a dispatcher
# value a dynamic global), so the cache never hit and its index grew each run until numba failed
# with "underlying object has vanished".
@_njit(fastmath=True, cache=True)
def _block7(x, ln, tm, att_x, S, ffn_x, v_first, has_vres, v_out, ffn_xk,
            kind, kv, sc, idx, Pt, St, Zt, bits, thr, Wk, sk, Wv, sv, nchunk):
    """x (1, D) += time-mix(ln1 x); x += FFN(token-shifted ln2 x), updating att_x, S, ffn_x in place
    (see _block7_mix, _block7_ffn). FFN_SPARSE_Q: the predicted set {(W_hat xk)_j >= thr} by the float
    select `_qselect` on the predictor layout Pt, St, Zt (numba_cpu.predictor_select)."""
    xk, o = _block7_mix(x, ln, tm, att_x, S, ffn_x, v_first, has_vres, v_out, ffn_xk, nchunk)
    n = _qselect(Pt, St, Zt, xk[0], bits, thr, idx, 1) if kind == FFN_SPARSE_Q else idx.shape[0]
    return _block7_ffn(x, xk, o, kind, n, kv, sc, idx, Wk, sk, Wv, sv, nchunk)


@_njit(fastmath=True, cache=True)
def _block7_i8(x, ln, tm, att_x, S, ffn_x, v_first, has_vres, v_out, ffn_xk,
               kind, kv, sc, idx, Pt, St, Zt, bits, thr, Wk, sk, Wv, sv, nchunk):
    """_block7 with numba_simd's AVX2 int8 select on its layout (compiled only when called, so only on
    AVX2 machines)."""
    xk, o = _block7_mix(x, ln, tm, att_x, S, ffn_x, v_first, has_vres, v_out, ffn_xk, nchunk)
    n = _ns.select_i8(Pt, St, Zt, xk[0], bits, thr, idx, 1)
    return _block7_ffn(x, xk, o, kind, n, kv, sc, idx, Wk, sk, Wv, sv, nchunk)


def _ffn_spec(b, ffn, layer):
    """(kind, kernel FFN arguments, bytes-counting info) for block b, or None when the FFN in use is
    not one the block kernel runs (then the model takes its generic path)."""
    if ffn is None:
        k, v = b.ffn_key, b.ffn_value
        if type(k) is FFNKeyView and type(v) is FFNValueView and k.bundle is v.bundle:
            bd = k.bundle
            return FFN_BUNDLED, (bd._kv, bd._sc, _all_neurons(bd.F), _NO_PT, _NO_ST, _NO_ST, 2, np.float32(0),
                                 _NO_W, _NO_SCALE, _NO_W, _NO_SCALE), bd
        plain = []
        for w in (k, v):
            if type(w) is Int8Weight:
                plain += [w.q, w.scale]
            elif type(w) is np.ndarray and w.dtype in (np.float32, np.float16) and w.flags.c_contiguous:
                plain += [_kernel_array(w), _NO_SCALE]
            else:
                return None
        return FFN_PLAIN, (_NO_KV, _NO_SC2, _NO_IDX, _NO_PT, _NO_ST, _NO_ST, 2, np.float32(0), *plain), None
    layers = getattr(ffn, "fused", None)          # sparse.SparseFFN with quantized-W_k threshold predictors
    if layers is None:
        return None
    p, bd = layers[layer], ffn.bundles[layer]
    idx = ffn.__dict__.setdefault("_idx_buf", np.empty(bd.F, np.int32))
    select, P, S, Z = predictor_select(p.qm)
    return FFN_SPARSE_Q, (bd._kv, bd._sc, idx, P, S, Z, p.qm.bits, np.float32(p.calib.threshold),
                          _NO_W, _NO_SCALE, _NO_W, _NO_SCALE), (bd, p.qm, select is _ns.select_i8)


def _ln_pack(b):
    ln = b.__dict__.get("_nb_ln")
    if ln is None:
        ln = b.__dict__["_nb_ln"] = np.ascontiguousarray(np.stack([b.ln1_w, b.ln1_b, b.ln2_w, b.ln2_b]), np.float32)
    return ln


def block7_step(b, x: np.ndarray, state, layer: int, ctx: dict, ffn=None) -> bool:
    """Run block `layer` of an RWKV-7 model on one token in one kernel call, in place: x (1, D) float32
    C-contiguous becomes the block's output; state.att_x/wkv/ffn_x[layer] are updated; ctx["v_first"]
    is set by layer 0 and read by the others (as in models/v7.py). ffn: the model's FFN override (None:
    dense; a sparse.SparseFFN with quantized threshold predictors runs fused).
    Returns False, touching nothing, when this FFN cannot run here (the caller uses the generic path)."""
    spec = _ffn_spec(b, ffn, layer)
    if spec is None or not (x.dtype == np.float32 and x.flags.c_contiguous and x.shape[0] == 1):
        return False
    kind, fargs, info = spec
    has_v = layer > 0
    static, nbytes, serial = _tm7_static(b, has_v)
    D = x.shape[1]
    v = np.empty((1, D), np.float32)
    v_first = ctx["v_first"][0] if has_v else v[0]
    nchunk = 1 if serial and kind != FFN_BUNDLED else _nchunk()
    if _get_num_threads() == 1:
        nchunk = 1
    kernel = _block7_i8 if kind == FFN_SPARSE_Q and info[2] else _block7
    n, nval = kernel(x, _ln_pack(b), static, state.att_x[layer], state.wkv[layer], state.ffn_x[layer], v_first,
                      has_v, v[0], b.ffn_xk, kind, *fargs, nchunk)
    if layer == 0:
        ctx["v_first"] = v
    if kind == FFN_SPARSE_Q:
        ffn.n_tokens += 1
        ffn.n_active += int(n)
    if counter.enabled:
        counter.add("linear", nbytes[0])
        counter.add("matmul", nbytes[1])
        if kind == FFN_BUNDLED:
            counter.add("ffn", info.neuron_bytes * info.F)
        elif kind == FFN_SPARSE_Q:
            counter.add("predictor", info[1].nbytes)
            counter.add("ffn", (int(n) + int(nval)) * (info[0].neuron_bytes // 2))
        else:
            counter.add("ffn", b.ffn_key.nbytes + b.ffn_value.nbytes)
    return True
