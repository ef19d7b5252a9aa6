"""Numba CPU backend: the reference function set with fast kernels, fp16/int8 weights, the sparse FFN.

Weights accepted by `linear(x, W)` (W logically (out, in)): float32 or float16 ndarrays, `Int8Weight`
(int8 codes, one float32 scale per output row) and the two views of a `NeuronBundledFFN`
(`bundle.key` (F, D), `bundle.value` (D, F)); `matmul(x, M)` (M (in, out)) takes float32/float16 or
`Int8Cols` (one scale per output column). Decode (T == 1) runs mat-vec kernels that widen each weight
to float32 in registers and accumulate in float32; prefill (T > SMALL_T) dequantizes blocks of rows to
float32 and multiplies them with BLAS.

Beyond the reference set:
- `NeuronBundledFFN`: one layer's FFN neuron-major, kv[j, 0] = W_k[j, :] (key row), kv[j, 1] =
  W_v[:, j] (value column): an active neuron is one contiguous read.
- `sparse_ffn(x, idx, bundle)`: sum_{j in idx} relu(K[j] . x)^2 V[:, j], reading only those neurons
  (prefetched ahead: the indices are irregular); `sparse_ffn_tokens` for T tokens in one call;
  `ffn_dense(xk, key_view, value_view)`: the dense FFN as one pass over the bundle.
- `quant_matvec(qm, x)` / `sparse_ffn_quant(x, qm, threshold, bundle)`: the n-bit predictor
  (quant.QuantizedMatrix) from its packed codes, alone or followed by the sparse FFN. The threshold
  select of 2/4-bit predictors runs numba_simd's AVX2 integer kernel where the CPU has AVX2 (x rounded
  to int8 per group; `set_simd_select(False)` for the float kernel), see `predictor_select`.
- `counter`: bytes of weights read by the kernels while `counter.enabled`; `read_bandwidth()`.

The kernels live in three modules: numba_common.py (weight types, dense mat-vec, helpers),
numba_sparse.py (bundled/sparse FFN, predictor kernels) and this one (the backend's op set,
norms, recurrences); the RWKV-7 fused decode kernels are in numba_v7.py.

float16 is not a numba type: fp16 arrays go to the kernels as uint16 views and are widened with
LLVM `fpext half` (vcvtph2ps), exactly like numpy. Kernel-writing notes: index inner loops from 0 on
slices (numba's negative-index wraparound on x[o + j] stops LLVM vectorising), and never read and
write one array through two names (the state updates copy first, then work in place).
"""
from __future__ import annotations

import numpy as np
from numba import njit as _njit
from numba import prange as _prange

from .numba_common import (_NO_SCALE, FFNKeyView, FFNValueView, Int4Weight, Int8Cols, Int8Weight,  # noqa: F401
                           NeuronBundledFFN, _as_x2d, _f32, _kernel_array, _nchunk, _rows_matvec,
                           counter)
from .numba_sparse import (_all_neurons, _bundle_blocks, _bundle_key, _bundle_value, _run_ffn,  # noqa: F401
                           predictor_select, quant_matvec, set_simd_select, sparse_ffn, sparse_ffn_quant,
                           sparse_ffn_tokens)

name = "numba"


