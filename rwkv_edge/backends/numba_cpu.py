"""Numba CPU backend: the reference function set with fast kernels, plus fp16/int8 weights and the
sparse FFN.

Weights accepted by `linear(x, W)` (W logically (out, in)): float32 or float16 ndarrays, `Int8Weight`
(int8 codes, one float32 scale per output row) and the two views of a `NeuronBundledFFN`
(`bundle.key` (F, D), `bundle.value` (D, F)). Decode (T == 1) runs numba mat-vec kernels that convert
each weight to float32 in registers and accumulate in float32; prefill (T > 1) dequantizes blocks of
rows and multiplies them with BLAS (small T uses the mat-vec kernel, which reads each row once).

`NeuronBundledFFN` stores one layer's FFN neuron-major: kv[j, 0] = W_k[j, :] (key row), kv[j, 1] =
W_v[:, j] (value column), so an active neuron costs one contiguous read. `sparse_ffn` computes
sum_{j in idx} relu(K[j] . x)^2 V[:, j] reading only those neurons.

`counter` counts the bytes of weights each kernel reads while `counter.enabled` is True.
float16 is not a numba type: fp16 arrays are passed as uint16 views and widened with an LLVM
`fpext half` (vcvtph2ps on x86 with F16C), so rounding is exactly numpy's float16 -> float32.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, prange, types
from numba.extending import intrinsic, overload

from . import reference as _ref

name = "numba"

PAR_MIN = 1 << 18          # weight elements per call above which kernels run on all threads
SMALL_T = 8                # prefill with T <= SMALL_T uses the mat-vec kernel (reads each row once)
_BLOCK_ELEMS = 1 << 18     # fp32 elements per dequantized block in the BLAS prefill path (1 MiB)


class ByteCounter:
    """Bytes of weights read by the kernels, total and per op, while `enabled`."""

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


# --- element conversion -------------------------------------------------------------------
@intrinsic
def _h2f(typingctx, h):
    """uint16 bits of an IEEE half -> float32 (exact)."""
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


def _f32(v):  # pragma: no cover - replaced by the overload inside numba
    return np.float32(v)


@overload(_f32, inline="always")
def _f32_ov(v):
    if v == types.uint16:
        return lambda v: _h2f(v)
    return lambda v: np.float32(v)


def _kernel_array(a: np.ndarray) -> np.ndarray:
    """The array a kernel reads: float16 as its uint16 bits, others unchanged."""
    return a.view(np.uint16) if a.dtype == np.float16 else a


_NO_SCALE = np.zeros(0, np.float32)
_NO_SCALE2 = np.zeros((0, 2), np.float32)   # "no scales" for (F, 2) bundle scales


# --- weight types -------------------------------------------------------------------------
class Int8Weight:
    """int8 codes q (out, in) with a float32 scale per output row: W ~= q * scale[:, None]."""

    def __init__(self, q: np.ndarray, scale: np.ndarray):
        if q.dtype != np.int8 or q.ndim != 2 or scale.shape != (q.shape[0],):
            raise ValueError(f"Int8Weight needs q int8 (out, in) and scale (out,), got {q.dtype} {q.shape}, "
                             f"{scale.shape}")
        self.q, self.scale = q, np.asarray(scale, np.float32)

    @classmethod
    def from_float(cls, w: np.ndarray) -> "Int8Weight":
        from quant import quantize_int8_rows
        return cls(*quantize_int8_rows(w))

    shape = property(lambda self: self.q.shape)
    ndim = 2
    nbytes = property(lambda self: self.q.nbytes + self.scale.nbytes)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale[:, None]

    def __array__(self, dtype=None, copy=None):
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype)

    def __getitem__(self, rows):
        """Dequantized rows (e.g. an embedding lookup)."""
        return self.q[rows].astype(np.float32) * self.scale[rows][..., None]


class NeuronBundledFFN:
    """One layer's FFN, neuron-major. kv (F, 2, D): kv[j, 0] = W_k[j, :], kv[j, 1] = W_v[:, j];
    float32, float16 or int8 with scale (F, 2) float32 = (key-row scale, value-column scale)."""

    def __init__(self, kv: np.ndarray, scale: np.ndarray | None = None):
        if kv.ndim != 3 or kv.shape[1] != 2 or kv.dtype not in (np.float32, np.float16, np.int8):
            raise ValueError(f"kv must be (F, 2, D) float32/float16/int8, got {kv.dtype} {kv.shape}")
        if (kv.dtype == np.int8) != (scale is not None) or (scale is not None and scale.shape != kv.shape[:2]):
            raise ValueError("int8 bundles need scale (F, 2); float bundles take none")
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
            amax = np.abs(kv).max(axis=2)                                      # (F, 2)
            scale = (amax / 127.0).astype(np.float32)
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
        """Bytes read per active neuron (key row + value column + scales)."""
        return 2 * self.D * self.kv.itemsize + (8 if self.scale is not None else 0)

    def dequantize(self) -> tuple[np.ndarray, np.ndarray]:
        """(W_k (F, D), W_v (D, F)) as float32."""
        kv = self.kv.astype(np.float32)
        if self.scale is not None:
            kv *= self.scale[:, :, None]
        return np.ascontiguousarray(kv[:, 0]), np.ascontiguousarray(kv[:, 1].T)


class FFNKeyView:
    """W_k (F, D) of a bundle, for `linear(xk, view)`; np.asarray gives it dequantized."""

    def __init__(self, bundle):
        self.bundle = bundle

    shape = property(lambda self: (self.bundle.F, self.bundle.D))
    ndim = 2

    def __array__(self, dtype=None, copy=None):
        w = self.bundle.dequantize()[0]
        return w if dtype is None else w.astype(dtype)


class FFNValueView(FFNKeyView):
    """W_v (D, F) of a bundle."""

    shape = property(lambda self: (self.bundle.D, self.bundle.F))

    def __array__(self, dtype=None, copy=None):
        w = self.bundle.dequantize()[1]
        return w if dtype is None else w.astype(dtype)


# --- dense mat-vec kernels (W (O, I) float32 / uint16-as-fp16 / int8; x (T, I); y (T, O)) ---------
@njit(fastmath=True, cache=True)
def _mv_rows(W, scale, x, y, o):
    I = W.shape[1]
    s = scale[o] if scale.shape[0] > 0 else np.float32(1.0)
    for t in range(x.shape[0]):
        acc = np.float32(0.0)
        for i in range(I):
            acc += _f32(W[o, i]) * x[t, i]
        y[t, o] = acc * s


@njit(fastmath=True, cache=True)
def _mv_serial(W, scale, x, y):
    for o in range(W.shape[0]):
        _mv_rows(W, scale, x, y, o)


@njit(fastmath=True, cache=True, parallel=True)
def _mv_parallel(W, scale, x, y):
    for o in prange(W.shape[0]):
        _mv_rows(W, scale, x, y, o)


@njit(fastmath=True, cache=True, parallel=True)
def _dequant_rows(W, scale, r0, r1, out):
    """out[:r1-r0] = float32(W[r0:r1]) * scale (W 2-D, or 3-D bundle rows flattened by the caller)."""
    I = W.shape[1]
    for o in prange(r0, r1):
        s = scale[o] if scale.shape[0] > 0 else np.float32(1.0)
        for i in range(I):
            out[o - r0, i] = _f32(W[o, i]) * s


def _as_x2d(x):
    x = np.asarray(x, np.float32)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.flags.c_contiguous:
        x2 = np.ascontiguousarray(x2)
    return x2, lead


def _matvec_rows(W, scale, x2):
    """y (T, O) = x2 (T, I) @ (W * scale).T with W already a kernel array."""
    T = x2.shape[0]
    y = np.empty((T, W.shape[0]), np.float32)
    if T <= SMALL_T or W.dtype == np.float32:
        if W.dtype == np.float32 and T > SMALL_T:
            return x2 @ (W.T if scale.shape[0] == 0 else (W * scale[:, None]).T)
        (_mv_parallel if W.size >= PAR_MIN else _mv_serial)(W, scale, x2, y)
        return y
    # prefill: dequantize blocks of rows to float32 and let BLAS multiply
    O, I = W.shape
    bs = max(16, _BLOCK_ELEMS // max(I, 1))
    buf = np.empty((min(bs, O), I), np.float32)
    for r0 in range(0, O, bs):
        r1 = min(O, r0 + bs)
        _dequant_rows(W, scale, r0, r1, buf)
        y[:, r0:r1] = x2 @ buf[: r1 - r0].T
    return y


def linear(x: np.ndarray, W) -> np.ndarray:
    """x (..., in) @ W(out, in).T -> (..., out); W float32/float16 ndarray, Int8Weight or an FFN view."""
    x2, lead = _as_x2d(x)
    if isinstance(W, np.ndarray):
        Wk, sc, nb, op = _kernel_array(W), _NO_SCALE, W.nbytes, "linear"
        if W.dtype not in (np.float32, np.float16):
            Wk = W.astype(np.float32)
    elif isinstance(W, Int8Weight):
        Wk, sc, nb, op = W.q, W.scale, W.nbytes, "linear"
    elif isinstance(W, FFNValueView):
        y, nb = _bundle_value(W.bundle, x2)
        if counter.enabled:
            counter.add("ffn", nb)
        return y.reshape(*lead, -1)
    elif isinstance(W, FFNKeyView):
        y, nb = _bundle_key(W.bundle, x2)
        if counter.enabled:
            counter.add("ffn", nb)
        return y.reshape(*lead, -1)
    else:
        W = np.asarray(W, np.float32)
        Wk, sc, nb, op = W, _NO_SCALE, W.nbytes, "linear"
    if counter.enabled:
        counter.add(op, nb)
    return _matvec_rows(Wk, sc, x2).reshape(*lead, -1)


# --- FFN over the bundled layout ----------------------------------------------------------------
@njit(fastmath=True, cache=True)
def _key_dot(kv, sc, j, x):
    acc = np.float32(0.0)
    for d in range(kv.shape[2]):
        acc += _f32(kv[j, 0, d]) * x[d]
    if sc.shape[0] > 0:
        acc *= sc[j, 0]
    return acc


@njit(fastmath=True, cache=True)
def _ffn_range(kv, sc, x, idx, lo, hi, out, dense):
    """out += sum over idx[lo:hi] of relu(K[j] . x)^2 V[:, j]; returns value columns read.
    dense=True reads every value column (a true dense FFN), else zero activations are skipped."""
    D = kv.shape[2]
    n = 0
    for p in range(lo, hi):
        j = idx[p]
        h = _key_dot(kv, sc, j, x)
        h = h * h if h > 0 else np.float32(0.0)
        if h != 0 or dense:
            if sc.shape[0] > 0:
                h *= sc[j, 1]
            for d in range(D):
                out[d] += h * _f32(kv[j, 1, d])
            n += 1
    return n


@njit(fastmath=True, cache=True)
def _ffn_serial(kv, sc, x, idx, out, dense):
    out[:] = 0.0
    return _ffn_range(kv, sc, x, idx, 0, idx.shape[0], out, dense)


@njit(fastmath=True, cache=True, parallel=True)
def _ffn_parallel(kv, sc, x, idx, out, dense, nchunk):
    D = kv.shape[2]
    K = idx.shape[0]
    part = np.zeros((nchunk, D), np.float32)
    cnt = np.zeros(nchunk, np.int64)
    for c in prange(nchunk):
        cnt[c] = _ffn_range(kv, sc, x, idx, c * K // nchunk, (c + 1) * K // nchunk, part[c], dense)
    for d in range(D):
        acc = np.float32(0.0)
        for c in range(nchunk):
            acc += part[c, d]
        out[d] = acc
    return cnt.sum()


@njit(fastmath=True, cache=True, parallel=True)
def _ffn_tokens(kv, sc, X, idx, offs, out):
    """Per-token sparse FFN for T tokens: token t uses idx[offs[t]:offs[t+1]]."""
    n = np.zeros(X.shape[0], np.int64)
    for t in prange(X.shape[0]):
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
    work = idx.shape[0] * 2 * bundle.D
    if work >= PAR_MIN:
        nth = get_num_threads()
        return _ffn_parallel(bundle._kv, bundle._sc, x, idx, out, dense, nth * 2 if nth > 1 else 1)
    return _ffn_serial(bundle._kv, bundle._sc, x, idx, out, dense)


def sparse_ffn(x: np.ndarray, idx: np.ndarray, bundle: NeuronBundledFFN, out: np.ndarray | None = None) -> np.ndarray:
    """sum_{j in idx} relu(W_k[j] . x)^2 W_v[:, j] for one token x (D,), reading only neurons idx
    (int32); a neuron whose activation is zero costs only its key row. Returns out (D,)."""
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    idx = np.ascontiguousarray(idx, np.int32)
    if out is None:
        out = np.empty(bundle.D, np.float32)
    n_val = _run_ffn(bundle, x, idx, out, False)
    if counter.enabled:
        half = bundle.neuron_bytes // 2
        counter.add("ffn", idx.shape[0] * half + int(n_val) * half)
    return out


def sparse_ffn_tokens(X: np.ndarray, idx: np.ndarray, offsets: np.ndarray, bundle: NeuronBundledFFN) -> np.ndarray:
    """Sparse FFN for T tokens X (T, D); token t's active set is idx[offsets[t]:offsets[t+1]]."""
    X = np.ascontiguousarray(X, np.float32)
    out = np.empty_like(X)
    n_val = _ffn_tokens(bundle._kv, bundle._sc, X, np.ascontiguousarray(idx, np.int32),
                        np.ascontiguousarray(offsets, np.int64), out)
    if counter.enabled:
        half = bundle.neuron_bytes // 2
        counter.add("ffn", len(idx) * half + int(n_val) * half)
    return out


