"""Decode kernels for int4 weights (quant/q4.py layout): mat-vec rows and the neuron-bundled FFN.

Weights: packed uint8 (R, C/2), codes u = q + 8 in 0..15, byte g*16 + i of a row = column g*32 + i (low
nibble) and g*32 + 16 + i (high nibble); a float16 scale d per group of 32 (S (R, C/32), passed as its
uint16 bits). The activation x (C,) is rounded to int8 once per mat-vec, in groups of 32 exactly as
numba_i8dot.quantize_x does (xs_g = max|x_g| / 127, xq = rint(x / xs_g)). Then

    W_hat[r] . x ~= sum_g d_rg xs_g (u_g . xq_g - 8 sum(xq_g))           (the dots exact in int32)

and `init` (G, 8) int32 holds -8 sum(xq_g) in lane 0, so each group starts its integer accumulator there.

Per group and row (x86-64, the level numba_i8dot.level() reports): one 16-byte load, `and 15` and a
shift give the 32 codes (low nibbles = the first 16 columns, high = the next 16: no shuffle across
lanes beyond one concatenation), then VNNI vpdpbusd (codes are u8, xq s8) or AVX2 vpmaddubsw (pairs
<= 2 * 15 * 127: no saturation) + vpmaddwd; the i32 lanes are converted and FMA'd with d_rg xs_g.
Elsewhere: the same integer math in plain loops.

    rows_i4(W, S, X, xs, init, y, r0, r1)      y[r] for rows r0..r1 (mv_any's int4 branch calls it)
    ffn4_range(kv, sc, x, idx, lo, hi, out, dense)   the bundled FFN over neurons idx[lo:hi]:
        kv uint8 (F, 2, D/2) = (key row, value column) per neuron, sc uint16 (F, 2, D/32) their scales.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir as _ir
from numba import njit as _njit
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic
from numba.extending import overload as _overload

from .numba_common import _PF_BYTES, _h2f, _prefetch
from .numba_i8dot import GS, level

_PF_NEURONS = 8


def _dot_codegen(vnni, nrow, builder, Aa, Sa, Xa, xsa, ia, rows):
    """LLVM of sum_g d_rg xs_g (u_g . xq_g - 8 sum xq_g) for the nrow rows `rows`: float32 values.
    Groups go two at a time (see `quantize_x4` for the activation layout that makes this work): one
    32-byte load holds both groups' codes, `and 15` gives the low nibbles of both (group g in the low
    128 bits, g + 1 in the high), a shift the high nibbles; each meets one 32-byte activation vector.
    The lanes of the i32 result then belong to g (0-3) and g + 1 (4-7), scaled by one vector. An odd
    last group runs alone (low and high nibbles concatenated)."""
    i8, i16, i32, i64 = _ir.IntType(8), _ir.IntType(16), _ir.IntType(32), _ir.IntType(64)
    f32 = _ir.FloatType()
    v16i8, v32i8 = _ir.VectorType(i8, 16), _ir.VectorType(i8, 32)
    v16i16, v8i32, v8f = _ir.VectorType(i16, 16), _ir.VectorType(i32, 8), _ir.VectorType(f32, 8)
    v2h, v2f = _ir.VectorType(_ir.HalfType(), 2), _ir.VectorType(f32, 2)
    H = _cgutils.unpack_tuple(builder, Aa.shape, 2)[1]          # bytes per row
    G = _cgutils.unpack_tuple(builder, Sa.shape, 2)[1]          # groups per row
    abase = builder.bitcast(Aa.data, i8.as_pointer())
    sbase = builder.bitcast(Sa.data, i16.as_pointer())
    aptr = [builder.gep(abase, [builder.mul(r, H)]) for r in rows]
    sptr = [builder.gep(sbase, [builder.mul(r, G)]) for r in rows]
    xbase = builder.bitcast(Xa.data, i8.as_pointer())
    ibase = builder.bitcast(ia.data, i32.as_pointer())
    fn = lambda name, ret, *a: _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(ret, a), name)
    fma = fn("llvm.fma.v8f32", v8f, v8f, v8f, v8f)
    if vnni:
        dp = fn("llvm.x86.avx512.vpdpbusd.256", v8i32, v8i32, v8i32, v8i32)
    else:
        ubsw = fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, v32i8, v32i8)
        wd = fn("llvm.x86.avx2.pmadd.wd", v8i32, v16i16, v16i16)
    facc = [_cgutils.alloca_once_value(builder, _ir.Constant(v8f, None)) for _ in range(nrow)]
    ones = _ir.Constant(v16i16, [1] * 16)
    vload = lambda base, off, ty, al: builder.load(builder.bitcast(builder.gep(base, [off]), ty.as_pointer()), align=al)  # noqa: E731

    def dot(acc, w, x):                     # acc (v8i32) + the dot of u8 codes w with s8 x, per 4 bytes
        if vnni:
            return builder.call(dp, [acc, builder.bitcast(w, v8i32), builder.bitcast(x, v8i32)])
        return builder.add(builder.call(wd, [builder.call(ubsw, [w, x]), ones]), acc)

    m15_32 = _ir.Constant(v32i8, [15] * 32)
    four32 = _ir.Constant(v32i8, [4] * 32)
    xsf = builder.bitcast(xsa.data, f32.as_pointer())
    v8h = _ir.VectorType(_ir.HalfType(), 8)

    def pair(p, scale):
        """Groups 2p, 2p+1 of every row; scale(k) -> v8f (d xs of 2p in lanes 0-3, of 2p+1 in 4-7)."""
        xlo = vload(xbase, builder.mul(p, i64(64)), v32i8, 1)
        xhi = vload(xbase, builder.add(builder.mul(p, i64(64)), i64(32)), v32i8, 1)
        iv = vload(ibase, builder.mul(p, i64(16)), v8i32, 4)
        for k in range(nrow):
            wb = vload(aptr[k], builder.mul(p, i64(32)), v32i8, 1)
            lo = builder.and_(wb, m15_32)
            hi = builder.and_(builder.lshr(wb, four32), m15_32)
            if vnni:
                acc = dot(dot(iv, lo, xlo), hi, xhi)
            else:
                h = builder.add(builder.call(ubsw, [lo, xlo]), builder.call(ubsw, [hi, xhi]))   # <= 7620: no overflow
                acc = builder.add(builder.call(wd, [h, ones]), iv)
            builder.store(builder.call(fma, [builder.sitofp(acc, v8f), scale(k), builder.load(facc[k])]), facc[k])

    # four pairs at a time: the eight groups' d xs computed as one vector per row, then one shuffle per pair
    nq = builder.sdiv(G, i64(8))
    with _cgutils.for_range(builder, nq) as lq:
        q = lq.index
        xs8 = vload(xsf, builder.mul(q, i64(8)), v8f, 4)
        d8 = [builder.fmul(builder.fpext(vload(sptr[k], builder.mul(q, i64(8)), v8h, 2), v8f), xs8) for k in range(nrow)]
        for pp in range(4):
            sel = _ir.Constant(v8i32, [2 * pp] * 4 + [2 * pp + 1] * 4)
            pair(builder.add(builder.mul(q, i64(4)), i64(pp)),
                 lambda k, sel=sel: builder.shuffle_vector(d8[k], _ir.Constant(v8f, _ir.Undefined), sel))
    with _cgutils.for_range_slice(builder, builder.mul(nq, i64(4)), builder.sdiv(G, i64(2)), i64(1)) as (p, _):
        xs2 = vload(xsf, builder.mul(p, i64(2)), v2f, 4)
        pair(p, lambda k: builder.shuffle_vector(
            builder.fmul(builder.fpext(vload(sptr[k], builder.mul(p, i64(2)), v2h, 2), v2f), xs2),
            _ir.Constant(v2f, _ir.Undefined), _ir.Constant(v8i32, [0, 0, 0, 0, 1, 1, 1, 1])))
    odd = builder.icmp_signed("!=", builder.srem(G, i64(2)), i64(0))
    with builder.if_then(odd):                                  # the last group alone, natural order
        g = builder.sub(G, i64(1))
        xv = vload(xbase, builder.mul(g, i64(32)), v32i8, 1)
        iv = vload(ibase, builder.mul(g, i64(8)), v8i32, 4)
        xsg = builder.load(builder.gep(xsa.data, [g]))
        cat = _ir.Constant(_ir.VectorType(i32, 32), list(range(32)))
        for k in range(nrow):
            wb = vload(aptr[k], builder.mul(g, i64(16)), v16i8, 1)
            w = builder.shuffle_vector(builder.and_(wb, _ir.Constant(v16i8, [15] * 16)),
                                       builder.lshr(wb, _ir.Constant(v16i8, [4] * 16)), cat)
            acc = dot(iv, w, xv)
            d = builder.fpext(builder.bitcast(builder.load(builder.gep(sptr[k], [g]), align=2), _ir.HalfType()), f32)
            sc = builder.fmul(d, xsg)
            scv = builder.shuffle_vector(builder.insert_element(_ir.Constant(v8f, _ir.Undefined), sc, i32(0)),
                                         _ir.Constant(v8f, _ir.Undefined), _ir.Constant(v8i32, [0] * 8))
            builder.store(builder.call(fma, [builder.sitofp(acc, v8f), scv, builder.load(facc[k])]), facc[k])
    res = []
    for k in range(nrow):
        v = builder.load(facc[k])
        t = builder.extract_element(v, i32(0))
        for e in range(1, 8):
            t = builder.fadd(t, builder.extract_element(v, i32(e)))
        res.append(t)
    return res


def _ok(A, S, X, xs, init):
    want = ((A, _types.uint8, 2), (S, _types.uint16, 2), (X, _types.int8, 1), (xs, _types.float32, 1),
            (init, _types.int32, 2))
    return all(isinstance(a, _types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C" for a, dt, nd in want)


def _make_dot(vnni: bool):
    @_intrinsic
    def dot4(typingctx, A, S, r0, r1, r2, r3, X, xs, init, out):
        """out[k] = row r_k of (A, S) . x (four rows, activation loads shared)."""
        if not (_ok(A, S, X, xs, init) and isinstance(out, _types.Array) and out.dtype == _types.float32):
            return None
        i64 = _types.int64
        sig = _types.void(A, S, i64, i64, i64, i64, X, xs, init, out)

        def codegen(context, builder, sig, args):
            Aa, Sa, Xa, xsa, ia, oa = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 6, 7, 8, 9)]
            for k, v in enumerate(_dot_codegen(vnni, 4, builder, Aa, Sa, Xa, xsa, ia, args[2:6])):
                builder.store(v, builder.gep(oa.data, [_ir.IntType(64)(k)]))
            return context.get_dummy_value()
        return sig, codegen

    @_intrinsic
    def dot1(typingctx, A, S, r, X, xs, init):
        """row r of (A, S) . x."""
        if not _ok(A, S, X, xs, init):
            return None
        sig = _types.float32(A, S, _types.int64, X, xs, init)

        def codegen(context, builder, sig, args):
            Aa, Sa, Xa, xsa, ia = [context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 3, 4, 5)]
            return _dot_codegen(vnni, 1, builder, Aa, Sa, Xa, xsa, ia, [args[2]])[0]
        return sig, codegen

    return dot4, dot1


dot4_vnni, dot1_vnni = _make_dot(True)
dot4_avx2, dot1_avx2 = _make_dot(False)


@_njit(cache=True, inline="always")
def _xpos(g, i, G):
    """Index in the kernel layout X (see quantize_x4) of activation column g * 32 + i."""
    if g >= G - G % 2:                              # an odd last group: natural order
        return g * 32 + i
    half = 32 if i >= 16 else 0
    return (g // 2) * 64 + half + (g % 2) * 16 + (i - 16 if i >= 16 else i)


@_njit(cache=True, inline="always")
def _init_of(init, g, G):
    """-8 sum(xq_g) from the kernel layout of init (see quantize_x4)."""
    if g >= G - G % 2:
        return init[g, 0]
    return init[g - g % 2, 4 * (g % 2)]


@_njit(cache=True)
def dot1_loops(A, S, r, X, xs, init):
    """dot1's math in plain integer loops (the path of CPUs without AVX2; also a test oracle)."""
    t = np.float32(0.0)
    G = S.shape[1]
    for g in range(G):
        acc = np.int32(_init_of(init, g, G))
        for i in range(16):
            b = np.int32(A[r, g * 16 + i])
            acc += (b & 15) * np.int32(X[_xpos(g, i, G)]) + (b >> 4) * np.int32(X[_xpos(g, 16 + i, G)])
        t += np.float32(acc) * (_h2f(S[r, g]) * xs[g])
    return t


