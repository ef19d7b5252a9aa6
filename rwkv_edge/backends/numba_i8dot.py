"""Integer dot products for the int8 mat-vecs of decode: rows of int8 weights . int8 activations.

Math. A weight row w (I,) int8 with a float scale s (per row, applied by the caller); x (I,) float32
is quantized once per mat-vec in groups of GS = 32 (as llama.cpp's Q8_0 activations):
xs_g = max|x_g| / 127, xq = rint(x / xs_g) in [-127, 127]. Then

    w . x ~= sum_g xs_g * (w_g . xq_g)          (the w_g . xq_g exact in int32)

and the only error is the activation rounding: |w . x - that| <= sum_g xs_g / 2 * sum |w_g| (`error_bound`).

Instructions (x86-64, LLVM intrinsics; the callers compile them only where `level()` says so):
- VNNI (AVX512-VNNI + VL, 256-bit vpdpbusd: u8 x s8, four products summed into each i32 lane). The
  weight bytes are made unsigned by flipping their sign bit (w + 128, one vpxor), so
  sum (w + 128) xq = w . xq + 128 sum(xq): the second term is per group and per call, not per row;
  each lane's accumulator starts at -128 (sum of its four xq), computed once per group for all rows
  (one more vpdpbusd), so the i32 lanes are exactly those of AVX2 and the results bit-identical.
  (Taking a float correction off after the sum cancels catastrophically: the offset products are
  ~1e6 per group against results of ~1e3.) One load, one xor, one vpdpbusd per 32 weights.
- AVX2: |xq| (u8, once per chunk, shared by the rows) times sign(w, xq) (vpsignb) with vpmaddubsw
  (pairs <= 2 * 127 * 127 < 32767: never saturates), widened by vpmaddwd with ones.
Each group's i32 lanes are converted and FMA'd with xs_g into a float vector per row; one horizontal
sum per row at the end. Rows go four at a time so the activation loads are shared.
Elsewhere (aarch64, no AVX2) the callers use the float kernels (numba_common._mv_range).

    dot4(A, r0, r1, r2, r3, X, xs, corr, out)     out[k] = sum_g xs_g (A[r_k] . xq)_g - corr  (rows of A)
    quantize_x(x, X, xs) -> corr                 the activation; corr is 0.0 (kept in the signatures)
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import njit as _njit
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba import prange as _prange
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

from . import numba_simd as _ns
from .numba_common import _PF_BYTES, _f32, _mv_range, _prefetch

GS = 32             # activation group: one float scale per 32 int8 values (one 32-byte vector)
_LEVEL: list = []


def level() -> str:
    """"vnni", "avx2" or "" (no integer kernels here): the host CPU's best, cached."""
    if not _LEVEL:
        lv = ""
        if _ns.available():
            lv = "avx2"
            try:
                from llvmlite import binding as llb
                from numba.core import config
                f = llb.get_host_cpu_features()
                if f.get("avx512vnni") and f.get("avx512vl") and config.CPU_NAME in (None, "host"):
                    lv = "vnni"
            except Exception:
                pass
        _LEVEL.append(lv)
    return _LEVEL[0]