def _bundle_blocks(bundle):
    """Yield (j0, j1, K_blk (n, D), V_blk (n, D)) float32 blocks of the bundle for prefill."""
    F, D = bundle.F, bundle.D
    if bundle.kv.dtype == np.float32:
        yield 0, F, bundle.kv[:, 0], bundle.kv[:, 1]
        return
    bs = max(16, _BLOCK_ELEMS // (2 * D))
    buf = np.empty((min(bs, F), 2, D), np.float32)
    flat_kv = bundle._kv.reshape(F * 2, D)
    flat_sc = bundle._sc.reshape(-1)
    for j0 in range(0, F, bs):
        j1 = min(F, j0 + bs)
        _dequant_rows(flat_kv, flat_sc, 2 * j0, 2 * j1, buf.reshape(-1, D))
        yield j0, j1, buf[: j1 - j0, 0], buf[: j1 - j0, 1]


@njit(fastmath=True, cache=True, parallel=True)
def _bundle_key_mv(kv, sc, X, y):
    for j in prange(kv.shape[0]):
        for t in range(X.shape[0]):
            y[t, j] = _key_dot(kv, sc, j, X[t])


@njit(fastmath=True, cache=True)
def _bundle_value_mv(kv, sc, H, out):
    """out (T, D) = sum_j H[t, j] * V[:, j] (all value columns are read)."""
    D = kv.shape[2]
    out[:] = 0.0
    for j in range(kv.shape[0]):
        s = sc[j, 1] if sc.shape[0] > 0 else np.float32(1.0)
        for t in range(H.shape[0]):
            h = H[t, j] * s
            for d in range(D):
                out[t, d] += h * _f32(kv[j, 1, d])


def _bundle_key(bundle, x2):
    """x2 (T, D) @ W_k.T -> (T, F); bytes read."""
    T = x2.shape[0]
    half = bundle.neuron_bytes // 2 * bundle.F
    if T <= SMALL_T:
        y = np.empty((T, bundle.F), np.float32)
        _bundle_key_mv(bundle._kv, bundle._sc, x2, y)
        return y, half
    y = np.empty((T, bundle.F), np.float32)
    for j0, j1, Kb, _ in _bundle_blocks(bundle):
        y[:, j0:j1] = x2 @ Kb.T
    return y, half


def _bundle_value(bundle, h2):
    """h2 (T, F) @ W_v.T -> (T, D); bytes read."""
    T = h2.shape[0]
    half = bundle.neuron_bytes // 2 * bundle.F
    if T == 1:
        out = np.empty((1, bundle.D), np.float32)
        _run_ffn_value(bundle, h2, out)
        return out, half
    if T <= SMALL_T:
        out = np.empty((T, bundle.D), np.float32)
        _bundle_value_mv(bundle._kv, bundle._sc, h2, out)
        return out, half
    out = np.zeros((T, bundle.D), np.float32)
    for j0, j1, _, Vb in _bundle_blocks(bundle):
        out += h2[:, j0:j1] @ Vb
    return out, half


@njit(fastmath=True, cache=True, parallel=True)
def _value_parallel(kv, sc, h, out, nchunk):
    D, F = kv.shape[2], kv.shape[0]
    part = np.zeros((nchunk, D), np.float32)
    for c in prange(nchunk):
        for j in range(c * F // nchunk, (c + 1) * F // nchunk):
            s = h[j] * (sc[j, 1] if sc.shape[0] > 0 else np.float32(1.0))
            for d in range(D):
                part[c, d] += s * _f32(kv[j, 1, d])
    for d in range(D):
        acc = np.float32(0.0)
        for c in range(nchunk):
            acc += part[c, d]
        out[d] = acc


def _run_ffn_value(bundle, h2, out):
    nth = get_num_threads()
    _value_parallel(bundle._kv, bundle._sc, h2[0], out[0], nth * 2 if nth > 1 else 1)


def ffn_dense(xk: np.ndarray, w_key, w_value) -> np.ndarray:
    """relu(xk @ W_k.T)^2 @ W_v.T for xk (T, D); with the two views of one NeuronBundledFFN the
    decode step is a single pass over the bundle (every key row and value column is read)."""
    if isinstance(w_key, FFNKeyView) and isinstance(w_value, FFNValueView) and w_key.bundle is w_value.bundle:
        b = w_key.bundle
        x2, lead = _as_x2d(xk)
        if x2.shape[0] == 1:
            out = np.empty((1, b.D), np.float32)
            _run_ffn(b, x2[0], _all_neurons(b.F), out[0], True)
            if counter.enabled:
                counter.add("ffn", b.neuron_bytes * b.F)
            return out.reshape(*lead, -1)
        if x2.shape[0] > SMALL_T:
            out = np.zeros((x2.shape[0], b.D), np.float32)
            for _, _, Kb, Vb in _bundle_blocks(b):
                h = np.maximum(x2 @ Kb.T, 0.0)
                out += (h * h) @ Vb
            if counter.enabled:
                counter.add("ffn", b.neuron_bytes * b.F)
            return out.reshape(*lead, -1)
    k = np.maximum(linear(xk, w_key), 0.0)
    return linear(k * k, w_value)


# --- small matrices, norms ----------------------------------------------------------------------
@njit(fastmath=True, cache=True)
def _xm_vec(x, M, y):
    """y (O,) = x (I,) @ M (I, O)."""
    y[:] = 0.0
    for i in range(M.shape[0]):
        xi = x[i]
        for o in range(M.shape[1]):
            y[o] += xi * _f32(M[i, o])


def matmul(x: np.ndarray, M: np.ndarray) -> np.ndarray:
    """x (..., in) @ M (in, out) -> (..., out); M float32 or float16 (LoRA-style matrices)."""
    if counter.enabled:
        counter.add("matmul", M.nbytes)
    x2, lead = _as_x2d(x)
    if x2.shape[0] == 1 and M.ndim == 2 and M.flags.c_contiguous:
        y = np.empty((1, M.shape[1]), np.float32)
        _xm_vec(x2[0], _kernel_array(M), y[0])
        return y.reshape(*lead, -1)
    return (x2 @ (M if M.dtype == np.float32 else M.astype(np.float32))).reshape(*lead, -1)


@njit(fastmath=True, cache=True)
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


@njit(fastmath=True, cache=True)
def _group_norm(x, G, w, b, eps, out):
    T, D = x.shape
    n = D // G
    for t in range(T):
        for g in range(G):
            o = g * n
            mu = np.float32(0.0)
            for d in range(o, o + n):
                mu += x[t, d]
            mu /= n
            var = np.float32(0.0)
            for d in range(o, o + n):
                c = x[t, d] - mu
                var += c * c
            inv = np.float32(1.0) / np.sqrt(var / n + eps)
            for d in range(o, o + n):
                out[t, d] = (x[t, d] - mu) * inv * w[d] + b[d]


def group_norm(x: np.ndarray, n_groups: int, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Group norm over the last dim split into n_groups equal groups (x: (T, D))."""
    x2, _ = _as_x2d(x)
    out = np.empty_like(x2)
    _group_norm(x2, n_groups, w, b, np.float32(eps), out)
    return out


# --- recurrences ----------------------------------------------------------------------------------
@njit(fastmath=True, cache=True, parallel=True)
def _wkv7(s_in, s, r, w, k, v, a, b, y):
    """s_in, s: (H, N, N) [head, value i, key j]; r..b: (T, H*N); writes s (new state) and y."""
    H, N = s.shape[0], s.shape[1]
    for h in prange(H):
        o = h * N
        for t in range(r.shape[0]):
            src = s_in if t == 0 else s
            for i in range(N):
                sa = np.float32(0.0)
                for j in range(N):
                    sa += src[h, i, j] * a[t, o + j]
                vi = v[t, o + i]
                acc = np.float32(0.0)
                for j in range(N):
                    x = src[h, i, j] * w[t, o + j] + sa * b[t, o + j] + vi * k[t, o + j]
                    s[h, i, j] = x
                    acc += x * r[t, o + j]
                y[t, o + i] = acc


@njit(fastmath=True, cache=True)
def _wkv7_one(s_in, s, r, w, k, v, a, b, y):
    """T == 1 serial twin of _wkv7 (a parallel launch costs more than the work)."""
    H, N = s.shape[0], s.shape[1]
    for h in range(H):
        o = h * N
        for i in range(N):
            sa = np.float32(0.0)
            for j in range(N):
                sa += s_in[h, i, j] * a[0, o + j]
            vi = v[0, o + i]
            acc = np.float32(0.0)
            for j in range(N):
                x = s_in[h, i, j] * w[0, o + j] + sa * b[0, o + j] + vi * k[0, o + j]
                s[h, i, j] = x
                acc += x * r[0, o + j]
            y[0, o + i] = acc


def wkv7(state, r, w, k, v, a, b):
    """RWKV-7 state update (see reference.wkv7). Returns (y (T, H*N), new state (H, N, N))."""
    s_in = np.ascontiguousarray(state, np.float32)
    args = [_as_x2d(t)[0] for t in (r, w, k, v, a, b)]
    s = np.empty_like(s_in)
    y = np.empty((args[0].shape[0], s_in.shape[0] * s_in.shape[1]), np.float32)
    (_wkv7_one if y.shape[0] == 1 else _wkv7)(s_in, s, *args, y)
    return y, s


@njit(fastmath=True, cache=True, parallel=True)
def _wkv_decay(s_in, s, r, k, v, w, u, y):
    """RWKV-5/6: y_t = (S + u * v k^T) @ r ; S = S * w_t[j] + v k^T. w: (T, H*N), u: (H, N)."""
    H, N = s.shape[0], s.shape[1]
    for h in prange(H):
        o = h * N
        for t in range(r.shape[0]):
            src = s_in if t == 0 else s
            for i in range(N):
                vi = v[t, o + i]
                acc = np.float32(0.0)
                for j in range(N):
                    kv = vi * k[t, o + j]
                    acc += (src[h, i, j] + u[h, j] * kv) * r[t, o + j]
                    s[h, i, j] = src[h, i, j] * w[t, o + j] + kv
                y[t, o + i] = acc


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
@njit(fastmath=True, cache=True)
def _qmv_row(P, scale, zero, xp, xsum, bits, r):
    per = 8 // bits
    mask = (1 << bits) - 1
    G = scale.shape[1]
    nb = P.shape[1] // G                           # bytes per group
    tot = np.float32(0.0)
    for g in range(G):
        acc = np.float32(0.0)
        for j in range(per):
            sh = j * bits
            for i in range(g * nb, (g + 1) * nb):
                acc += np.float32((P[r, i] >> sh) & mask) * xp[j, i]
        tot += _h2f(scale[r, g]) * acc + _h2f(zero[r, g]) * xsum[g]
    return tot


@njit(fastmath=True, cache=True, parallel=True)
def _qmv(P, scale, zero, xp, xsum, bits, y):
    for r in prange(P.shape[0]):
        y[r] = _qmv_row(P, scale, zero, xp, xsum, bits, r)


def quant_matvec(qm, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """W_hat @ x for a `quant.QuantizedMatrix` (1/2/4/8-bit codes packed little-endian in each byte,
    float16 scale/zero per row or group) and x (C,) -> (R,) float32, without unpacking to memory."""
    R, C = qm.shape
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    per = 8 // qm.bits
    # xp[j, i] = x[i * per + j]: the weight of code j of byte i, so the inner loop runs over bytes
    xp = np.ascontiguousarray(x.reshape(C // per, per).T)
    xsum = x.reshape(qm.n_groups, -1).sum(axis=1, dtype=np.float32)
    y = np.empty(R, np.float32) if out is None else out
    _qmv(qm.packed, qm.scale.view(np.uint16), qm.zero.view(np.uint16), xp, xsum, qm.bits, y)
    if counter.enabled:
        counter.add("predictor", qm.nbytes)
    return y