def dot4(A, S, r0, r1, r2, r3, X, xs, init, out):  # pragma: no cover - njit only (overload below)
    raise NotImplementedError("njit only")


def dot1(A, S, r, X, xs, init):  # pragma: no cover - njit only
    raise NotImplementedError("njit only")


@_overload(dot4)
def _dot4_ov(A, S, r0, r1, r2, r3, X, xs, init, out):
    lv = level()
    if lv == "vnni":
        return lambda A, S, r0, r1, r2, r3, X, xs, init, out: dot4_vnni(A, S, r0, r1, r2, r3, X, xs, init, out)
    if lv == "avx2":
        return lambda A, S, r0, r1, r2, r3, X, xs, init, out: dot4_avx2(A, S, r0, r1, r2, r3, X, xs, init, out)

    def impl(A, S, r0, r1, r2, r3, X, xs, init, out):
        out[0] = dot1_loops(A, S, r0, X, xs, init)
        out[1] = dot1_loops(A, S, r1, X, xs, init)
        out[2] = dot1_loops(A, S, r2, X, xs, init)
        out[3] = dot1_loops(A, S, r3, X, xs, init)
    return impl


@_overload(dot1)
def _dot1_ov(A, S, r, X, xs, init):
    lv = level()
    if lv == "vnni":
        return lambda A, S, r, X, xs, init: dot1_vnni(A, S, r, X, xs, init)
    if lv == "avx2":
        return lambda A, S, r, X, xs, init: dot1_avx2(A, S, r, X, xs, init)
    return lambda A, S, r, X, xs, init: dot1_loops(A, S, r, X, xs, init)


