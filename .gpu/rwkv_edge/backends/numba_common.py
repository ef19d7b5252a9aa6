"""Shared pieces of the numba CPU kernels (numba_cpu.py is the backend module; see its docstring).

Constants, the bytes-read counter, LLVM helpers (fp16 widening, prefetch), the weight types
(`Int8Weight`, `Int8Cols`, `NeuronBundledFFN` and its key/value views) and the dense mat-vec
kernels they are read with.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import get_num_threads as _get_num_threads
from numba import njit as _njit
from numba import prange as _prange
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

PAR_MIN = 1 << 18          # weight elements per call from which kernels use all threads (read at call time)
SMALL_T = 8                # prefill with T <= SMALL_T uses the mat-vec kernels (each row read once)
_BLOCK_ELEMS = 1 << 18     # float32 elements per dequantized block in the BLAS prefill path (1 MiB)
_PF_BYTES = 4096           # mat-vec kernels prefetch this many bytes of rows ahead


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
    _out_axis, _layout = 0, "(out, in)"      # the axis of q that the scales run along

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if q.dtype != np.int8 or q.ndim != 2 or np.shape(scale) != (q.shape[self._out_axis],):
            raise ValueError(f"{type(self).__name__} needs q int8 {self._layout} and scale (out,), got {q.dtype} "
                             f"{q.shape} and {np.shape(scale)}")
        self.q, self.scale = q, np.asarray(scale, np.float32)

    @classmethod
    def from_float(cls, w: np.ndarray) -> "Int8Weight":
        from rwkv_edge.quant import quantize_int8_rows
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
    _out_axis, _layout = 1, "(in, out)"

    @classmethod
    def from_float(cls, m: np.ndarray) -> "Int8Cols":
        from rwkv_edge.quant import quantize_int8_rows
        q, s = quantize_int8_rows(np.asarray(m, np.float32).T)
        return cls(np.ascontiguousarray(q.T), s)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[None, :]

    def __getitem__(self, idx):
        return self.dequantize()[idx]


class Int4Weight(_ArrayLike):
    """int4 weights W (out, in) in the quant/q4.py layout: q uint8 (out, in/2) packed codes, scale
    float16 (out, in/32) per group of 32 inputs. W ~= scale_g * (code - 8)."""

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if (q.dtype != np.uint8 or q.ndim != 2 or np.shape(scale) != (q.shape[0], 2 * q.shape[1] // 32)
                or (2 * q.shape[1]) % 32 or np.asarray(scale).dtype != np.float16):
            raise ValueError(f"Int4Weight needs q uint8 (out, in/2) and scale float16 (out, in/32), got {q.dtype} "
                             f"{q.shape} and {np.asarray(scale).dtype} {np.shape(scale)}")
        self.q, self.scale = q, scale
        self._s = scale.view(np.uint16)

    @classmethod
    def from_float(cls, w: np.ndarray) -> "Int4Weight":
        from rwkv_edge.quant import quantize_q4
        return cls(*quantize_q4(w))

    shape = property(lambda self: (self.q.shape[0], 2 * self.q.shape[1]))
    nbytes = property(lambda self: self.q.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        from rwkv_edge.quant import dequantize_q4
        return dequantize_q4(self.q, self.scale)

    def __getitem__(self, idx):
        if isinstance(idx, tuple):
            return self.dequantize()[idx]
        from rwkv_edge.quant import dequantize_q4
        q, s = self.q[idx], self.scale[idx]
        return dequantize_q4(q.reshape(-1, q.shape[-1]), s.reshape(-1, s.shape[-1])).reshape(*q.shape[:-1], -1)


class NeuronBundledFFN:
    """One layer's FFN, neuron-major. kv (F, 2, D): kv[j, 0] = W_k[j, :], kv[j, 1] = W_v[:, j];
    float32, float16, or int8 with scale (F, 2) float32 = (key-row scale, value-column scale); or int4:
    kv uint8 (F, 2, D/2) packed as quant/q4.py with scale float16 (F, 2, D/32) per group of 32."""

    def __init__(self, kv: np.ndarray, scale: np.ndarray | None = None):
        if kv.ndim != 3 or kv.shape[1] != 2 or kv.dtype not in (np.float32, np.float16, np.int8, np.uint8):
            raise ValueError(f"kv must be (F, 2, D) float32/float16/int8 or (F, 2, D/2) uint8, got {kv.dtype} {kv.shape}")
        self.int4 = kv.dtype == np.uint8
        if self.int4:
            if (scale is None or np.asarray(scale).dtype != np.float16 or (2 * kv.shape[2]) % 32
                    or scale.shape != (kv.shape[0], 2, 2 * kv.shape[2] // 32)):
                raise ValueError("int4 bundles need scale float16 (F, 2, D/32)")
        elif (kv.dtype == np.int8) != (scale is not None) or (scale is not None and scale.shape != kv.shape[:2]):
            raise ValueError("int8 bundles need scale (F, 2); float bundles take none")
        if not kv.flags.c_contiguous:
            raise ValueError("kv must be C-contiguous (one contiguous read per neuron)")
        self.kv = kv
        if self.int4:
            self.scale = np.ascontiguousarray(scale)
            self._kv, self._sc = kv, self.scale.view(np.uint16)
        else:
            self.scale = None if scale is None else np.asarray(scale, np.float32)
            self._kv = _kernel_array(kv)
            self._sc = _NO_SCALE2 if scale is None else self.scale
        self.key, self.value = FFNKeyView(self), FFNValueView(self)

    @classmethod
    def from_dense(cls, w_key: np.ndarray, w_value: np.ndarray, dtype: str = "fp16") -> "NeuronBundledFFN":
        """Bundle W_k (F, D) and W_v (D, F); dtype "fp32", "fp16", "int8" (per-neuron scales) or "int4"."""
        return cls(*bundle_arrays(w_key, w_value, dtype))

    F = property(lambda self: self.kv.shape[0])
    D = property(lambda self: self.kv.shape[2] * (2 if self.int4 else 1))
    nbytes = property(lambda self: self.kv.nbytes + (0 if self.scale is None else self.scale.nbytes))

    @property
    def neuron_bytes(self) -> int:
        """Bytes read per active neuron (key row + value column + their scales)."""
        if self.int4:
            return 2 * self.kv.shape[2] + 2 * self.scale.shape[2] * 2
        return 2 * self.D * self.kv.itemsize + (8 if self.scale is not None else 0)

    def dequantize(self) -> tuple[np.ndarray, np.ndarray]:
        """(W_k (F, D), W_v (D, F)) as float32."""
        if self.int4:
            from rwkv_edge.quant import dequantize_q4
            F, D = self.F, self.D
            kv = dequantize_q4(self.kv.reshape(2 * F, D // 2), self.scale.reshape(2 * F, D // 32)).reshape(F, 2, D)
            return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1].T)
        kv = self.kv.astype(np.float32)
        if self.scale is not None:
            kv *= self.scale[:, :, None]
        return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1].T)


def bundle_arrays(w_key: np.ndarray, w_value: np.ndarray, dtype: str = "fp16", key_importance=None) -> tuple:
    """(kv (F, 2, D), scale (F, 2) or None) of NeuronBundledFFN.from_dense, without the object (whose
    views form a reference cycle: streaming writers would leave each chunk to the cyclic GC).
    int4: (kv (F, 2, D/2) uint8, scale (F, 2, D/32) float16), scales found by quant.q4's search, the key
    rows' weighted by key_importance (D,) when given."""
    if dtype == "int4":                                                         # quant/q4.py per row
        from rwkv_edge.quant import quantize_q4
        kq, ks = quantize_q4(w_key, search=True, importance=key_importance)
        vq, vs = quantize_q4(np.asarray(w_value, np.float32).T, search=True)
        return np.ascontiguousarray(np.stack([kq, vq], 1)), np.ascontiguousarray(np.stack([ks, vs], 1))
    kv = np.stack([np.asarray(w_key, np.float32), np.asarray(w_value, np.float32).T], axis=1)
    if dtype == "int8":
        scale = (np.abs(kv).max(axis=2) / 127.0).astype(np.float32)             # (F, 2)
        q = np.rint(kv / np.where(scale > 0, scale, 1.0)[:, :, None])
        return np.clip(q, -127, 127).astype(np.int8), scale
    if dtype in ("fp16", "fp32"):
        return np.ascontiguousarray(kv, np.float16 if dtype == "fp16" else np.float32), None
    raise ValueError(f"unknown bundle dtype {dtype!r} (fp32, fp16, int8, int4)")


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
    """y[:, r0:r1] = x @ (W[r0:r1] * s).T, two rows at a time (x loads shared), prefetching ahead.
    Two rows, not four: with weights coming from DRAM (a model larger than the caches) four
    interleaved rows ran at half the speed of two (measured on int8 rows of 512), at equal speed
    from cache."""
    I = W.shape[1]
    row_bytes = I * W.itemsize
    ahead = max(2, (_PF_BYTES // row_bytes) // 2 * 2)
    has_s = s.shape[0] > 0
    o = r0
    while o < r1:
        if o + 2 <= r1:
            if o + ahead + 2 <= W.shape[0]:
                base = np.int64(o + ahead) * row_bytes
                for l in range(0, 2 * row_bytes, 64):
                    _prefetch(W, base + l)
            for t in range(x.shape[0]):
                a0 = np.float32(0.0)
                a1 = np.float32(0.0)
                for i in range(I):
                    xi = x[t, i]
                    a0 += _f32(W[o, i]) * xi
                    a1 += _f32(W[o + 1, i]) * xi
                if has_s:
                    a0 *= s[o]
                    a1 *= s[o + 1]
                y[t, o] = a0
                y[t, o + 1] = a1
            o += 2
        else:
            for t in range(x.shape[0]):
                acc = np.float32(0.0)
                for i in range(I):
                    acc += _f32(W[o, i]) * x[t, i]
                y[t, o] = acc * s[o] if has_s else acc
            o += 1


@_njit(cache=True)
def _threshold_select(y, thr, idx):
    """The rows r < idx.shape[0] with y[r] >= thr, ascending, into idx; returns their count (the last
    step of both predictor select kernels)."""
    n = 0
    for r in range(idx.shape[0]):
        if y[r] >= thr:
            idx[n] = r
            n += 1
    return n


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
    if Wk.dtype == np.uint8:           # int4 (numba_i4dot): s holds the group scales' uint16 bits
        I = 2 * I
    if Wk.dtype == np.float32 and (T > SMALL_T or not Wk.flags.c_contiguous):
        return x2 @ (Wk.T if s.shape[0] == 0 else (Wk * s[:, None]).T)
    if not Wk.flags.c_contiguous:
        Wk = np.ascontiguousarray(Wk)
    y = np.empty((T, O), np.float32)
    if T <= SMALL_T:
        from .numba_i8dot import mv_parallel, mv_serial      # int8: integer dot products where the CPU has them
        if Wk.size >= PAR_MIN and _get_num_threads() > 1:
            mv_parallel(Wk, s, x2, y, _nchunk())
        else:
            mv_serial(Wk, s, x2, y)
        return y
    bs = max(16, _BLOCK_ELEMS // max(I, 1))
    buf = np.empty((min(bs, O), I), np.float32)
    for r0 in range(0, O, bs):
        r1 = min(O, r0 + bs)
        if Wk.dtype == np.uint8:
            from .numba_i4dot import dequant_rows4
            dequant_rows4(Wk, s, r0, r1, buf)
        else:
            _dequant_rows(Wk, s, r0, r1, buf)
        y[:, r0:r1] = x2 @ buf[: r1 - r0].T
    return y
