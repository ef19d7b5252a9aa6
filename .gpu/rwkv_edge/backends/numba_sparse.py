"""Numba kernels of the sparse FFN and of the quantized predictors (re-exported by numba_cpu).

- FFN over the neuron-bundled layout (`NeuronBundledFFN`: neuron j's key row and value column side
  by side): `sparse_ffn` / `sparse_ffn_tokens` read only the neurons of an index set (prefetched
  ahead: the indices are irregular); `_run_ffn` with all neurons is the dense decode FFN.
- The n-bit predictor (quant.QuantizedMatrix) mat-vec from its packed codes, `quant_matvec`, the
  threshold select `predictor_select` (numba_simd's AVX2 int8 kernel where available, see
  `set_simd_select`), and `sparse_ffn_quant` (predict, then the sparse FFN).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import njit as _njit
from numba import prange as _prange
from numba import types as _types
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

from . import numba_common as _common
from .numba_i8dot import key1, key4, prep_x
from .numba_common import (_BLOCK_ELEMS, _threshold_select, NeuronBundledFFN, _dequant_rows, _f32, _get_num_threads, _h2f,
                           _nchunk, _prefetch, counter)

_SIMD = {"on": True}
_PF_NEURONS = 8     # the sparse FFN prefetches the rows of the neurons this far ahead in its index list


def set_simd_select(on: bool) -> None:
    """Use numba_simd's AVX2 int8 select for 2/4-bit predictors where the CPU has AVX2 (on, the
    default) or always the float32 `_qselect` (off: exact float scores, e.g. to compare paths)."""
    _SIMD["on"] = bool(on)


# --- FFN over the neuron-bundled layout ---------------------------------------------------------
@_njit(fastmath=True, cache=True)
def _axpy4(kv, out, j0, h0, j1, h1, j2, h2, j3, h3):
    for d in range(kv.shape[2]):
        out[d] += (h0 * _f32(kv[j0, 1, d]) + h1 * _f32(kv[j1, 1, d])) + (h2 * _f32(kv[j2, 1, d]) + h3 * _f32(kv[j3, 1, d]))


@_njit(fastmath=True, cache=True)
def _ffn_seq(kv, sc, x, idx, lo, hi, out):
    """The dense form of _ffn_range: every neuron of idx[lo:hi] (in order, normally all of them), one
    at a time, its value column read whatever its activation. One neuron is one contiguous key row +
    value column, so this is a single sequential stream that the hardware prefetcher follows: from
    DRAM it ran ~2x faster than the four-neuron interleave that suits scattered sparse sets."""
    D = kv.shape[2]
    has_s = sc.shape[0] > 0
    X, xs, corr = prep_x(kv, x)           # int8 keys: x quantized once, integer dot products
    for p in range(lo, hi):
        j = np.int64(idx[p])
        a = key1(kv, j, x, X, xs, corr)
        if has_s:
            a *= sc[j, 0]
        h = a * a if a > 0 else np.float32(0.0)
        if has_s:
            h *= sc[j, 1]
        v = kv[j, 1]
        for d in range(D):
            out[d] += h * _f32(v[d])
    return hi - lo


def ffn_range(kv, sc, x, idx, lo, hi, out, dense):  # pragma: no cover - njit only (overload below)
    raise NotImplementedError("njit only")


@_overload(ffn_range)
def _ffn_range_ov(kv, sc, x, idx, lo, hi, out, dense):
    """int4 bundles (uint8 kv) run numba_i4dot.ffn4_range, the others _ffn_range_std."""
    if isinstance(kv, _types.Array) and kv.dtype == _types.uint8:
        from .numba_i4dot import ffn4_range
        return lambda kv, sc, x, idx, lo, hi, out, dense: ffn4_range(kv, sc, x, idx, lo, hi, out, dense)
    return lambda kv, sc, x, idx, lo, hi, out, dense: _ffn_range_std(kv, sc, x, idx, lo, hi, out, dense)


@_njit(fastmath=True, cache=True)
def _ffn_range(kv, sc, x, idx, lo, hi, out, dense):
    """out += sum over j in idx[lo:hi] of relu(K[j] . x)^2 V[:, j] for any bundle; returns the value
    columns read (see _ffn_range_std, numba_i4dot.ffn4_range)."""
    return ffn_range(kv, sc, x, idx, lo, hi, out, dense)


@_njit(fastmath=True, cache=True)
def _ffn_range_std(kv, sc, x, idx, lo, hi, out, dense):
    """out += sum over j in idx[lo:hi] of relu(K[j] . x)^2 V[:, j]; returns the value columns read.
    Two passes: all predicted key rows (four at a time, x loads shared), then the value columns of the
    active neurons (four per pass over out); each pass prefetches its own rows ahead. Measured on the
    reference model's sets this beat one interleaved pass (key, then value, per four neurons). dense=True (every neuron, value columns of zero activations
    read too) runs _ffn_seq."""
    if dense:
        return _ffn_seq(kv, sc, x, idx, lo, hi, out)
    D = kv.shape[2]
    kb = D * kv.itemsize                   # bytes of a key row (= of a value column)
    has_s = sc.shape[0] > 0
    pj = np.empty(hi - lo + 4, np.int64)   # active neurons and their h = relu(k . x)^2 (value scale in)
    ph = np.empty(hi - lo + 4, np.float32)
    a4 = np.empty(4, np.float32)
    X, xs, corr = prep_x(kv, x)           # int8 keys: x quantized once, integer dot products
    # pass 1: the key rows of every predicted neuron, four at a time, _PF_NEURONS ahead prefetched
    n = 0
    p = lo
    while p < hi:
        for q in range(p + _PF_NEURONS, min(p + _PF_NEURONS + 4, hi)):
            base = np.int64(idx[q]) * (2 * kb)
            for l in range(0, kb, 64):
                _prefetch(kv, base + l)
        m = min(4, hi - p)
        j0 = np.int64(idx[p])
        j1 = np.int64(idx[p + 1]) if m > 1 else j0
        j2 = np.int64(idx[p + 2]) if m > 2 else j0
        j3 = np.int64(idx[p + 3]) if m > 3 else j0
        key4(kv, j0, j1, j2, j3, x, X, xs, corr, a4)
        for q in range(m):
            j = j0 if q == 0 else (j1 if q == 1 else (j2 if q == 2 else j3))
            a = a4[q] * sc[j, 0] if has_s else a4[q]
            if a > 0:
                pj[n] = j
                ph[n] = a * a * sc[j, 1] if has_s else a * a
                n += 1
        p += m
    # pass 2: the value columns of the active ones, four per pass over out, prefetched the same way
    q = 0
    while q + 4 <= n:
        for r in range(q + _PF_NEURONS, min(q + _PF_NEURONS + 4, n)):
            base = pj[r] * (2 * kb) + kb
            for l in range(0, kb, 64):
                _prefetch(kv, base + l)
        _axpy4(kv, out, pj[q], ph[q], pj[q + 1], ph[q + 1], pj[q + 2], ph[q + 2], pj[q + 3], ph[q + 3])
        q += 4
    for r in range(q, n):
        j, h = pj[r], ph[r]
        for d in range(D):
            out[d] += h * _f32(kv[j, 1, d])
    return n


@_njit(fastmath=True, cache=True)
def _ffn_serial(kv, sc, x, idx, out, dense):
    out[:] = 0.0
    return _ffn_range(kv, sc, x, idx, 0, idx.shape[0], out, dense)


@_njit(fastmath=True, cache=True, parallel=True)
def _ffn_parallel(kv, sc, x, idx, out, dense, nchunk):
    D, K = out.shape[0], idx.shape[0]
    part = np.zeros((nchunk, D), np.float32)
    cnt = np.zeros(nchunk, np.int64)
    for c in _prange(nchunk):
        cnt[c] = _ffn_range(kv, sc, x, idx, c * K // nchunk, (c + 1) * K // nchunk, part[c], dense)
    for d in range(D):
        acc = np.float32(0.0)
        for c in range(nchunk):
            acc += part[c, d]
        out[d] = acc
    return cnt.sum()


@_njit(fastmath=True, cache=True, parallel=True)
def _ffn_tokens(kv, sc, X, idx, offs, out):
    """Per-token sparse FFN for T tokens: token t uses idx[offs[t]:offs[t+1]]."""
    n = np.zeros(X.shape[0], np.int64)
    for t in _prange(X.shape[0]):
        out[t, :] = 0.0
        n[t] = _ffn_range(kv, sc, X[t], idx, offs[t], offs[t + 1], out[t], False)
    return n.sum()


_ARANGE: dict = {}


def _all_neurons(F: int) -> np.ndarray:
    a = _ARANGE.get(F)
    if a is None:
        a = _ARANGE[F] = np.arange(F, dtype=np.int32)
    return a


def _run_ffn(bundle, x, idx, out, dense):
    # a parallel launch pays off only for large sets (the dense FFN); ~10-30% active sets run serially
    if idx.shape[0] * 2 * bundle.D >= 4 * _common.PAR_MIN and _get_num_threads() > 1:
        return _ffn_parallel(bundle._kv, bundle._sc, x, idx, out, dense, _nchunk())
    return _ffn_serial(bundle._kv, bundle._sc, x, idx, out, dense)


def sparse_ffn(x: np.ndarray, idx: np.ndarray, bundle: NeuronBundledFFN, out: np.ndarray | None = None) -> np.ndarray:
    """sum_{j in idx} relu(W_k[j] . x)^2 W_v[:, j] for one token x (D,), reading only the neurons in
    idx (int32, any order, no repeats); a neuron whose activation is zero costs only its key row.
    Returns out (D,) float32 (written in place when given)."""
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous):
        x = np.ascontiguousarray(x, np.float32)
    x = x.reshape(-1)
    if not (type(idx) is np.ndarray and idx.dtype == np.int32 and idx.flags.c_contiguous):
        idx = np.ascontiguousarray(idx, np.int32)
    if out is None:
        out = np.empty(bundle.D, np.float32)
    n_val = _run_ffn(bundle, x, idx, out, False)
    if counter.enabled:
        half = bundle.neuron_bytes // 2
        counter.add("ffn", (idx.shape[0] + int(n_val)) * half)
    return out


def sparse_ffn_tokens(X: np.ndarray, idx: np.ndarray, offsets: np.ndarray, bundle: NeuronBundledFFN) -> np.ndarray:
    """Sparse FFN for T tokens X (T, D) in one call; token t's set is idx[offsets[t]:offsets[t+1]]."""
    X = np.ascontiguousarray(X, np.float32)
    out = np.empty_like(X)
    n_val = _ffn_tokens(bundle._kv, bundle._sc, X, np.ascontiguousarray(idx, np.int32),
                        np.ascontiguousarray(offsets, np.int64), out)
    if counter.enabled:
        counter.add("ffn", (len(idx) + int(n_val)) * (bundle.neuron_bytes // 2))
    return out


def _bundle_blocks(bundle):
    """Yield (j0, j1, K_blk (n, D), V_blk (n, D)) float32 blocks of the bundle (prefill path)."""
    F, D = bundle.F, bundle.D
    if bundle.kv.dtype == np.float32:
        yield 0, F, bundle.kv[:, 0], bundle.kv[:, 1]
        return
    bs = max(16, _BLOCK_ELEMS // (2 * D))
    buf = np.empty((min(bs, F), 2, D), np.float32)
    if bundle.int4:
        from .numba_i4dot import dequant_rows4
        flat_kv, flat_sc = bundle._kv.reshape(F * 2, D // 2), bundle._sc.reshape(F * 2, -1)
    else:
        flat_kv, flat_sc = bundle._kv.reshape(F * 2, D), bundle._sc.reshape(-1)
    for j0 in range(0, F, bs):
        j1 = min(F, j0 + bs)
        (dequant_rows4 if bundle.int4 else _dequant_rows)(flat_kv, flat_sc, 2 * j0, 2 * j1, buf.reshape(-1, D))
        yield j0, j1, buf[: j1 - j0, 0], buf[: j1 - j0, 1]


def _bundle_key(bundle, x2):
    """x2 (T, D) @ W_k.T -> (T, F) (dequantized blocks + BLAS; the decode path is ffn_dense/sparse_ffn)."""
    y = np.empty((x2.shape[0], bundle.F), np.float32)
    for j0, j1, Kb, _ in _bundle_blocks(bundle):
        y[:, j0:j1] = x2 @ Kb.T
    return y


def _bundle_value(bundle, h2):
    """h2 (T, F) @ W_v.T -> (T, D)."""
    out = np.zeros((h2.shape[0], bundle.D), np.float32)
    for j0, j1, _, Vb in _bundle_blocks(bundle):
        out += h2[:, j0:j1] @ Vb
    return out


# --- quantized predictor mat-vec (quant.QuantizedMatrix layout) --------------------------------
@_intrinsic
def _code(typingctx, byte, shift, mask):
    """float32((byte >> shift) & mask) in 32-bit integer arithmetic (numba would widen to int64, which
    does not vectorise well)."""
    def codegen(context, builder, sig, args):
        i32 = _ir.IntType(32)
        v = builder.lshr(builder.zext(args[0], i32), builder.trunc(args[1], i32))
        return builder.uitofp(builder.and_(v, builder.trunc(args[2], i32)), _ir.FloatType())
    return _types.float32(_types.uint8, _types.int64, _types.int64), codegen


_QL = 128   # rows per block of the predictor layout: 128 rows decode side by side in SIMD lanes


@_njit(fastmath=True, cache=True)
def _qmv_blocks(Pt, St, Zt, xp, xsum, bits, y, b0, b1):
    """y for row blocks b0..b1 of the row-blocked layout (see `_predictor_layout`):
    y[r] = sum_g scale[r, g] * (codes_g . x_g) + zero[r, g] * sum(x_g).

    Rows sit in SIMD lanes (Pt[blk, i, l] = byte i of row blk*L + l), so the dot products accumulate
    vertically and the per-group scales apply to whole vectors: no horizontal sums (with one row per
    vector, a horizontal sum per group cost more than the decoding). Telescoped decode: with
    f_j = byte >> (j * bits) (no masking), code_j = f_j - 2^bits f_{j+1}, so sum_j code_j x_j =
    sum_j f_j x'_j with x'_j = x_j - 2^bits x_{j-1} (xp from _q_prepare): per code one shift, one
    convert and one FMA."""
    nbytes, L = Pt.shape[1], Pt.shape[2]
    G = St.shape[0]
    nb = nbytes // G
    acc = np.empty(L, np.float32)
    tot = np.empty(L, np.float32)
    for blk in range(b0, b1):
        tot[:] = 0.0
        for g in range(G):
            acc[:] = 0.0
            for ii in range(nb):
                i = g * nb + ii
                Pi = Pt[blk, i]
                if bits == 2:
                    x0, x1, x2, x3 = xp[0, i], xp[1, i], xp[2, i], xp[3, i]
                    for l in range(L):
                        c = Pi[l]
                        acc[l] += (_code(c, 0, 255) * x0 + _code(c, 2, 255) * x1) + \
                                  (_code(c, 4, 255) * x2 + _code(c, 6, 255) * x3)
                elif bits == 4:
                    x0, x1 = xp[0, i], xp[1, i]
                    for l in range(L):
                        c = Pi[l]
                        acc[l] += _code(c, 0, 255) * x0 + _code(c, 4, 255) * x1
                else:
                    for j in range(8 // bits):
                        xj, sh = xp[j, i], j * bits
                        for l in range(L):
                            acc[l] += _code(Pi[l], sh, 255) * xj
            sg, zg, xs = St[g, blk * L:(blk + 1) * L], Zt[g, blk * L:(blk + 1) * L], xsum[g]
            for l in range(L):
                tot[l] += _h2f(sg[l]) * acc[l] + _h2f(zg[l]) * xs
        yb = y[blk * L:(blk + 1) * L]
        for l in range(L):
            yb[l] = tot[l]


def _predictor_layout(qm):
    """The row-blocked copy of a QuantizedMatrix that the kernels read, built once and cached on it:
    Pt (R/L, bytes per row, L) uint8, St/Zt (G, R) float16 bits, rows padded to a multiple of L."""
    lay = qm.__dict__.get("_nb_layout")
    if lay is None or lay[0] is not qm.packed:
        R, nbytes = qm.packed.shape
        Rp = -(-R // _QL) * _QL
        P = np.zeros((Rp, nbytes), np.uint8)
        P[:R] = qm.packed
        S = np.zeros((qm.n_groups, Rp), np.float16)
        Z = np.zeros((qm.n_groups, Rp), np.float16)
        S[:, :R], Z[:, :R] = qm.scale.T, qm.zero.T
        Pt = np.ascontiguousarray(P.reshape(Rp // _QL, _QL, nbytes).transpose(0, 2, 1))
        lay = qm.__dict__["_nb_layout"] = (qm.packed, Pt, S.view(np.uint16), Z.view(np.uint16))
    return lay[1:]


@_njit(fastmath=True, cache=True)
def _q_prepare(x, bits, G, xp, xsum):
    """xp[j, i] = x'_j of byte i: x[i*per] for j = 0, x[i*per + j] - 2^bits x[i*per + j - 1] after (see
    _qmv_blocks), and the per-group sums of x."""
    per = 8 // bits
    m = np.float32(1 << bits)
    for i in range(x.shape[0] // per):
        xp[0, i] = x[i * per]
        for j in range(1, per):
            xp[j, i] = x[i * per + j] - m * x[i * per + j - 1]
    gs = x.shape[0] // G
    for g in range(G):
        xg = x[g * gs:(g + 1) * gs]
        acc = np.float32(0.0)
        for i in range(gs):
            acc += xg[i]
        xsum[g] = acc


@_njit(fastmath=True, cache=True, parallel=True)
def _qmv_parallel(Pt, St, Zt, xp, xsum, bits, y, nchunk):
    nblk = Pt.shape[0]
    for c in _prange(nchunk):
        _qmv_blocks(Pt, St, Zt, xp, xsum, bits, y, c * nblk // nchunk, (c + 1) * nblk // nchunk)


@_njit(fastmath=True, cache=True)
def _qmv(Pt, St, Zt, x, bits, y, nchunk):
    """y (R padded) = W_hat @ x in one call (the x layout is built here too)."""
    xp = np.empty((8 // bits, Pt.shape[1]), np.float32)
    xsum = np.empty(St.shape[0], np.float32)
    _q_prepare(x, bits, St.shape[0], xp, xsum)
    if nchunk > 1:
        _qmv_parallel(Pt, St, Zt, xp, xsum, bits, y, nchunk)
    else:
        _qmv_blocks(Pt, St, Zt, xp, xsum, bits, y, 0, Pt.shape[0])


@_njit(fastmath=True, cache=True)
def _qselect(Pt, St, Zt, x, bits, thr, idx, nchunk):
    """The predicted set {r : (W_hat x)_r >= thr} into idx (sorted); returns its size."""
    y = np.empty(St.shape[1], np.float32)
    _qmv(Pt, St, Zt, x, bits, y, nchunk)
    return _threshold_select(y, thr, idx)


def predictor_select(qm) -> tuple:
    """(select, P, S, Z) for the threshold select of predictor qm: `select(P, S, Z, x, bits, thr, idx,
    nchunk) -> n` is an njit kernel (callable from other kernels) writing the sorted rows with score
    >= thr into idx. numba_simd.select_i8 (AVX2, activations rounded to int8 per group: score error
    <= numba_simd.error_bound, ~1% of max |score|) where the CPU has AVX2, the predictor is 2/4-bit
    with whole 4-byte chunks per group and `set_simd_select` is on; else the float `_qselect`."""
    from . import numba_simd as ns
    if _SIMD["on"] and ns.available() and ns.supports(qm):
        return (ns.select_i8, *ns.simd_layout(qm))
    return (_qselect, *_predictor_layout(qm))


def _qm_parallel(qm) -> int:
    return _nchunk() if qm.shape[0] * qm.shape[1] >= 4 * _common.PAR_MIN and _get_num_threads() > 1 else 1


def quant_matvec(qm, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """W_hat @ x for a `quant.QuantizedMatrix` (1/2/4/8-bit codes packed little-endian in each byte,
    float16 scale/zero per row or group) and x (C,) -> (R,) float32, reading only packed codes (a
    row-blocked copy of them, built on first use and cached on `qm`)."""
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 1):
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
    Pt, St, Zt = _predictor_layout(qm)
    y = np.empty(St.shape[1], np.float32)
    _qmv(Pt, St, Zt, x, qm.bits, y, _qm_parallel(qm))
    if counter.enabled:
        counter.add("predictor", qm.nbytes)
    R = qm.shape[0]
    if out is not None:
        out[:] = y[:R]
        return out
    return y[:R] if R != y.shape[0] else y


def sparse_ffn_quant(x: np.ndarray, qm, threshold: float, bundle: NeuronBundledFFN,
                     out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Predict and compute in two kernel calls and no Python in between: the active set is
    {j : (W_hat x)_j >= threshold} with W_hat the quantized predictor `qm` (F, D), and the FFN runs
    on it as in `sparse_ffn`.
    Returns (out (D,), size of the predicted set)."""
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.flags.c_contiguous and x.ndim == 1):
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
    if out is None:
        out = np.empty(bundle.D, np.float32)
    select, P, S, Z = predictor_select(qm)
    idx = np.empty(bundle.F, np.int32)
    n = select(P, S, Z, x, qm.bits, np.float32(threshold), idx, _qm_parallel(qm))
    n_val = _run_ffn(bundle, x, idx[:n], out, False)
    if counter.enabled:
        counter.add("predictor", qm.nbytes)
        counter.add("ffn", (int(n) + int(n_val)) * (bundle.neuron_bytes // 2))
    return out, int(n)
