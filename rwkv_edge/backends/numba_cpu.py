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
  to int8 per group; set RWKV_EDGE_SIMD=0 for the float kernel), see `predictor_select`.
- `counter`: bytes of weights read by the kernels while `counter.enabled`; `read_bandwidth()`.

float16 is not a numba type: fp16 arrays go to the kernels as uint16 views and are widened with
LLVM `fpext half` (vcvtph2ps), exactly like numpy. Kernel-writing notes: index inner loops from 0 on
slices (numba's negative-index wraparound on x[o + j] stops LLVM vectorising), and never read and
write one array through two names (the state updates copy first, then work in place).
"""
from __future__ import annotations

import os

import numpy as np
from llvmlite import ir as _ir
from numba import get_num_threads as _get_num_threads
from numba import njit as _njit
from numba import prange as _prange
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

name = "numba"

PAR_MIN = 1 << 18          # weight elements per call from which kernels use all threads
SMALL_T = 8                # prefill with T <= SMALL_T uses the mat-vec kernels (each row read once)
_BLOCK_ELEMS = 1 << 18     # float32 elements per dequantized block in the BLAS prefill path (1 MiB)
_PF_BYTES = 8192           # mat-vec kernels prefetch this many bytes of rows ahead


class ByteCounter:
    """Bytes of weights read by the kernels, in total and per op, while `enabled`."""

    def __init__(self):
        self.enabled = False
        self.bytes_read = 0
        self.by_op: dict = {}

    def add(self, op: str, n: int) -> None:
        self.bytes_read += n
        self.by_op[op] = self.by_op.get(op, 0) + n

    def reset(self) -> None:
        self.bytes_read = 0
        self.by_op = {}


counter = ByteCounter()


# --- LLVM helpers -----------------------------------------------------------------------------
@_intrinsic
def _h2f(typingctx, h):
    """uint16 bits of an IEEE half -> float32 (exact)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], _ir.HalfType()), _ir.FloatType())
    return _types.float32(_types.uint16), codegen