@_njit(cache=True)      # no fastmath: rounding as in the numpy reference (quant.q4.quantize_activation)
def quantize_x4(x, X, xs, init):
    """The activation in the kernels' layout: xs (G,) float32 the group scales, X (I,) int8 the rounded
    values xq and init (G, 8) int32 the -8 sum(xq_g) terms, G = I / 32. Groups go in pairs (2p, 2p+1):
    X[64p:64p+32] = xq_2p[0:16], xq_2p+1[0:16] and X[64p+32:64p+64] = xq_2p[16:32], xq_2p+1[16:32] (what
    the low and the high nibbles of the pair's 32 code bytes meet); init[2p] holds group 2p's term in
    lane 0 and 2p+1's in lane 4. An odd last group g: natural order, its term in init[g, 0]."""
    G = x.shape[0] // GS
    init[:, :] = 0
    for g in range(G):
        mx = np.float32(0.0)
        for i in range(g * GS, (g + 1) * GS):
            mx = max(mx, abs(x[i]))
        inv = np.float32(127.0) / mx if mx > 0 else np.float32(0.0)
        xs[g] = mx / np.float32(127.0)
        sq = 0
        for i in range(GS):
            v = np.int32(np.rint(x[g * GS + i] * inv))
            X[_xpos(g, i, G)] = v
            sq += v
        if g >= G - G % 2:
            init[g, 0] = -8 * sq
        else:
            init[g - g % 2, 4 * (g % 2)] = -8 * sq


