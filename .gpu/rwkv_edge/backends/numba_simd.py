"""Integer AVX2 kernels for the n-bit predictor score W_hat @ x (quant.QuantizedMatrix, 2 or 4 bits).

Math. W_hat[r, c] = scale[r, g] * code[r, c] + zero[r, g] for column c in group g (G groups of gs
columns), x (C,). x is quantized per group to int8, symmetrically: xs_g = max|x_g| / 127,
xq = rint(x * (127 / max|x_g|)) in [-127, 127] (float32 ops; |x * inv| <= 127 (1 + 2^-22) rounds to
at most 127, so no clip). With mid = (2^bits - 1) / 2 and e_g = mid * (sum(x_g) - xs_g * sum(xq_g)):

    score[r] = sum_g scale[r, g] * (xs_g * (codes_g[r] . xq_g) + e_g) + zero[r, g] * sum(x_g)

the dot products exact in integers, sum(x_g) exact (float64, rounded once). Against the float matvec
the only error is the activation rounding, and e_g confines it to the centred codes:
score - exact = sum_g scale * sum_c (code_c - mid) * (xs_g xq_c - x_c), |.| <= `error_bound`
(half of what the uncentred form scale * code * (xs xq - x) costs at 2 bits, a quarter at 4 bits).

Instructions. vpmaddubsw (u8 codes x s8 xq -> i16 sums of adjacent byte pairs), i16 adds, and
vpmaddwd with a constant (adjacent i16 pairs -> i32). Codes are never unpacked in memory: planes
come from the raw bytes with one 16-bit right shift by 4 and byte masks (bits shifted in from the
neighbouring byte land above the mask). 4-bit: planes raw & 0x0F, (raw >> 4) & 0x0F. 2-bit: planes
raw & 0x03, raw & 0x0C, (raw >> 4) & 0x03, (raw >> 4) & 0x0C; the 0x0C planes hold 4 * code (saves
two shifts per load) and go to their own i16 accumulator, widened with weight 1 while the other is
widened with weight 4: the i32 is 4 * dot and xs_g / 4 (exact) undoes it.

Layout (built once per matrix, cached in qm.__dict__['_simd_layout'] and rebuilt when qm.packed,
qm.scale or qm.zero is replaced). Columns are cut in chunks of 4 * per (per = 8 / bits codes per
byte, nchunk = C / (4 per)) and each chunk's codes are repacked into 4 bytes per row so that plane k
of byte j holds column c*4*per + 4k + j; rows are padded to a multiple of L = 8 * RB (scale = zero
= 0, score 0) and cut in blocks of L rows:
    P (nblk, nchunk, 4 L) uint8: P[b, c, 4 l + j] = sum_k code[b L + l, 4 per c + 4 k + j] << k bits
    S, Z (nblk, G, L) uint16: float16 bits of scale / zero, S[b, g, l] = scale[b L + l, g]
One 32-byte load of P[b, c] holds the 4 bytes of 8 rows: after pmaddubsw each row owns two adjacent
i16 lanes and pmaddwd folds them into its i32 lane, so 8 rows sit in 8 lanes and the per-group scales
apply to whole vectors (no horizontal sums). Thanks to the repacking the activations of chunk c,
plane k are the 4 contiguous int8 xq[4 (per c + k) : +4], one 32-bit broadcast: the per-call x
preparation is only the rounding (no shuffling).

Overflow. The i16 lanes accumulate m chunks (m divides the chunks of a group) before widening: a
2-bit lane gets <= 4 products of <= 12 * 127 per chunk (m <= 5), a 4-bit lane 4 of <= 15 * 127
(m <= 4), staying below 32767; pmaddubsw's own pair sums (<= 3810) never saturate.

Only x86-64 with AVX2: check `available()` first (nothing here is compiled before a kernel is
called; callers fall back to numba_cpu.quant_matvec, e.g. on ARM phones).
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

from .numba_common import _threshold_select

RB = 4              # 8-row vectors per block: the x broadcasts of a chunk are reused by RB vectors
L = 8 * RB          # rows per block


_AVAILABLE: list = []


def available() -> bool:
    """True on x86-64 when both the CPU and the numba target have AVX2 (and F16C); cached."""
    if not _AVAILABLE:
        _AVAILABLE.append(_probe())
    return _AVAILABLE[0]


def _probe() -> bool:
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
# Code planes: (16-bit right shift of the raw bytes, byte mask, i16 accumulator) per plane k, and the
# pmaddwd multiplier of each accumulator. 2-bit: one shift (by 4) serves two planes each; planes 1
# and 3 are masked with 0x0C without shifting back, i.e. they hold 4 * code and go to a second
# accumulator widened with weight 1 while the first is widened with weight 4: the i32 sum is then
# 4 * (codes . xq), and the 1/4 goes into the float scale (exact).
_PLANES = {2: ((0, 0x03, 0), (0, 0x0C, 1), (4, 0x03, 0), (4, 0x0C, 1)), 4: ((0, 0x0F, 0), (4, 0x0F, 0))}
_WIDEN = {2: (4, 1), 4: (1,)}


def _make_block_kernel(bits):
    per, planes, widen = 8 // bits, _PLANES[bits], _WIDEN[bits]
    i8, i16, i32, i64 = _ir.IntType(8), _ir.IntType(16), _ir.IntType(32), _ir.IntType(64)
    f32, f16 = _ir.FloatType(), _ir.HalfType()
    v32i8, v16i16, v8i32 = _ir.VectorType(i8, 32), _ir.VectorType(i16, 16), _ir.VectorType(i32, 8)
    v8f, v8h = _ir.VectorType(f32, 8), _ir.VectorType(f16, 8)

    @_intrinsic
    def block(typingctx, P, S, Z, X, ab, y, blk, m):
        """y[blk*L:(blk+1)*L] = scores of row block blk; m chunks per i16 accumulation;
        ab (G, 3) float32 = per group (xs (/ 4 at 2 bits), centring term e, sum(x))."""
        want = ((P, _types.uint8, 3), (S, _types.uint16, 3), (Z, _types.uint16, 3), (X, _types.int8, 1),
                (ab, _types.float32, 2), (y, _types.float32, 1))
        for a, dt, nd in want:
            if not (isinstance(a, _types.Array) and a.dtype == dt and a.ndim == nd and a.layout == "C"):
                return None
        sig = _types.void(P, S, Z, X, ab, y, _types.int64, _types.int64)

        def codegen(context, builder, sig, args):
            Pa, Sa, Za, Xa, aba, ya = [context.make_array(t)(context, builder, v)
                                       for t, v in zip(sig.args[:6], args[:6])]
            blk, m = args[6], args[7]
            nchunk = _cgutils.unpack_tuple(builder, Pa.shape, 3)[1]
            G = _cgutils.unpack_tuple(builder, Sa.shape, 3)[1]
            cpg = builder.sdiv(nchunk, G)                      # chunks per group
            nsup = builder.sdiv(cpg, m)
            pbase = builder.gep(builder.bitcast(Pa.data, i8.as_pointer()), [builder.mul(blk, builder.mul(nchunk, i64(4 * L)))])
            soff = builder.mul(blk, builder.mul(G, i64(L)))
            sbase = builder.gep(builder.bitcast(Sa.data, i16.as_pointer()), [soff])
            zbase = builder.gep(builder.bitcast(Za.data, i16.as_pointer()), [soff])
            xbase = builder.bitcast(Xa.data, i32.as_pointer())
            fn = lambda name, ret, *a: _cgutils.get_or_insert_function(builder.module, _ir.FunctionType(ret, a), name)
            ubsw = fn("llvm.x86.avx2.pmadd.ub.sw", v16i16, v32i8, v32i8)
            wd = fn("llvm.x86.avx2.pmadd.wd", v8i32, v16i16, v16i16)
            fma = fn("llvm.fma.v8f32", v8f, v8f, v8f, v8f)
            zero8 = _ir.Constant(v8i32, [0] * 8)

            def splat(val, vty):
                v = builder.insert_element(_ir.Constant(vty, _ir.Undefined), val, i32(0))
                return builder.shuffle_vector(v, _ir.Constant(vty, _ir.Undefined), zero8)

            na = len(widen)
            facc = [_cgutils.alloca_once_value(builder, _ir.Constant(v8f, None)) for _ in range(RB)]
            iacc = [_cgutils.alloca_once_value(builder, _ir.Constant(v8i32, None)) for _ in range(RB)]
            hacc = [[_cgutils.alloca_once_value(builder, _ir.Constant(v16i16, None)) for _ in range(na)]
                    for _ in range(RB)]
            with _cgutils.for_range(builder, G) as lg:
                g = lg.index
                for a in iacc:
                    builder.store(_ir.Constant(v8i32, None), a)
                with _cgutils.for_range(builder, nsup) as ls:
                    for a in sum(hacc, []):
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
                            raw = builder.load(builder.bitcast(builder.gep(crow, [i64(32 * v)]), v16i16.as_pointer()), align=1)
                            src = {0: raw}
                            h = [builder.load(a) for a in hacc[v]]
                            for k, (shift, mask, ai) in enumerate(planes):
                                if shift not in src:
                                    src[shift] = builder.lshr(raw, _ir.Constant(v16i16, [shift] * 16))
                                code = builder.and_(builder.bitcast(src[shift], v32i8), _ir.Constant(v32i8, [mask] * 32))
                                h[ai] = builder.add(h[ai], builder.call(ubsw, [code, xk[k]]))
                            for a, hv in zip(hacc[v], h):
                                builder.store(hv, a)
                    for v in range(RB):                    # widen: adjacent i16 lanes are one row
                        t = builder.load(iacc[v])
                        for a, wgt in zip(hacc[v], widen):
                            t = builder.add(t, builder.call(wd, [builder.load(a), _ir.Constant(v16i16, [wgt] * 16)]))
                        builder.store(t, iacc[v])
                abg = builder.gep(aba.data, [builder.mul(g, i64(3))])
                xsg, eg, xsumg = [splat(builder.load(builder.gep(abg, [i64(j)])), v8f) for j in range(3)]
                goff = builder.mul(g, i64(L))
                for v in range(RB):                        # facc += sc * (dot * xs + e) + zc * sum(x)
                    off = builder.add(goff, i64(8 * v))
                    sc, zc = [builder.fpext(builder.load(builder.bitcast(builder.gep(b, [off]), v8h.as_pointer()), align=2), v8f)
                              for b in (sbase, zbase)]
                    f = builder.call(fma, [builder.sitofp(builder.load(iacc[v]), v8f), xsg, eg])
                    f = builder.call(fma, [sc, f, builder.load(facc[v])])
                    builder.store(builder.call(fma, [zc, xsumg, f]), facc[v])
            ybase = builder.gep(ya.data, [builder.mul(blk, i64(L))])
            for v in range(RB):
                builder.store(builder.load(facc[v]), builder.bitcast(builder.gep(ybase, [i64(8 * v)]), v8f.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return block


_block2 = _make_block_kernel(2)
_block4 = _make_block_kernel(4)


# --- njit drivers -----------------------------------------------------------------------------------
@_njit(cache=True, fastmath=True)
def _group_stats(xg):
    """(max|xg|, sum(xg) in float64): the max is exact in any order, the float64 sum to ~1e-16."""
    mx = np.float32(0.0)
    s = 0.0
    for i in range(xg.shape[0]):
        mx = max(mx, abs(xg[i]))
        s += np.float64(xg[i])
    return mx, s


@_njit(cache=True)      # no fastmath: the int8 rounding must match quantize_x bit for bit
def _prepare_x(x, bits, G, X, ab):
    """X (C,) int8 = xq; ab[g] = (xs_g (/ 4 at 2 bits: see _PLANES), e_g, sum(x_g)) (module docstring)."""
    gs = x.shape[0] // G
    for g in range(G):
        xg, qg = x[g * gs:(g + 1) * gs], X[g * gs:(g + 1) * gs]
        mx, s = _group_stats(xg)
        xs = mx / np.float32(127.0)
        inv = np.float32(127.0) / mx if mx > 0 else np.float32(0.0)
        sq = 0
        for i in range(gs):
            v = np.int32(np.rint(xg[i] * inv))
            qg[i] = v
            sq += v
        ab[g, 0] = xs * np.float32(0.25 if bits == 2 else 1.0)
        ab[g, 1] = np.float32(((1 << bits) - 1) * 0.5 * (s - np.float64(xs) * sq))
        ab[g, 2] = np.float32(s)


@_njit(cache=True)
def _i16_run(bits, cpg):
    """Largest m dividing the chunks per group with m chunks safe in i16 (see Overflow)."""
    m = min(cpg, 5 if bits == 2 else 4)
    while cpg % m:
        m -= 1
    return m


@_njit(cache=True)
def _blocks(P, S, Z, X, ab, bits, y, b0, b1, m):
    if bits == 2:
        for b in range(b0, b1):
            _block2(P, S, Z, X, ab, y, np.int64(b), m)
    else:
        for b in range(b0, b1):
            _block4(P, S, Z, X, ab, y, np.int64(b), m)


@_njit(cache=True, parallel=True)
def _blocks_parallel(P, S, Z, X, ab, bits, y, m, nchunk):
    nblk = P.shape[0]
    for t in _prange(nchunk):
        _blocks(P, S, Z, X, ab, bits, y, t * nblk // nchunk, (t + 1) * nblk // nchunk, m)


@_njit(cache=True)
def scores_i8(P, S, Z, x, bits, y, nchunk):
    """njit-callable core: y (nblk*L,) float32 = W_hat @ x for the layout arrays (P, S, Z) of
    `simd_layout` (rows >= R are padding), x (C,) float32 C-contiguous, bits 2 or 4 (int64),
    nchunk > 1 splits the row blocks over threads (prange). Returns nothing."""
    G = S.shape[1]
    X = np.empty(x.shape[0], np.int8)
    ab = np.empty((G, 3), np.float32)
    _prepare_x(x, bits, G, X, ab)
    m = np.int64(_i16_run(bits, P.shape[1] // G))
    if nchunk > 1:
        _blocks_parallel(P, S, Z, X, ab, bits, y, m, nchunk)
    else:
        _blocks(P, S, Z, X, ab, bits, y, 0, P.shape[0], m)


@_njit(cache=True)
def select_i8(P, S, Z, x, bits, thr, idx, nchunk):
    """njit-callable: writes the sorted rows r < idx.shape[0] with score >= thr (float32) into idx
    (int32, length R) and returns their count."""
    y = np.empty(P.shape[0] * L, np.float32)
    scores_i8(P, S, Z, x, bits, y, nchunk)
    return _threshold_select(y, thr, idx)


# --- Python API -----------------------------------------------------------------------------------
def simd_layout(qm):
    """(P, S, Z) of the module docstring (numpy only), built on first use and cached on qm."""
    lay = qm.__dict__.get("_simd_layout")
    if lay is not None and lay[0] is qm.packed and lay[1] is qm.scale and lay[2] is qm.zero:
        return lay[3:]
    if not supports(qm):
        raise ValueError(f"numba_simd does not support {qm.bits}-bit group {qm.group_size} {qm.shape}")
    (R, C), G, bits = qm.shape, qm.n_groups, qm.bits
    per, Rp = 8 // bits, -(-R // L) * L
    nchunk = C // (4 * per)
    q = np.zeros((Rp, C), np.uint8)
    q[:R] = qm.codes()
    q = q.reshape(Rp, nchunk, per, 4).astype(np.uint8)             # [r, c, k, j]
    byte = np.zeros((Rp, nchunk, 4), np.uint8)
    for k in range(per):
        byte |= q[:, :, k, :] << np.uint8(k * bits)
    P = np.ascontiguousarray(byte.reshape(Rp // L, L, nchunk, 4).transpose(0, 2, 1, 3)).reshape(Rp // L, nchunk, 4 * L)
    SZ = []
    for a in (qm.scale, qm.zero):            # padding rows: scale 0, zero 0 -> score 0
        t = np.zeros((Rp, G), np.float16)
        t[:R] = a
        SZ.append(np.ascontiguousarray(t.reshape(Rp // L, L, G).transpose(0, 2, 1)).view(np.uint16))
    qm.__dict__["_simd_layout"] = (qm.packed, qm.scale, qm.zero, P, SZ[0], SZ[1])
    return P, SZ[0], SZ[1]


def _x1d(x):
    if not available():        # never let LLVM see the AVX2 intrinsics on another machine
        raise RuntimeError("numba_simd needs x86-64 with AVX2: use numba_cpu.quant_matvec")
    if type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 1 and x.flags.c_contiguous:
        return x
    return np.ascontiguousarray(x, np.float32).reshape(-1)


def quant_matvec_i8(qm, x: np.ndarray, out: np.ndarray | None = None, nchunk: int = 1) -> np.ndarray:
    """W_hat @ x (R,) float32 with x rounded to int8 per group (see module docstring); nchunk > 1
    spreads the row blocks over numba threads (e.g. numba_cpu._qm_parallel(qm))."""
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
def quantize_x(x: np.ndarray, G: int, bits: int):
    """(xq (G, gs) int64, xs (G,) float32, e (G,) float64, xsum (G,) float32) as the kernels compute
    them (e: see _prepare_x)."""
    xg = np.asarray(x, np.float32).reshape(G, -1)
    mx = np.abs(xg).max(axis=1)
    xs = (mx / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(mx > 0, np.float32(127.0) / mx, np.float32(0.0)).astype(np.float32)
    xq = np.clip(np.rint(xg * inv[:, None]), -127, 127).astype(np.int64)
    s = xg.astype(np.float64).sum(axis=1)
    e = (((1 << bits) - 1) * 0.5 * (s - xs.astype(np.float64) * xq.sum(1))).astype(np.float32)
    return xq, xs, e.astype(np.float64), s.astype(np.float32)


def reference_scores(qm, x: np.ndarray) -> np.ndarray:
    """The kernels' math in numpy, integer dot products exact, float64 epilogue: (R,) float32
    score[r] = sum_g scale[r, g] * (xs_g * (codes . xq)_g + e_g) + zero[r, g] * sum(x_g)."""
    R, C = qm.shape
    G = qm.n_groups
    xq, xs, e, xsum = quantize_x(x, G, qm.bits)
    dot = np.einsum("rgs,gs->rg", qm.codes().astype(np.int64).reshape(R, G, C // G), xq)
    f = dot * xs.astype(np.float64) + e
    y = (qm.scale.astype(np.float64) * f).sum(1) + qm.zero.astype(np.float64) @ xsum.astype(np.float64)
    return y.astype(np.float32)


def error_bound(qm, x: np.ndarray) -> np.ndarray:
    """Per-row bound on |int8 score - exact float score| from the activation rounding alone (float
    rounding aside): sum_g scale[r, g] * xs_g / 2 * sum_c |code[r, c] - mid|."""
    R, C = qm.shape
    G = qm.n_groups
    xs = quantize_x(x, G, qm.bits)[1]
    dev = np.abs(qm.codes().astype(np.float64) - ((1 << qm.bits) - 1) / 2).reshape(R, G, C // G).sum(2)
    return (qm.scale.astype(np.float64) * dev * xs / 2).sum(1)