def _dot_codegen(vnni, nrow, context, builder, Aa, Xa, xsa, rows, corr):
    """LLVM of sum_g xs_g (A[r] . xq)_g - corr for the nrow rows `rows`: a list of float32 values."""
    i8, i16, i32, i64 = _ir.IntType(8), _ir.IntType(16), _ir.IntType(32), _ir.IntType(64)
    f32 = _ir.FloatType()
    v32i8, v16i16, v8i32, v8f = _ir.VectorType(i8, 32), _ir.VectorType(i16, 16), _ir.VectorType(i32, 8), _ir.VectorType(f32, 8)
    I = _cgutils.unpack_tuple(builder, Aa.shape, 2)[1]
    G = builder.sdiv(I, i64(32))
    abase = builder.bitcast(Aa.data, i8.as_pointer())
    ptrs = [builder.gep(abase, [builder.mul(r, I)]) for r in rows]
    xbase = builder.bitcast(Xa.data, i8.as_pointer())
    fn = lambda name, ret, *a: _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(ret, a), name)
    fma = fn("llvm.fma.v8f32", v8f, v8f, v8f, v8f)
    if vnni:
        dp = fn("llvm.x86.avx512.vpdpbusd.256", v8i32, v8i32, v8i32, v8i32)
    else:
        sgn = fn("llvm.x86.avx2.psign.b", v32i8, v32i8, v32i8)
        ubsw = fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, v32i8, v32i8)
        wd = fn("llvm.x86.avx2.pmadd.wd", v8i32, v16i16, v16i16)
    facc = [_cgutils.alloca_once_value(builder, _ir.Constant(v8f, None)) for _ in range(nrow)]
    zero8 = _ir.Constant(v8i32, [0] * 8)
    with _cgutils.for_range(builder, G) as lg:
        off = builder.mul(lg.index, i64(32))
        xv = builder.load(builder.bitcast(builder.gep(xbase, [off]), v32i8.as_pointer()), align=1)
        xsg = builder.load(builder.gep(xsa.data, [lg.index]))
        xsv = builder.shuffle_vector(builder.insert_element(_ir.Constant(v8f, _ir.Undefined), xsg, i32(0)),
                                     _ir.Constant(v8f, _ir.Undefined), zero8)
        if vnni:                                                # -128 * (sum of each lane's 4 xq)
            nc = builder.sub(zero8, builder.call(dp, [zero8, _ir.Constant(v8i32, [-2139062144] * 8),
                                                      builder.bitcast(xv, v8i32)]))
        else:
            ax = builder.call(sgn, [xv, xv])                    # |xq| as u8, shared by the rows
        for k in range(nrow):
            w = builder.load(builder.bitcast(builder.gep(ptrs[k], [off]), v32i8.as_pointer()), align=1)
            if vnni:                                            # (w + 128) as u8 . xq as s8
                wu = builder.xor(w, _ir.Constant(v32i8, [-128] * 32))
                acc = builder.call(dp, [nc, builder.bitcast(wu, v8i32), builder.bitcast(xv, v8i32)])
            else:
                h = builder.call(ubsw, [ax, builder.call(sgn, [w, xv])])
                acc = builder.call(wd, [h, _ir.Constant(v16i16, [1] * 16)])
            builder.store(builder.call(fma, [builder.sitofp(acc, v8f), xsv, builder.load(facc[k])]), facc[k])
    res = []
    for k in range(nrow):
        v = builder.load(facc[k])
        t = builder.extract_element(v, i32(0))
        for e in range(1, 8):
            t = builder.fadd(t, builder.extract_element(v, i32(e)))
        res.append(builder.fsub(t, corr))
    return res


def _arrays_ok(*pairs):
    return all(isinstance(a, _types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C" for a, dt, nd in pairs)


def _make_dot(vnni: bool):
    @_intrinsic
    def dot4(typingctx, A, r0, r1, r2, r3, X, xs, corr, out):
        """out[k] = row r_k's dot (four rows, activation loads shared)."""
        if not _arrays_ok((A, _types.int8, 2), (X, _types.int8, 1), (xs, _types.float32, 1), (out, _types.float32, 1)):
            return None
        sig = _types.void(A, _types.int64, _types.int64, _types.int64, _types.int64, X, xs, _types.float32, out)

        def codegen(context, builder, sig, args):
            Aa, Xa, xsa, oa = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 5, 6, 8)]
            vals = _dot_codegen(vnni, 4, context, builder, Aa, Xa, xsa, args[1:5], args[7])
            for k, v in enumerate(vals):
                builder.store(v, builder.gep(oa.data, [_ir.IntType(64)(k)]))
            return context.get_dummy_value()
        return sig, codegen

    @_intrinsic
    def dot1(typingctx, A, r, X, xs, corr):
        """row r's dot."""
        if not _arrays_ok((A, _types.int8, 2), (X, _types.int8, 1), (xs, _types.float32, 1)):
            return None
        sig = _types.float32(A, _types.int64, X, xs, _types.float32)

        def codegen(context, builder, sig, args):
            Aa, Xa, xsa = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 2, 3)]
            return _dot_codegen(vnni, 1, context, builder, Aa, Xa, xsa, [args[1]], args[4])[0]
        return sig, codegen

    return dot4, dot1


