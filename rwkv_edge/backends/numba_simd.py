"""Integer AVX2 kernels for the n-bit predictor score W_hat @ x (quant.QuantizedMatrix, 2 or 4 bits).

Math. W_hat[r, c] = scale[r, g] * code[r, c] + zero[r, g] for column c in group g (G groups of gs
columns). x (C,) is quantized per group to int8, symmetrically: xs_g = max|x_g| / 127,
xq = rint(x / xs_g) in [-127, 127] (computed as rint(x * (127 / max|x_g|)) in float32), while the
zero-point term keeps the exact float sum of x_g. Then

    score[r] = sum_g scale[r, g] * xs_g * (code[r, g-th group] . xq_g) + zero[r, g] * sum(x_g)

with the dot products exact in integers. The only approximation against the float matvec is the
activation rounding |xs_g * xq - x| <= xs_g / 2 (see `error_bound`).

Instructions. vpmaddubsw (u8 codes x s8 xq -> i16 sums of adjacent byte pairs) and vpmaddwd with
ones (adjacent i16 pairs -> i32). Codes are never unpacked in memory: a code plane k (bits k*b ..
k*b+b-1 of every byte) is a 16-bit right shift by k*b and a byte mask (0x03 / 0x0F); bits shifted
in from the neighbouring byte land above the mask.

Layout (built once per matrix, cached in qm.__dict__['_simd_layout'], rebuilt when qm.packed,
qm.scale or qm.zero is replaced). Rows are padded to a multiple of L = 8 * RB and cut in blocks of
L rows; packed bytes are cut in chunks of 4 bytes (nchunk = C * bits / 32 per row):
    P (nblk, nchunk, 4 L) uint8: P[b, c, 4 l + j] = packed[b L + l, 4 c + j]
    S, Z (nblk, G, L) uint16: float16 bits of scale / zero, S[b, g, l] = scale[b L + l, g]
One 32-byte load of P[b, c] holds 4 bytes of each of 8 rows: after pmaddubsw each row owns two
adjacent i16 lanes and pmaddwd(ones) folds them into that row's i32 lane, so 8 rows sit in 8 lanes
and the per-group scales apply to whole vectors (no horizontal sums). The matching activations of
chunk c, plane k are 4 int8 (xq of the columns (4c + j) * (8/bits) + k, j = 0..3), broadcast to 32
bytes: X (nchunk, 8/bits, 4) int8, built per call by `_prepare_x`.

Overflow. The i16 lanes accumulate m chunks before pmaddwd (m divides the chunks of a group):
each lane sums 2 * (8/bits) * m products of at most (2^bits - 1) * 127, so m <= 10 at 2 bits and
m <= 4 at 4 bits keep it below 32767; i32 per group cannot overflow.

Only x86-64 with AVX2: `available()` must be checked first (nothing here is compiled before a
kernel is called; callers fall back to numba_cpu.quant_matvec elsewhere, e.g. on ARM phones).
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir as _ir
from numba import njit as _njit
from numba import prange as _prange
from numba import types as _types
from numba.core import cgutils as _cgutils
from numba.extending import intrinsic as _intrinsic

RB = 4              # 8-row vectors per block: the x broadcasts of a chunk are reused by RB vectors
L = 8 * RB          # rows per block
_MMAX = {2: 10, 4: 4}   # chunks accumulated in i16 before widening (see Overflow above)


def available() -> bool:
    """True on x86-64 when both the CPU and the numba target have AVX2 (and F16C)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        from llvmlite import binding as llb
        from numba.core import config
        feats = llb.get_host_cpu_features()
        if not (feats.get("avx2") and feats.get("f16c")):
            return False
        if config.CPU_NAME not in (None, "host"):      # numba told to target another CPU
            f = config.CPU_FEATURES or ""
            return "+avx2" in f and "-avx2" not in f
        return True
    except Exception:
        return False


