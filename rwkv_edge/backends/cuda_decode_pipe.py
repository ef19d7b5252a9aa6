"""`ffn_pipe`: the whole exact-sparse FFN of one layer in persistent programs that loop over row tiles
with a one-tile software pipeline (cuda_decode.py, tune pipe_bn > 0; off by default: it measured
slower, see below).

Why it was tried: in the one-tile-per-program key kernel (cuda_decode_kernels.ffn_key, VALUE) the
value rows of a tile can only be loaded once its keys are known, so every program spends one
dependent HBM round trip with few bytes in flight (~13% of its rows). Here a program owns tiles
pid, pid + P, pid + 2P, ... (P = the grid) and in each iteration computes the keys of tile t (its
W_k rows arrived during the previous iteration), issues the W_k rows of tile t + P (independent of
x), then the active rows of W_v^T(t), so the dependent round trip overlaps the next tile's stream.
With DEFER the value rows of tile t are summed one iteration later (their wait overlaps the next
keys too). The value partials of all of a program's tiles are summed in registers and added to x
once per program ((D,) float32 atomics: P adds per element instead of one per tile).

Measured (H200, tools/gpu_decode_sweep.py, sets gpu_decode_sets4/5.txt, captured decode tok/s against
the default kernel's exact row in the same process): 1.5B shapes 970-1075 against 1060-1069 (8 rows
per tile, 2 programs per SM, 4 warps: 1075 / 1069, within noise; everything else slower); 58M
shapes 3056-4396 against 5239 (one or two tiles per program: the loop and its tails cost more than
they hide). A predicted-mode version (codes of the next tile loaded one iteration ahead, the
selected W_k rows of tile t in flight while the W_v^T rows of tile t - 1 load) ran at 50-728 tok/s
at 1.5B (255 registers, spills, at 16-row tiles) and, with two or more tiles per program, selected
slightly different rows on the GPU than the reference (correct under TRITON_INTERPRET); it was
removed.

Shapes: W_k (F, D) and W_v^T (F, D) row-major in the storage dtype; x, k, xo float32; BK = D (a
power of two, whole-width tiles); BN rows per tile, NT = ceil(F / BN) tiles, npg programs.
"""
from __future__ import annotations

_K: dict = {}


def kernels():
    if _K:
        return _K
    import triton
    import triton.language as tl

    from . import cuda_decode_kernels as KD

    KD.kernels()                        # defines the shared jit helpers in that module's globals
    globals().update(_sync=KD._sync, _ln_mix=KD._ln_mix)

    @triton.jit
    def ffn_pipe(w_p, x_p, k_p, F, D, vt_p, xo_p, cnt_p, NT, npg,
                 xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p,
                 BN: tl.constexpr, BK: tl.constexpr, MIXIN: tl.constexpr,
                 PDL: tl.constexpr, EVW: tl.constexpr, EVV: tl.constexpr, DEFER: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.arange(0, BN)
        ks = tl.arange(0, BK)
        km = ks < D
        acc = tl.zeros((BK,), dtype=tl.float32)
        na = pid * 0
        pvv = tl.zeros((BN, BK), dtype=vt_p.dtype.element_ty)     # DEFER: the last tile's W_v^T rows, keys
        py = tl.zeros((BN,), dtype=tl.float32)
        rows = pid * BN + r
        rm = rows < F
        wk = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0,
                     eviction_policy=EVW)                             # tile pid's W_k rows: weights, early
        _sync(PDL)
        if MIXIN:
            xv = _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, pid == 0)
        else:
            xv = tl.load(x_p + ks, mask=km, other=0.0)
        for t in range(pid, NT, npg):
            y = tl.maximum(tl.sum(wk.to(tl.float32) * xv[None, :], axis=1), 0.0)
            y = y * y
            tl.store(k_p + rows, y, mask=rm)
            nrows = rows + npg * BN                                   # next tile's W_k, now
            nrm = nrows < F
            wk = tl.load(w_p + nrows[:, None] * D + ks[None, :], mask=nrm[:, None] & km[None, :], other=0.0,
                         eviction_policy=EVW)
            act = rm & (y > 0)
            na += tl.sum(act.to(tl.int32), axis=0)
            vv = tl.load(vt_p + rows[:, None] * D + ks[None, :], mask=act[:, None] & km[None, :], other=0.0,
                         eviction_policy=EVV)
            if DEFER:   # summed one iteration later: this wait overlaps the next keys
                acc += tl.sum(pvv.to(tl.float32) * py[:, None], axis=0)
                pvv, py = vv, y
            else:
                acc += tl.sum(vv.to(tl.float32) * y[:, None], axis=0)
            rows, rm = nrows, nrm
        if DEFER:
            acc += tl.sum(pvv.to(tl.float32) * py[:, None], axis=0)
        if na > 0:
            tl.atomic_add(xo_p + ks, acc, mask=km, sem="relaxed")
        tl.atomic_add(cnt_p + 1, na, sem="relaxed")

    _K.update(ffn_pipe=ffn_pipe)
    return _K