dot4_vnni, dot1_vnni = _make_dot(True)
dot4_avx2, dot1_avx2 = _make_dot(False)


@_njit(cache=True)      # no fastmath: rounding as in the numpy reference
def quantize_x(x, X, xs, vnni):
    """X (I,) int8 and xs (I/GS,) float32 from x (I,) float32, I % GS == 0; returns corr = 0.0 (the
    VNNI kernel takes its u8 offset off in integers; `vnni` is kept for the callers' signature)."""
    for g in range(x.shape[0] // GS):
        mx = np.float32(0.0)
        for i in range(g * GS, (g + 1) * GS):
            mx = max(mx, abs(x[i]))
        inv = np.float32(127.0) / mx if mx > 0 else np.float32(0.0)
        xs[g] = mx / np.float32(127.0)
        for i in range(g * GS, (g + 1) * GS):
            X[i] = np.int32(np.rint(x[i] * inv))
    return np.float32(0.0)


# --- numpy reference ----------------------------------------------------------------------------
def reference_quantize(x: np.ndarray):
    """(xq (G, GS) int64, xs (G,) float32) as quantize_x computes them."""
    xg = np.asarray(x, np.float32).reshape(-1, GS)
    mx = np.abs(xg).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127.0) / mx, np.float32(0.0)).astype(np.float32)
    return np.rint(xg * inv[:, None]).astype(np.int64), (mx / np.float32(127.0)).astype(np.float32)