def supports(qm) -> bool:
    """bits 2 or 4, and whole 4-byte chunks per group (2-bit: gs % 16 == 0; 4-bit: gs % 8 == 0)."""
    R, C = qm.shape
    G = qm.n_groups
    return (qm.bits in (2, 4) and R > 0 and G > 0 and C % G == 0
            and (C // G) * qm.bits % 32 == 0)


# --- LLVM: one block of L rows --------------------------------------------------------------------
def _make_block_kernel(bits):
    per = 8 // bits
    i8, i16, i32, i64 = _ir.IntType(8), _ir.IntType(16), _ir.IntType(32), _ir.IntType(64)
    f32, f16 = _ir.FloatType(), _ir.HalfType()
    v32i8, v16i16, v8i32 = _ir.VectorType(i8, 32), _ir.VectorType(i16, 16), _ir.VectorType(i32, 8)
    v8f, v8h = _ir.VectorType(f32, 8), _ir.VectorType(f16, 8)

    @_intrinsic
    def block(typingctx, P, S, Z, X, xs, xsum, y, blk, m):
        """y[blk*L:(blk+1)*L] = scores of row block blk; m chunks per i16 accumulation."""
        want = ((P, _types.uint8, 3), (S, _types.uint16, 3), (Z, _types.uint16, 3), (X, _types.int8, 3),
                (xs, _types.float32, 1), (xsum, _types.float32, 1), (y, _types.float32, 1))
        for a, dt, nd in want:
            if not (isinstance(a, _types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C"):
                return None
        sig = _types.void(P, S, Z, X, xs, xsum, y, _types.int64, _types.int64)

        def codegen(context, builder, sig, args):
            arr = [context.make_array(t)(context, builder, v) for t, v in zip(sig.args[:7], args[:7])]
            Pa, Sa, Za, Xa, xsa, xsuma, ya = arr
            blk, m = args[7], args[8]
            nchunk = _cgutils.unpack_tuple(builder, Pa.shape, 3)[1]
            G = _cgutils.unpack_tuple(builder, Sa.shape, 3)[1]
            cpg = builder.sdiv(nchunk, G)                      # chunks per group
            nsup = builder.sdiv(cpg, m)
            bytep = lambda a: builder.bitcast(a.data, i8.as_pointer())
            pbase = builder.gep(bytep(Pa), [builder.mul(blk, builder.mul(nchunk, i64(4 * L)))])
            sbase = builder.gep(builder.bitcast(Sa.data, i16.as_pointer()), [builder.mul(blk, builder.mul(G, i64(L)))])
            zbase = builder.gep(builder.bitcast(Za.data, i16.as_pointer()), [builder.mul(blk, builder.mul(G, i64(L)))])
            xbase = builder.bitcast(Xa.data, i32.as_pointer())
            mod = builder.module
            ubsw = _cgutils.get_or_insert_function(mod, _ir.FunctionType(v16i16, [v32i8, v32i8]),
                                                   "llvm.x86.avx2.pmadd.ub.sw")
            wd = _cgutils.get_or_insert_function(mod, _ir.FunctionType(v8i32, [v16i16, v16i16]),
                                                 "llvm.x86.avx2.pmadd.wd")
            mask = _ir.Constant(v32i8, [(1 << bits) - 1] * 32)
            ones = _ir.Constant(v16i16, [1] * 16)
            zero8 = _ir.Constant(_ir.VectorType(i32, 8), [0] * 8)

            def splat(val, vty):
                v = builder.insert_element(_ir.Constant(vty, _ir.Undefined), val, i32(0))
                return builder.shuffle_vector(v, _ir.Constant(vty, _ir.Undefined), zero8)

            facc = [_cgutils.alloca_once_value(builder, _ir.Constant(v8f, None)) for _ in range(RB)]
            iacc = [_cgutils.alloca_once_value(builder, _ir.Constant(v8i32, None)) for _ in range(RB)]
            hacc = [_cgutils.alloca_once_value(builder, _ir.Constant(v16i16, None)) for _ in range(RB)]
            with _cgutils.for_range(builder, G) as lg:
                g = lg.index
                for a in iacc:
                    builder.store(_ir.Constant(v8i32, None), a)
                with _cgutils.for_range(builder, nsup) as ls:
                    for a in hacc:
                        builder.store(_ir.Constant(v16i16, None), a)
                    c0 = builder.add(builder.mul(g, cpg), builder.mul(ls.index, m))
                    with _cgutils.for_range(builder, m) as lj:
                        c = builder.add(c0, lj.index)
                        xk = []                            # the 4 xq bytes of each plane, broadcast
                        for k in range(per):
                            w = builder.load(builder.gep(xbase, [builder.add(builder.mul(c, i64(per)), i64(k))]), align=4)
                            xk.append(builder.bitcast(splat(w, v8i32), v32i8))
                        crow = builder.gep(pbase, [builder.mul(c, i64(4 * L))])
                        for v in range(RB):
                            p = builder.bitcast(builder.gep(crow, [i64(32 * v)]), v16i16.as_pointer())
                            raw = builder.load(p, align=1)
                            h = builder.load(hacc[v])
                            for k in range(per):
                                sh = raw if k == 0 else builder.lshr(raw, _ir.Constant(v16i16, [k * bits] * 16))
                                code = builder.and_(builder.bitcast(sh, v32i8), mask)
                                h = builder.add(h, builder.call(ubsw, [code, xk[k]]))
                            builder.store(h, hacc[v])
                    for v in range(RB):                    # widen: adjacent i16 lanes are one row
                        builder.store(builder.add(builder.load(iacc[v]),
                                                  builder.call(wd, [builder.load(hacc[v]), ones])), iacc[v])
                xsg = splat(builder.load(builder.gep(xsa.data, [g])), v8f)
                xsumg = splat(builder.load(builder.gep(xsuma.data, [g])), v8f)
                goff = builder.mul(g, i64(L))
                for v in range(RB):
                    off = builder.add(goff, i64(8 * v))
                    sc = builder.fpext(builder.load(builder.bitcast(builder.gep(sbase, [off]), v8h.as_pointer()), align=2), v8f)
                    zc = builder.fpext(builder.load(builder.bitcast(builder.gep(zbase, [off]), v8h.as_pointer()), align=2), v8f)
                    dot = builder.sitofp(builder.load(iacc[v]), v8f)
                    t = builder.fadd(builder.fmul(dot, builder.fmul(sc, xsg)), builder.fmul(zc, xsumg))
                    builder.store(builder.fadd(builder.load(facc[v]), t), facc[v])
            ybase = builder.gep(ya.data, [builder.mul(blk, i64(L))])
            for v in range(RB):
                p = builder.bitcast(builder.gep(ybase, [i64(8 * v)]), v8f.as_pointer())
                builder.store(builder.load(facc[v]), p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return block


_block2 = _make_block_kernel(2)
_block4 = _make_block_kernel(4)


# --- njit drivers -----------------------------------------------------------------------------------
@_njit(cache=True)      # no fastmath: the int8 rounding must match reference_scores bit for bit
def _prepare_x(x, bits, G, X, xs, xsum):
    """X[c, k, j] = xq[(4c + j) * (8/bits) + k]; xs[g] = max|x_g| / 127; xsum[g] = sum(x_g)."""
    per = 8 // bits
    gs = x.shape[0] // G
    q = np.empty(x.shape[0], np.int8)
    for g in range(G):
        xg = x[g * gs:(g + 1) * gs]
        mx = np.float32(0.0)
        s = 0.0
        for i in range(gs):
            mx = max(mx, abs(xg[i]))
            s += np.float64(xg[i])
        xsum[g] = np.float32(s)
        xs[g] = mx / np.float32(127.0)
        inv = np.float32(127.0) / mx if mx > 0 else np.float32(0.0)
        for i in range(gs):
            q[g * gs + i] = np.int8(min(max(np.rint(xg[i] * inv), np.float32(-127.0)), np.float32(127.0)))
    for c in range(X.shape[0]):
        for j in range(4):
            for k in range(per):
                X[c, k, j] = q[(4 * c + j) * per + k]


@_njit(cache=True)
def _i16_run(bits, cpg):
    """Largest m <= _MMAX[bits] dividing the chunks per group."""
    m = min(cpg, 10 if bits == 2 else 4)
    while cpg % m:
        m -= 1
    return m


@_njit(cache=True)
def _blocks(P, S, Z, X, xs, xsum, bits, y, b0, b1, m):
    if bits == 2:
        for b in range(b0, b1):
            _block2(P, S, Z, X, xs, xsum, y, np.int64(b), m)
    else:
        for b in range(b0, b1):
            _block4(P, S, Z, X, xs, xsum, y, np.int64(b), m)


@_njit(cache=True, parallel=True)
def _blocks_parallel(P, S, Z, X, xs, xsum, bits, y, m, nchunk):
    nblk = P.shape[0]
    for t in _prange(nchunk):
        _blocks(P, S, Z, X, xs, xsum, bits, y, t * nblk // nchunk, (t + 1) * nblk // nchunk, m)


@_njit(cache=True)
def scores_i8(P, S, Z, x, bits, y, nchunk):
    """njit-callable core: y (nblk*L,) float32 = W_hat @ x for the layout arrays (P, S, Z) of
    `simd_layout` (rows >= R are padding), x (C,) float32 C-contiguous, bits 2 or 4 (int64),
    nchunk > 1 splits the row blocks over threads (prange). Returns nothing."""
    per = 8 // bits
    G = S.shape[1]
    X = np.empty((P.shape[1], per, 4), np.int8)
    xs = np.empty(G, np.float32)
    xsum = np.empty(G, np.float32)
    _prepare_x(x, bits, G, X, xs, xsum)
    m = np.int64(_i16_run(bits, P.shape[1] // G))
    if nchunk > 1:
        _blocks_parallel(P, S, Z, X, xs, xsum, bits, y, m, nchunk)
    else:
        _blocks(P, S, Z, X, xs, xsum, bits, y, 0, P.shape[0], m)


@_njit(cache=True)
def select_i8(P, S, Z, x, bits, thr, idx, nchunk):
    """njit-callable: writes the sorted rows r < idx.shape[0] with score >= thr (float32) into idx
    (int32, length R) and returns their count."""
    y = np.empty(P.shape[0] * L, np.float32)
    scores_i8(P, S, Z, x, bits, y, nchunk)
    n = 0
    for r in range(idx.shape[0]):
        if y[r] >= thr:
            idx[n] = r
            n += 1
    return n


# --- Python API -----------------------------------------------------------------------------------
def simd_layout(qm):
    """(P, S, Z) of the module docstring, built on first use and cached on qm."""
    lay = qm.__dict__.get("_simd_layout")
    if lay is not None and lay[0] is qm.packed and lay[1] is qm.scale and lay[2] is qm.zero:
        return lay[3:]
    if not supports(qm):
        raise ValueError(f"numba_simd does not support {qm.bits}-bit group {qm.group_size} {qm.shape}")
    (R, C), G = qm.shape, qm.n_groups
    nbytes, nchunk, Rp = C * qm.bits // 8, C * qm.bits // 32, -(-R // L) * L
    P = np.zeros((Rp, nbytes), np.uint8)
    P[:R] = qm.packed
    P = np.ascontiguousarray(P.reshape(Rp // L, L, nchunk, 4).transpose(0, 2, 1, 3)).reshape(Rp // L, nchunk, 4 * L)
    SZ = []
    for a in (qm.scale, qm.zero):            # padding rows: scale 0, zero 0 -> score 0
        t = np.zeros((Rp, G), np.float16)
        t[:R] = a
        SZ.append(np.ascontiguousarray(t.reshape(Rp // L, L, G).transpose(0, 2, 1)).view(np.uint16))
    qm.__dict__["_simd_layout"] = (qm.packed, qm.scale, qm.zero, P, SZ[0], SZ[1])
    return P, SZ[0], SZ[1]


def _x1d(x):
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, np.float32).reshape(-1)


def quant_matvec_i8(qm, x: np.ndarray, out: np.ndarray | None = None, nchunk: int = 1) -> np.ndarray:
    """W_hat @ x (R,) float32 with x rounded to int8 per group (see module docstring)."""
    P, S, Z = simd_layout(qm)
    x = _x1d(x)
    if x.shape[0] != qm.shape[1]:
        raise ValueError(f"x must have {qm.shape[1]} elements, got {x.shape[0]}")
    R = qm.shape[0]
    y = np.empty(P.shape[0] * L, np.float32)
    scores_i8(P, S, Z, x, qm.bits, y, nchunk)
    if out is not None:
        out[:] = y[:R]
        return out
    return y[:R]


def quant_select_i8(qm, x: np.ndarray, threshold: float, idx: np.ndarray, nchunk: int = 1) -> int:
    """Sorted rows r with score >= threshold into idx (int32, >= R long); returns the count. One njit
    call (scores and selection)."""
    P, S, Z = simd_layout(qm)
    x = _x1d(x)
    if x.shape[0] != qm.shape[1] or idx.dtype != np.int32 or idx.shape[0] < qm.shape[0]:
        raise ValueError("x must be (C,) and idx int32 with at least R entries")
    return int(select_i8(P, S, Z, x, qm.bits, np.float32(threshold), idx[:qm.shape[0]], nchunk))


# --- numpy reference of the same math ---------------------------------------------------------------
def quantize_x(x: np.ndarray, G: int):
    """(xq (G, gs) int64, xs (G,) float32, xsum (G,) float32) exactly as the kernels compute them."""
    xg = np.asarray(x, np.float32).reshape(G, -1)
    mx = np.abs(xg).max(axis=1)
    xs = mx / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127.0) / mx, np.float32(0.0)).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[:, None]), -127, 127).astype(np.int64)
    return xq, xs.astype(np.float32), xg.astype(np.float64).sum(axis=1).astype(np.float32)


def reference_scores(qm, x: np.ndarray) -> np.ndarray:
    """The kernels' integer math in numpy (float64 epilogue): (R,) float32."""
    R, C = qm.shape
    G = qm.n_groups
    xq, xs, xsum = quantize_x(x, G)
    dot = np.einsum("rgs,gs->rg", qm.codes().astype(np.int64).reshape(R, G, C // G), xq)
    sc = qm.scale.astype(np.float32) * xs                 # float32 product, like the kernel
    y = (dot * sc.astype(np.float64)).sum(1) + qm.zero.astype(np.float64) @ xsum.astype(np.float64)
    return y.astype(np.float32)


def error_bound(qm, x: np.ndarray) -> np.ndarray:
    """Per-row bound on |int8 score - float score| from activation rounding alone:
    sum_g scale[r, g] * sum_c code[r, c] * xs_g / 2 (float rounding aside)."""
    R, C = qm.shape
    G = qm.n_groups
    _, xs, _ = quantize_x(x, G)
    csum = qm.codes().astype(np.float64).reshape(R, G, C // G).sum(2)
    return (qm.scale.astype(np.float64) * csum * xs / 2).sum(1)