@_intrinsic
def _prefetch(typingctx, arr, off):
    """Prefetch the cache line at byte offset `off` of arr's data into all cache levels."""
    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        ptr = builder.gep(builder.bitcast(ary.data, _ir.IntType(8).as_pointer()), [args[1]])
        i32 = _ir.IntType(32)
        fn = _cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(_ir.VoidType(), [ptr.type, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [ptr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return _types.void(arr, _types.int64), codegen


def _f32(v):  # pragma: no cover - numba uses the overload below
    return np.float32(v)


@_overload(_f32, inline="always")
def _f32_ov(v):
    if v == _types.uint16:
        return lambda v: _h2f(v)
    return lambda v: np.float32(v)


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """The array a kernel reads: float16 as its uint16 bits, others unchanged."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


_NO_SCALE = np.zeros(0, np.float32)
_NO_SCALE2 = np.zeros((0, 2), np.float32)   # "no scales" for (F, 2) bundle scales


# --- weight types -----------------------------------------------------------------------------
class _ArrayLike:
    """numpy-ish reading of a stored weight for tools written against float32 arrays (`.T`, indexing,
    `@`, `astype`): each use dequantizes the whole matrix, so keep them out of decode loops."""

    ndim = 2
    dtype = np.dtype(np.float32)

    def __array__(self, dtype=None, copy=None):
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype)

    def astype(self, dtype, copy=True):
        return self.dequantize().astype(dtype)

    T = property(lambda self: self.dequantize().T)

    def __getitem__(self, idx):
        return self.dequantize()[idx]

    def __matmul__(self, other):
        return self.dequantize() @ other

    def __rmatmul__(self, other):
        return other @ self.dequantize()


class Int8Weight(_ArrayLike):
    """int8 codes q (out, in) with a float32 scale per output row: W ~= q * scale[:, None]."""

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if q.dtype != np.int8 or q.ndim != 2 or np.shape(scale) != (q.shape[0],):
            raise ValueError(f"Int8Weight needs q int8 (out, in) and scale (out,), got {q.dtype} {q.shape} "
                             f"and {np.shape(scale)}")
        self.q, self.scale = q, np.asarray(scale, np.float32)

    @classmethod
    def from_float(cls, w: np.ndarray) -> "Int8Weight":
        from quant import quantize_int8_rows
        return cls(*quantize_int8_rows(w))

    shape = property(lambda self: self.q.shape)
    nbytes = property(lambda self: self.q.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.dequantize()[idx]
        return self.q[idx].astype(np.float32) * self.scale[idx][..., None]     # rows, e.g. a lookup


class Int8Cols(Int8Weight):
    """int8 codes q (in, out) with a float32 scale per output column, for `matmul` (LoRA matrices)."""

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if q.dtype != np.int8 or q.ndim != 2 or np.shape(scale) != (q.shape[1],):
            raise ValueError(f"Int8Cols needs q int8 (in, out) and scale (out,), got {q.dtype} {q.shape} "
                             f"and {np.shape(scale)}")
        self.q, self.scale = q, np.asarray(scale, np.float32)

    @classmethod
    def from_float(cls, m: np.ndarray) -> "Int8Cols":
        from quant import quantize_int8_rows
        q, s = quantize_int8_rows(np.asarray(m, np.float32).T)
        return cls(np.ascontiguousarray(q.T), s)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[None, :]

    def __getitem__(self, idx):
        return self.dequantize()[idx]


class NeuronBundledFFN:
    """One layer's FFN, neuron-major. kv (F, 2, D): kv[j, 0] = W_k[j, :], kv[j, 1] = W_v[:, j];
    float32, float16, or int8 with scale (F, 2) float32 = (key-row scale, value-column scale)."""

    def __init__(self, kv: np.ndarray, scale: np.ndarray | None = None):
        if kv.ndim != 3 or kv.shape[1] != 2 or kv.dtype not in (np.float32, np.float16, np.int8):
            raise ValueError(f"kv must be (F, 2, D) float32/float16/int8, got {kv.dtype} {kv.shape}")
        if (kv.dtype == np.int8) != (scale is not None) or (scale is not None and scale.shape != kv.shape[:2]):
            raise ValueError("int8 bundles need scale (F, 2); float bundles take none")
        if not kv.flags.c_contiguous:
            raise ValueError("kv must be C-contiguous (one contiguous read per neuron)")
        self.kv = kv
        self.scale = None if scale is None else np.asarray(scale, np.float32)
        self._kv = _kernel_array(kv)
        self._sc = _NO_SCALE2 if scale is None else self.scale
        self.key, self.value = FFNKeyView(self), FFNValueView(self)

    @classmethod
    def from_dense(cls, w_key: np.ndarray, w_value: np.ndarray, dtype: str = "fp16") -> "NeuronBundledFFN":
        """Bundle W_k (F, D) and W_v (D, F); dtype "fp32", "fp16" or "int8" (per-neuron scales)."""
        kv = np.stack([np.asarray(w_key, np.float32), np.asarray(w_value, np.float32).T], axis=1)
        if dtype == "int8":
            scale = (np.abs(kv).max(axis=2) / 127.0).astype(np.float32)             # (F, 2)
            q = np.rint(kv / np.where(scale > 0, scale, 1.0)[:, :, None])
            return cls(np.clip(q, -127, 127).astype(np.int8), scale)
        if dtype in ("fp16", "fp32"):
            return cls(np.ascontiguousarray(kv, np.float16 if dtype == "fp16" else np.float32))
        raise ValueError(f"unknown bundle dtype {dtype!r} (fp32, fp16, int8)")

    F = property(lambda self: self.kv.shape[0])
    D = property(lambda self: self.kv.shape[2])
    nbytes = property(lambda self: self.kv.nbytes + (0 if self.scale is None else self.scale.nbytes))

    @property
    def neuron_bytes(self) -> int:
        """Bytes read per active neuron (key row + value column + their scales)."""
        return 2 * self.D * self.kv.itemsize + (8 if self.scale is not None else 0)

    def dequantize(self) -> tuple[np.ndarray, np.ndarray]:
        """(W_k (F, D), W_v (D, F)) as float32."""
        kv = self.kv.astype(np.float32)
        if self.scale is not None:
            kv *= self.scale[:, :, None]
        return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1].T)


class FFNKeyView(_ArrayLike):
    """W_k (F, D) of a bundle, for `linear(xk, view)`; np.asarray gives it dequantized."""

    def __init__(self, bundle):
        self.bundle = bundle

    shape = property(lambda self: (self.bundle.F, self.bundle.D))
    nbytes = property(lambda self: self.bundle.nbytes // 2)

    def dequantize(self) -> np.ndarray:
        return self.bundle.dequantize()[0]


class FFNValueView(FFNKeyView):
    """W_v (D, F) of a bundle."""

    shape = property(lambda self: (self.bundle.D, self.bundle.F))

    def dequantize(self) -> np.ndarray:
        return self.bundle.dequantize()[1]


# --- dense mat-vec: W (O, I) float32 / uint16 (fp16 bits) / int8, x (T, I), y (T, O) -------------
@_njit(fastmath=True, cache=True)
def _mv_range(W, s, x, y, r0, r1):
    """y[:, r0:r1] = x @ (W[r0:r1] * s).T, four rows at a time (x loads shared), prefetching ahead."""
    I = W.shape[1]
    row_bytes = I * W.itemsize
    ahead = max(4, (_PF_BYTES // row_bytes) // 4 * 4)
    has_s = s.shape[0] > 0
    o = r0
    while o < r1:
        if o + 4 <= r1:
            if o + ahead + 4 <= W.shape[0]:
                base = np.int64(o + ahead) * row_bytes
                for l in range(0, 4 * row_bytes, 64):
                    _prefetch(W, base + l)
            for t in range(x.shape[0]):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                a2 = np.float32(0.0)
                a3 = np.float32(0.0)
                for i in range(I):
                    xi = x[t, i]
                    a0 += _f32(W[o, i]) * xi
                    a1 += _f32(W[o + 1, i]) * xi
                    a2 += _f32(W[o + 2, i]) * xi
                    a3 += _f32(W[o + 3, i]) * xi
                if has_s:
                    a0 *= s[o]
                    a1 *= s[o + 1]
                    a2 *= s[o + 2]
                    a3 *= s[o + 3]
                y[t, o] = a0
                y[t, o + 1] = a1
                y[t, o + 2] = a2
                y[t, o + 3] = a3
            o += 4
        else:
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for i in range(I):
                    acc += _f32(W[o, i]) * x[t, i]
                y[t, o] = acc * s[o] if has_s else acc
            o += 1


@_njit(fastmath=True, cache=True)
def _mv_serial(W, s, x, y):
    _mv_range(W, s, x, y, 0, W.shape[0])


@_njit(fastmath=True, cache=True, parallel=True)
def _mv_parallel(W, s, x, y, nchunk):
    O = W.shape[0]
    for c in _prange(nchunk):
        _mv_range(W, s, x, y, (c * O // nchunk) // 4 * 4, O if c == nchunk - 1 else ((c + 1) * O // nchunk) // 4 * 4)


@_njit(fastmath=True, cache=True)
def _dequant_rows(W, s, r0, r1, out):
    """out[:r1-r0] = float32(W[r0:r1]) * s (per-row scales, or none)."""
    for o in range(r0, r1):
        sc = s[o] if s.shape[0] > 0 else np.float32(1.0)
        for i in range(W.shape[1]):
            out[o - r0, i] = _f32(W[o, i]) * sc


def _nchunk() -> int:
    n = _get_num_threads()
    return 2 * n if n > 1 else 1


def _as_x2d(x):
    """(x as C-contiguous float32 (T, in), leading shape)."""
    if type(x) is np.ndarray and x.ndim == 2 and x.dtype == np.float32 and x.flags.c_contiguous:
        return x, x.shape[:1]
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1])), x.shape[:-1]


def _rows_matvec(Wk, s, x2):
    """x2 (T, I) @ (Wk * s).T -> (T, O) for a kernel array Wk (O, I)."""
    T, (O, I) = x2.shape[0], Wk.shape
    if Wk.dtype == np.float32 and (T > SMALL_T or not Wk.flags.c_contiguous):
        return x2 @ (Wk.T if s.shape[0] == 0 else (Wk * s[:, None]).T)
    if not Wk.flags.c_contiguous:
        Wk = np.ascontiguousarray(Wk)
    y = np.empty((T, O), np.float32)
    if T <= SMALL_T:
        if Wk.size >= PAR_MIN and _get_num_threads() > 1:
            _mv_parallel(Wk, s, x2, y, _nchunk())
        else:
            _mv_serial(Wk, s, x2, y)
        return y
    bs = max(16, _BLOCK_ELEMS // max(I, 1))
    buf = np.empty((min(bs, O), I), np.float32)
    for r0 in range(0, O, bs):
        r1 = min(O, r0 + bs)
        _dequant_rows(Wk, s, r0, r1, buf)
        y[:, r0:r1] = x2 @ buf[: r1 - r0].T
    return y


def linear(x: np.ndarray, W) -> np.ndarray:
    """x (..., in) @ W(out, in).T -> (..., out); W float32/float16 ndarray, Int8Weight or an FFN view."""
    x2, lead = _as_x2d(x)
    tw = type(W)
    if tw is Int8Weight:
        Wk, s = W.q, W.scale
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


# --- FFN over the neuron-bundled layout ---------------------------------------------------------
@_njit(fastmath=True, cache=True)
def _axpy4(kv, out, j0, h0, j1, h1, j2, h2, j3, h3):
    for d in range(kv.shape[2]):
        out[d] += (h0 * _f32(kv[j0, 1, d]) + h1 * _f32(kv[j1, 1, d])) + (h2 * _f32(kv[j2, 1, d]) + h3 * _f32(kv[j3, 1, d]))


@_njit(fastmath=True, cache=True)
def _ffn_range(kv, sc, x, idx, lo, hi, out, dense):
    """out += sum over j in idx[lo:hi] of relu(K[j] . x)^2 V[:, j]; returns the value columns read.
    Keys go four neurons at a time (x loads shared), value columns four at a time (one pass over out);
    neurons 4-8 ahead are prefetched. dense=True also reads value columns of zero activations."""
    D = kv.shape[2]
    nb = 2 * D * kv.itemsize
    has_s = sc.shape[0] > 0
    pj = np.empty(8, np.int64)
    ph = np.empty(8, np.float32)
    n = 0
    nval = 0
    p = lo
    while p < hi:
        for q in range(p + 4, min(p + 8, hi)):
            base = np.int64(idx[q]) * nb
            for l in range(0, nb, 64):
                _prefetch(kv, base + l)
        m = min(4, hi - p)
        j0 = np.int64(idx[p])
        j1 = np.int64(idx[p + 1]) if m > 1 else j0
        j2 = np.int64(idx[p + 2]) if m > 2 else j0
        j3 = np.int64(idx[p + 3]) if m > 3 else j0
        a0 = np.float32(0.0)
        a1 = np.float32(0.0)
        a2 = np.float32(0.0)
        a3 = np.float32(0.0)
        for d in range(D):
            xd = x[d]
            a0 += _f32(kv[j0, 0, d]) * xd
            a1 += _f32(kv[j1, 0, d]) * xd
            a2 += _f32(kv[j2, 0, d]) * xd
            a3 += _f32(kv[j3, 0, d]) * xd
        for q in range(m):
            j = j0 if q == 0 else (j1 if q == 1 else (j2 if q == 2 else j3))
            a = a0 if q == 0 else (a1 if q == 1 else (a2 if q == 2 else a3))
            if has_s:
                a *= sc[j, 0]
            if a > 0 or dense:
                h = a * a if a > 0 else np.float32(0.0)
                pj[n] = j
                ph[n] = h * sc[j, 1] if has_s else h
                n += 1
        while n >= 4:
            n -= 4
            _axpy4(kv, out, pj[n], ph[n], pj[n + 1], ph[n + 1], pj[n + 2], ph[n + 2], pj[n + 3], ph[n + 3])
            nval += 4
        p += m
    for q in range(n):
        j, h = pj[q], ph[q]
        for d in range(D):
            out[d] += h * _f32(kv[j, 1, d])
    return nval + n


@_njit(fastmath=True, cache=True)
def _ffn_serial(kv, sc, x, idx, out, dense):
    out[:] = 0.0
    return _ffn_range(kv, sc, x, idx, 0, idx.shape[0], out, dense)


@_njit(fastmath=True, cache=True, parallel=True)
def _ffn_parallel(kv, sc, x, idx, out, dense, nchunk):
    D, K = kv.shape[2], idx.shape[0]
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
    if idx.shape[0] * 2 * bundle.D >= 4 * PAR_MIN and _get_num_threads() > 1:
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
    flat_kv, flat_sc = bundle._kv.reshape(F * 2, D), bundle._sc.reshape(-1)
    for j0 in range(0, F, bs):
        j1 = min(F, j0 + bs)
        _dequant_rows(flat_kv, flat_sc, 2 * j0, 2 * j1, buf.reshape(-1, D))
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
    n = 0
    for r in range(idx.shape[0]):
        if y[r] >= thr:
            idx[n] = r
            n += 1
    return n


def predictor_select(qm) -> tuple:
    """(select, P, S, Z) for the threshold select of predictor qm: `select(P, S, Z, x, bits, thr, idx,
    nchunk) -> n` is an njit kernel (callable from other kernels) writing the sorted rows with score
    >= thr into idx. numba_simd.select_i8 (AVX2, activations rounded to int8 per group: score error
    <= numba_simd.error_bound, ~1% of max |score|) where the CPU has AVX2, the predictor is 2/4-bit
    with whole 4-byte chunks per group and RWKV_EDGE_SIMD is not "0"; else the float `_qselect`."""
    from . import numba_simd as ns
    if os.environ.get("RWKV_EDGE_SIMD", "1") != "0" and ns.available() and ns.supports(qm):
        return (ns.select_i8, *ns.simd_layout(qm))
    return (_qselect, *_predictor_layout(qm))


def _qm_parallel(qm) -> int:
    return _nchunk() if qm.shape[0] * qm.shape[1] >= 4 * PAR_MIN and _get_num_threads() > 1 else 1


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