def reference_matvec(q: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(q * scale[:, None]) @ x with x quantized as the kernels do; exact integer dots, float64 sums."""
    xq, xs = reference_quantize(x)
    O, I = q.shape
    dot = np.einsum("rgs,gs->rg", q.astype(np.int64).reshape(O, I // GS, GS), xq)
    return ((dot * xs.astype(np.float64)).sum(1) * scale).astype(np.float32)


def error_bound(q: np.ndarray, scale: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|reference_matvec - float matvec| <= this, per row (activation rounding only)."""
    xs = reference_quantize(x)[1].astype(np.float64)
    O, I = q.shape
    return (np.abs(q.astype(np.float64)).reshape(O, I // GS, GS).sum(2) * xs / 2).sum(1) * np.abs(scale)


# --- njit-callable generic entry points (resolved at compile time by the weight dtype and the CPU) ---
def dot4(A, r0, r1, r2, r3, X, xs, corr, out):  # pragma: no cover - njit only (overload below)
    raise NotImplementedError("numba_i8dot.dot4 is callable from njit code only")


@_overload(dot4)
def _dot4_ov(A, r0, r1, r2, r3, X, xs, corr, out):
    lv = level()
    if lv == "vnni":
        return lambda A, r0, r1, r2, r3, X, xs, corr, out: dot4_vnni(A, r0, r1, r2, r3, X, xs, corr, out)
    if lv == "avx2":
        return lambda A, r0, r1, r2, r3, X, xs, corr, out: dot4_avx2(A, r0, r1, r2, r3, X, xs, corr, out)
    return lambda A, r0, r1, r2, r3, X, xs, corr, out: _dot4_loops(A, r0, r1, r2, r3, X, xs, corr, out)


@_njit(cache=True)
def _dot4_loops(A, r0, r1, r2, r3, X, xs, corr, out):
    """dot4's math in plain loops (corr is 0 on the machines that take this path)."""
    for k in range(4):
        r = r0 if k == 0 else (r1 if k == 1 else (r2 if k == 2 else r3))
        t = np.float32(0.0)
        for g in range(xs.shape[0]):
            acc = 0
            for i in range(g * GS, (g + 1) * GS):
                acc += np.int32(A[r, i]) * np.int32(X[i])
            t += np.float32(acc) * xs[g]
        out[k] = t - corr


@_njit(fastmath=True, cache=True)
def rows_i8(W, s, X, xs, corr, y, r0, r1):
    """y[r] = s[r] * sum_g xs_g (W[r] . xq)_g for r in [r0, r1) (s empty: no scale); four rows per
    dot4 call, the rows _PF_BYTES ahead prefetched."""
    out = np.empty(4, np.float32)
    I = W.shape[1]
    has_s = s.shape[0] > 0
    ahead = max(4, (_PF_BYTES // I) // 4 * 4)
    r = r0
    while r + 4 <= r1:
        if r + ahead + 4 <= W.shape[0]:
            base = np.int64(r + ahead) * I
            for l in range(0, 4 * I, 64):
                _prefetch(W, base + l)
        dot4(W, r, r + 1, r + 2, r + 3, X, xs, corr, out)
        for k in range(4):
            y[r + k] = out[k] * s[r + k] if has_s else out[k]
        r += 4
    while r < r1:
        dot4(W, r, r, r, r, X, xs, corr, out)
        y[r] = out[0] * s[r] if has_s else out[0]
        r += 1


def mv_any(W, s, x, y, r0, r1):  # pragma: no cover - njit only (overload below)
    raise NotImplementedError("numba_i8dot.mv_any is callable from njit code only")


@_overload(mv_any)
def _mv_any_ov(W, s, x, y, r0, r1):
    """_mv_range's contract (y[:, r0:r1] = x @ (W[r0:r1] * s).T); int8 W on a CPU with integer
    kernels runs them (x quantized once per row of x), uint8 W is int4 (numba_i4dot: s the uint16 bits
    of its float16 group scales, (O, I/32)), anything else the float _mv_range."""
    if isinstance(W, _types.Array) and W.dtype == _types.uint8:
        from .numba_i4dot import mv4_range
        return lambda W, s, x, y, r0, r1: mv4_range(W, s, x, y, r0, r1)
    if not (isinstance(W, _types.Array) and W.dtype == _types.int8 and level()):
        return lambda W, s, x, y, r0, r1: _mv_range(W, s, x, y, r0, r1)
    vn = level() == "vnni"

    def impl(W, s, x, y, r0, r1):
        I = W.shape[1]
        if I % GS != 0 or not W.flags.c_contiguous:
            _mv_range(W, s, x, y, r0, r1)
            return
        X = np.empty(I, np.int8)
        xs = np.empty(I // GS, np.float32)
        for t in range(x.shape[0]):
            corr = quantize_x(x[t], X, xs, vn)
            rows_i8(W, s, X, xs, corr, y[t], r0, r1)
    return impl


@_njit(fastmath=True, cache=True)
def mv_serial(W, s, x, y):
    mv_any(W, s, x, y, 0, W.shape[0])


@_njit(fastmath=True, cache=True, parallel=True)
def mv_parallel(W, s, x, y, nchunk):
    O = W.shape[0]
    for c in _prange(nchunk):
        mv_any(W, s, x, y, (c * O // nchunk) // 4 * 4, O if c == nchunk - 1 else ((c + 1) * O // nchunk) // 4 * 4)


# --- key rows of a neuron-bundled FFN (kv (F, 2, D): row 2 j of kv.reshape(2 F, D) is neuron j's key) ---
def prep_x(kv, x):  # pragma: no cover - njit only (overload below)
    raise NotImplementedError("njit only")


@_overload(prep_x)
def _prep_x_ov(kv, x):
    """(X, xs, corr) of x for key4 / key1 on kv: quantized where they run integer dot products, else
    empty (then they run the float loops)."""
    if isinstance(kv, _types.Array) and kv.dtype == _types.int8 and level():
        vn = level() == "vnni"

        def impl(kv, x):
            n = x.shape[0] if x.shape[0] % GS == 0 and kv.flags.c_contiguous else 0
            X = np.empty(n, np.int8)
            xs = np.empty(n // GS, np.float32)
            corr = quantize_x(x[:n], X, xs, vn) if n else np.float32(0.0)
            return X, xs, corr
        return impl
    return lambda kv, x: (np.empty(0, np.int8), np.empty(0, np.float32), np.float32(0.0))


def key4(kv, j0, j1, j2, j3, x, X, xs, corr, a):  # pragma: no cover - njit only
    raise NotImplementedError("njit only")


def key1(kv, j, x, X, xs, corr):  # pragma: no cover - njit only
    raise NotImplementedError("njit only")


@_overload(key4)
def _key4_ov(kv, j0, j1, j2, j3, x, X, xs, corr, a):
    """a[k] = K[j_k] . x (unscaled) for four neurons."""
    if isinstance(kv, _types.Array) and kv.dtype == _types.int8 and level():
        def impl(kv, j0, j1, j2, j3, x, X, xs, corr, a):
            if X.shape[0] > 0:
                dot4(kv.reshape(kv.shape[0] * 2, kv.shape[2]), 2 * j0, 2 * j1, 2 * j2, 2 * j3, X, xs, corr, a)
            else:
                _key4_float(kv, j0, j1, j2, j3, x, a)
        return impl
    return lambda kv, j0, j1, j2, j3, x, X, xs, corr, a: _key4_float(kv, j0, j1, j2, j3, x, a)


@_overload(key1)
def _key1_ov(kv, j, x, X, xs, corr):
    if isinstance(kv, _types.Array) and kv.dtype == _types.int8 and level():
        d1 = dot1_vnni if level() == "vnni" else dot1_avx2

        def impl(kv, j, x, X, xs, corr):
            if X.shape[0] > 0:
                return d1(kv.reshape(kv.shape[0] * 2, kv.shape[2]), 2 * j, X, xs, corr)
            return _key1_float(kv, j, x)
        return impl
    return lambda kv, j, x, X, xs, corr: _key1_float(kv, j, x)


@_njit(fastmath=True, cache=True)
def _key4_float(kv, j0, j1, j2, j3, x, a):
    a0 = np.float32(0.0)
    a1 = np.float32(0.0)
    a2 = np.float32(0.0)
    a3 = np.float32(0.0)
    for d in range(kv.shape[2]):
        xd = x[d]
        a0 += _f32(kv[j0, 0, d]) * xd
        a1 += _f32(kv[j1, 0, d]) * xd
        a2 += _f32(kv[j2, 0, d]) * xd
        a3 += _f32(kv[j3, 0, d]) * xd
    a[0], a[1], a[2], a[3] = a0, a1, a2, a3


@_njit(fastmath=True, cache=True)
def _key1_float(kv, j, x):
    k = kv[j, 0]
    a = np.float32(0.0)
    for d in range(kv.shape[2]):
        a += _f32(k[d]) * x[d]
    return a


def active_for(I: int) -> bool:
    """True when int8 mat-vecs / bundle keys with I inputs run the integer kernels on this machine."""
    return bool(level()) and I % GS == 0


def reference_keys(bundle, x: np.ndarray) -> np.ndarray:
    """(F,) float64 key activations W_k x of an int8 NeuronBundledFFN as the decode kernels compute them
    (integer dot products where `active_for(D)`, else the float dot of the dequantized rows)."""
    K = np.ascontiguousarray(bundle.kv[:, 0])
    if active_for(bundle.D):
        return reference_matvec(K, bundle.scale[:, 0], x).astype(np.float64)
    return (K.astype(np.float64) * bundle.scale[:, :1]) @ np.asarray(x, np.float64)