@_njit(fastmath=True, cache=True)
def rows_i4(W, S, X, xs, init, y, r0, r1):
    """y[r] = W_hat[r] . x for r in [r0, r1): four rows per dot4, the rows _PF_BYTES ahead prefetched."""
    out = np.empty(4, np.float32)
    H = W.shape[1]
    ahead = max(4, (_PF_BYTES // H) // 4 * 4)
    r = r0
    while r + 4 <= r1:
        if r + ahead + 4 <= W.shape[0]:
            base = np.int64(r + ahead) * H
            for l in range(0, 4 * H, 64):
                _prefetch(W, base + l)
        dot4(W, S, r, r + 1, r + 2, r + 3, X, xs, init, out)
        for k in range(4):
            y[r + k] = out[k]
        r += 4
    while r < r1:
        y[r] = dot1(W, S, r, X, xs, init)
        r += 1


@_njit(fastmath=True, cache=True)
def mv4_range(W, S, x, y, r0, r1):
    """y[:, r0:r1] = x @ W_hat[r0:r1].T for x (T, 2 W.shape[1]), each row of x quantized once."""
    I = 2 * W.shape[1]
    X = np.empty(I, np.int8)
    xs = np.empty(I // GS, np.float32)
    init = np.empty((I // GS, 8), np.int32)
    for t in range(x.shape[0]):
        quantize_x4(x[t], X, xs, init)
        rows_i4(W, S, X, xs, init, y[t], r0, r1)


@_intrinsic
def _nib(typingctx, byte, shift):
    """float32((byte >> shift) & 15) in 32-bit integer arithmetic (numba would widen to int64, whose
    conversion to float does not vectorise on AVX2)."""
    def codegen(context, builder, sig, args):
        i32 = _ir.IntType(32)
        v = builder.lshr(builder.zext(args[0], i32), builder.trunc(args[1], i32))
        return builder.uitofp(builder.and_(v, i32(15)), _ir.FloatType())
    return _types.float32(_types.uint8, _types.int64), codegen


@_njit(fastmath=True, cache=True)
def dequant_rows4(W, S, r0, r1, out):
    """out[:r1-r0] = float32 W_hat[r0:r1] (the prefill path: dequantized blocks, then BLAS)."""
    for r in range(r0, r1):
        o = out[r - r0]
        for g in range(S.shape[1]):
            d = _h2f(S[r, g])
            c = np.float32(-8.0) * d
            ab = W[r, g * 16:(g + 1) * 16]
            o0 = o[g * 32:g * 32 + 16]
            o1 = o[g * 32 + 16:(g + 1) * 32]
            for i in range(16):
                o0[i] = _nib(ab[i], 0) * d + c
                o1[i] = _nib(ab[i], 4) * d + c


# --- the neuron-bundled FFN -------------------------------------------------------------------------
@_njit(cache=True, inline="always")
def _quad(idx, p, m):
    """Neurons idx[p], ..., idx[p + m - 1] (m <= 4) as four ids for dot4, the first repeated past m."""
    j0 = np.int64(idx[p])
    j1 = np.int64(idx[p + 1]) if m > 1 else j0
    j2 = np.int64(idx[p + 2]) if m > 2 else j0
    j3 = np.int64(idx[p + 3]) if m > 3 else j0
    return j0, j1, j2, j3


@_njit(fastmath=True, cache=True, inline="always")
def _axpy(A, S, row, h, out):
    """out += h * W_hat[row] (a value column)."""
    for g in range(S.shape[1]):
        hd = h * _h2f(S[row, g])
        c = np.float32(-8.0) * hd
        ab = A[row, g * 16:(g + 1) * 16]
        o0 = out[g * 32:g * 32 + 16]
        o1 = out[g * 32 + 16:(g + 1) * 32]
        for i in range(16):
            o0[i] += _nib(ab[i], 0) * hd + c
            o1[i] += _nib(ab[i], 4) * hd + c


@_njit(fastmath=True, cache=True, inline="always")
def _axpy2(A, S, r0, h0, r1, h1, out):
    """out += h0 W_hat[r0] + h1 W_hat[r1] (two value columns per pass over out)."""
    for g in range(S.shape[1]):
        a0 = h0 * _h2f(S[r0, g])
        a1 = h1 * _h2f(S[r1, g])
        c = np.float32(-8.0) * (a0 + a1)
        b0 = A[r0, g * 16:(g + 1) * 16]
        b1 = A[r1, g * 16:(g + 1) * 16]
        o0 = out[g * 32:g * 32 + 16]
        o1 = out[g * 32 + 16:(g + 1) * 32]
        for i in range(16):
            o0[i] += (_nib(b0[i], 0) * a0 + _nib(b1[i], 0) * a1) + c
            o1[i] += (_nib(b0[i], 4) * a0 + _nib(b1[i], 4) * a1) + c


@_njit(fastmath=True, cache=True)
def ffn4_range(kv, sc, x, idx, lo, hi, out, dense):
    """out += sum over j in idx[lo:hi] of relu(K[j] . x)^2 V[:, j] (K, V int4); returns the value
    columns read. dense: every neuron in order, key then value column (one sequential stream); else two
    passes as numba_sparse._ffn_range: the predicted key rows four at a time, then the value columns of
    the neurons with a positive activation, each pass prefetching _PF_NEURONS ahead."""
    F, H = kv.shape[0], kv.shape[2]
    G = sc.shape[2]
    A = kv.reshape(2 * F, H)                 # row 2 j = neuron j's key, 2 j + 1 its value column
    S = sc.reshape(2 * F, G)
    D = 2 * H
    X = np.empty(D, np.int8)
    xs = np.empty(G, np.float32)
    init = np.empty((G, 8), np.int32)
    quantize_x4(x, X, xs, init)
    a4 = np.empty(4, np.float32)
    if dense:                    # four neurons at a time: their keys in one dot4, then their values
        p = lo
        while p < hi:
            m = min(4, hi - p)
            j0, j1, j2, j3 = _quad(idx, p, m)
            dot4(A, S, 2 * j0, 2 * j1, 2 * j2, 2 * j3, X, xs, init, a4)
            for q in range(m):
                a4[q] = a4[q] * a4[q] if a4[q] > 0 else np.float32(0.0)
            if m == 4:
                _axpy2(A, S, 2 * j0 + 1, a4[0], 2 * j1 + 1, a4[1], out)
                _axpy2(A, S, 2 * j2 + 1, a4[2], 2 * j3 + 1, a4[3], out)
            else:
                for q in range(m):
                    _axpy(A, S, 2 * np.int64(idx[p + q]) + 1, a4[q], out)
            p += m
        return hi - lo
    pj = np.empty(hi - lo + 4, np.int64)
    ph = np.empty(hi - lo + 4, np.float32)
    n = 0
    p = lo
    while p < hi:
        for q in range(p + _PF_NEURONS, min(p + _PF_NEURONS + 4, hi)):
            jq = np.int64(idx[q])
            for l in range(0, H, 64):
                _prefetch(kv, jq * (2 * H) + l)
            _prefetch(sc, jq * (4 * G))
        m = min(4, hi - p)
        j0, j1, j2, j3 = _quad(idx, p, m)
        dot4(A, S, 2 * j0, 2 * j1, 2 * j2, 2 * j3, X, xs, init, a4)
        for q in range(m):
            a = a4[q]
            if a > 0:
                pj[n] = j0 if q == 0 else (j1 if q == 1 else (j2 if q == 2 else j3))
                ph[n] = a * a
                n += 1
        p += m
    q = 0
    while q < n:
        for r in range(q + _PF_NEURONS, min(q + _PF_NEURONS + 2, n)):
            for l in range(0, H, 64):
                _prefetch(kv, pj[r] * (2 * H) + H + l)
        if q + 2 <= n:
            _axpy2(A, S, 2 * pj[q] + 1, ph[q], 2 * pj[q + 1] + 1, ph[q + 1], out)
            q += 2
        else:
            _axpy(A, S, 2 * pj[q] + 1, ph[q], out)
            q += 1
    return n


def reference_ffn4(packed_kv: np.ndarray, scale: np.ndarray, x: np.ndarray, idx) -> np.ndarray:
    """numpy oracle of ffn4_range (sparse or dense): keys by quant.q4.reference_matvec_q4 (x rounded to
    int8 as the kernels round it), values in float64. packed_kv (F, 2, D/2), scale (F, 2, D/32) float16."""
    from rwkv_edge.quant.q4 import dequantize_q4, reference_matvec_q4

    idx = np.asarray(idx, np.int64)
    k = reference_matvec_q4(packed_kv[idx, 0], np.asarray(scale)[idx, 0], x).astype(np.float64)
    h = np.maximum(k, 0.0) ** 2
    V = dequantize_q4(packed_kv[idx, 1], np.asarray(scale)[idx, 1]).astype(np.float64)   # (n, D)
    return (h @ V).astype(np.float32)