def linear(x: np.ndarray, W) -> np.ndarray:
    """x (..., in) @ W(out, in).T -> (..., out); W float32/float16 ndarray, Int8Weight or an FFN view."""
    x2, lead = _as_x2d(x)
    tw = type(W)
    if tw is Int8Weight:
        Wk, s = W.q, W.scale
    elif tw is Int4Weight:
        Wk, s = W.q, W._s
    elif tw is FFNKeyView or tw is FFNValueView:
        y = (_bundle_key if tw is FFNKeyView else _bundle_value)(W.bundle, x2)
        if counter.enabled:
            counter.add("ffn", W.bundle.nbytes // 2)
        return y.reshape(*lead, -1)
    else:
        Wk = np.asarray(W)
        if Wk.dtype not in (np.float32, np.float16):
            Wk = Wk.astype(np.float32)
        Wk, s = _kernel_array(Wk), _NO_SCALE
    if counter.enabled:
        counter.add("linear", W.nbytes)
    return _rows_matvec(Wk, s, x2).reshape(*lead, -1)


def ffn_dense(xk: np.ndarray, w_key, w_value) -> np.ndarray:
    """relu(xk @ W_k.T)^2 @ W_v.T for xk (T, D). With the two views of one NeuronBundledFFN a decode
    step is one pass over the bundle that reads every key row and value column (a true dense FFN)."""
    if type(w_key) is FFNKeyView and type(w_value) is FFNValueView and w_key.bundle is w_value.bundle:
        b = w_key.bundle
        x2, lead = _as_x2d(xk)
        if counter.enabled:
            counter.add("ffn", b.neuron_bytes * b.F)
        if x2.shape[0] == 1:
            out = np.empty((1, b.D), np.float32)
            _run_ffn(b, x2[0], _all_neurons(b.F), out[0], True)
            return out.reshape(*lead, -1)
        out = np.zeros((x2.shape[0], b.D), np.float32)
        for _, _, Kb, Vb in _bundle_blocks(b):
            h = np.maximum(x2 @ Kb.T, 0.0)
            out += (h * h) @ Vb
        return out.reshape(*lead, -1)
    k = np.maximum(linear(xk, w_key), 0.0)
    return linear(k * k, w_value)


# --- small matrices, norms ----------------------------------------------------------------------
@_njit(fastmath=True, cache=True)
def _xm1(x, M, s, y):
    """y (O,) = x (I,) @ (M (I, O) * s): float32 / fp16-bits / int8 with per-column scales s (or none).
    Four rows of M per pass over y (a quarter of the loads and stores of y)."""
    I, O = M.shape
    y[:] = 0.0
    i = 0
    while i + 4 <= I:
        x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
        for o in range(O):
            y[o] += (x0 * _f32(M[i, o]) + x1 * _f32(M[i + 1, o])) + (x2 * _f32(M[i + 2, o]) + x3 * _f32(M[i + 3, o]))
        i += 4
    for i in range(i, I):
        xi = x[i]
        for o in range(O):
            y[o] += xi * _f32(M[i, o])
    if s.shape[0] > 0:
        for o in range(M.shape[1]):
            y[o] *= s[o]


def _margs(M):
    """(kernel array, per-column scale) of a matmul weight."""
    if type(M) is Int8Cols:
        return M.q, M.scale
    return _kernel_array(M), _NO_SCALE


def matmul(x: np.ndarray, M) -> np.ndarray:
    """x (..., in) @ M (in, out) -> (..., out); M float32/float16 ndarray or Int8Cols (LoRA matrices)."""
    if counter.enabled:
        counter.add("matmul", M.nbytes)
    x2, lead = _as_x2d(x)
    if x2.shape[0] == 1 and M.ndim == 2 and (type(M) is Int8Cols or M.flags.c_contiguous):
        y = np.empty((1, M.shape[1]), np.float32)
        _xm1(x2[0], *_margs(M), y[0])
        return y.reshape(*lead, -1)
    if type(M) is Int8Cols:
        M = M.dequantize()
    return (x2 @ (M if M.dtype == np.float32 else M.astype(np.float32))).reshape(*lead, -1)


@_njit(fastmath=True, cache=True)
def _layer_norm(x, w, b, eps, out):
    T, D = x.shape
    for t in range(T):
        mu = np.float32(0.0)
        for d in range(D):
            mu += x[t, d]
        mu /= D
        var = np.float32(0.0)
        for d in range(D):
            c = x[t, d] - mu
            var += c * c
        inv = np.float32(1.0) / np.sqrt(var / D + eps)
        for d in range(D):
            out[t, d] = (x[t, d] - mu) * inv * w[d] + b[d]


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x2, lead = _as_x2d(x)
    out = np.empty_like(x2)
    _layer_norm(x2, w, b, np.float32(eps), out)
    return out.reshape(*lead, -1)


@_njit(fastmath=True, cache=True)
def _group_norm(x, G, w, b, eps, out):
    T, D = x.shape
    n = D // G
    for t in range(T):
        for g in range(G):
            o = g * n
            xs, os, ws, bs = x[t, o:o + n], out[t, o:o + n], w[o:o + n], b[o:o + n]   # slices: see _wkv7_step
            mu = np.float32(0.0)
            for d in range(n):
                mu += xs[d]
            mu /= n
            var = np.float32(0.0)
            for d in range(n):
                c = xs[d] - mu
                var += c * c
            inv = np.float32(1.0) / np.sqrt(var / n + eps)
            for d in range(n):
                os[d] = (xs[d] - mu) * inv * ws[d] + bs[d]


def group_norm(x: np.ndarray, n_groups: int, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Group norm over the last dim split into n_groups equal groups (x: (T, D))."""
    x2, _ = _as_x2d(x)
    out = np.empty_like(x2)
    _group_norm(x2, n_groups, w, b, np.float32(eps), out)
    return out


# --- recurrences ----------------------------------------------------------------------------------
@_njit(fastmath=True, cache=True)
def _wkv7_step(S, rt, wt, kt, vt, at, bt, yt):
    """One token on one head: S (N, N) [value i, key j] in place, S = S * w + (S @ a) b^T + v k^T,
    yt = S @ r. All vectors are (N,) slices: indexing them from 0 (rather than x[o + j]) spares numba's
    negative-index wraparound, which would stop LLVM from vectorising the j loops."""
    N = S.shape[0]
    for i in range(N):
        sa = np.float32(0.0)
        for j in range(N):
            sa += S[i, j] * at[j]
        vi = vt[i]
        acc = np.float32(0.0)
        for j in range(N):
            x = S[i, j] * wt[j] + sa * bt[j] + vi * kt[j]
            S[i, j] = x
            acc += x * rt[j]
        yt[i] = acc


@_njit(fastmath=True, cache=True)
def _wkv7_head(s, h, r, w, k, v, a, b, y):
    """Head h of the state s (H, N, N), updated in place over the T tokens of r..b (T, H*N)."""
    N = s.shape[1]
    o = h * N
    for t in range(r.shape[0]):
        _wkv7_step(s[h], r[t, o:o + N], w[t, o:o + N], k[t, o:o + N], v[t, o:o + N], a[t, o:o + N],
                   b[t, o:o + N], y[t, o:o + N])


@_njit(fastmath=True, cache=True, parallel=True)
def _wkv7(s_in, s, r, w, k, v, a, b, y):
    """Prefill: heads in parallel. The state is copied once and updated in place (reads and writes
    through two names that may alias keep LLVM from vectorising)."""
    if s.ctypes.data != s_in.ctypes.data:
        s[:] = s_in
    for h in _prange(s.shape[0]):
        _wkv7_head(s, h, r, w, k, v, a, b, y)


@_njit(fastmath=True, cache=True)
def _wkv7_one(s_in, s, r, w, k, v, a, b, y):
    """T == 1 serial twin of _wkv7 (a parallel launch costs more than the work)."""
    if s.ctypes.data != s_in.ctypes.data:
        s[:] = s_in
    for h in range(s.shape[0]):
        _wkv7_head(s, h, r, w, k, v, a, b, y)


def wkv7(state, r, w, k, v, a, b):
    """RWKV-7 state update (see reference.wkv7). Returns (y (T, H*N), new state (H, N, N))."""
    s_in = np.ascontiguousarray(state, np.float32)
    args = [_as_x2d(t)[0] for t in (r, w, k, v, a, b)]
    s = np.empty_like(s_in)
    y = np.empty((args[0].shape[0], s_in.shape[0] * s_in.shape[1]), np.float32)
    (_wkv7_one if y.shape[0] == 1 else _wkv7)(s_in, s, *args, y)
    return y, s


@_njit(fastmath=True, cache=True)
def _wkv_decay(s_in, s, r, k, v, w, u, y):
    """RWKV-5/6: y_t = (S + u * v k^T) @ r ; S = S * w_t[j] + v k^T. w: (T, H*N), u: (H, N)."""
    H, N = s.shape[0], s.shape[1]
    if s.ctypes.data != s_in.ctypes.data:
        s[:] = s_in
    for h in range(H):
        o = h * N
        S, uh = s[h], u[h]
        for t in range(r.shape[0]):
            rt, kt, vt, wt, yt = r[t, o:o + N], k[t, o:o + N], v[t, o:o + N], w[t, o:o + N], y[t, o:o + N]
            for i in range(N):
                vi = vt[i]
                acc = np.float32(0.0)
                for j in range(N):
                    kv = vi * kt[j]
                    acc += (S[i, j] + uh[j] * kv) * rt[j]
                    S[i, j] = S[i, j] * wt[j] + kv
                yt[i] = acc


def _wkv56(state, r, k, v, w, u):
    s_in = np.ascontiguousarray(state, np.float32)
    r, k, v, w = (_as_x2d(t)[0] for t in (r, k, v, w))
    s = np.empty_like(s_in)
    y = np.empty((r.shape[0], s_in.shape[0] * s_in.shape[1]), np.float32)
    _wkv_decay(s_in, s, r, k, v, w, np.ascontiguousarray(u, np.float32).reshape(s_in.shape[:2]), y)
    return y, s


def wkv5(state, r, k, v, w, u):
    """RWKV-5.2 state update (see reference.wkv5); w: (H, N) fixed decay."""
    T = np.shape(r)[0]
    return _wkv56(state, r, k, v, np.broadcast_to(np.reshape(w, (1, -1)), (T, np.size(w))), u)


def wkv6(state, r, k, v, w, u):
    """RWKV-6 state update (see reference.wkv6); w: (T, H*N) per-token decay."""
    return _wkv56(state, r, k, v, w, u)


# --- machine ceiling ---------------------------------------------------------------------------
@_njit(fastmath=True, cache=True)
def _sum(a, lo, hi):
    b = a[lo:hi]        # a slice indexed from 0: a[lo + i] would not vectorise (index wraparound)
    acc = np.float32(0.0)
    for i in range(b.shape[0]):
        acc += b[i]
    return acc


@_njit(fastmath=True, cache=True, parallel=True)
def _read_all(a, nchunk):
    n = a.shape[0]
    part = np.zeros(nchunk, np.float32)
    for c in _prange(nchunk):
        part[c] = _sum(a, c * n // nchunk, (c + 1) * n // nchunk)
    return part.sum()


def read_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Best-of-`repeats` memory read bandwidth in GB/s with the current numba thread count (a float32
    sum over `mib` MiB, far larger than the caches): the ceiling for bytes-read-per-token figures."""
    import time

    a = np.ones(mib * (1 << 20) // 4, np.float32)
    nchunk = _nchunk()
    _read_all(a[:1024], nchunk)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        _read_all(a, nchunk)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best / 1e9
