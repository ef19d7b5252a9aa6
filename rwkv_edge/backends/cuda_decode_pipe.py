"""`ffn_pipe`: the whole sparse FFN of one layer (exact or predicted) in persistent programs that loop
over row tiles with a one-tile software pipeline (cuda_decode.py, tune pipe_bn > 0; off by default).

Why: in the one-tile-per-program key kernel (cuda_decode_kernels.ffn_key, VALUE) the value rows of a
tile can only be loaded once its keys are known, so every program spends one dependent HBM round trip
with few bytes in flight (13% of 16 rows), and in the predicted mode a second one (codes -> scores ->
the selected W_k rows -> keys -> W_v^T rows). Here a program owns tiles pid, pid + P, pid + 2P, ...
(P = the grid) and, in iteration j, issues the loads of tile j+1's first stage before it waits on
tile j's dependent loads, so that some stream is always in flight:
  exact      loads W_k(t+1) (all rows, independent of x), then keys(t) (W_k(t) arrived during the
             last iteration), then the active rows of W_v^T(t) (the dependent round trip, overlapped
             with W_k(t+1)).
  predicted  codes/scales/zeros(t+1) are loaded one iteration ahead; iteration j scores tile j and
             issues its selected W_k rows, then computes the keys of tile j-1 (its W_k rows were
             issued one iteration ago) and loads their active W_v^T rows, so the W_k round trip of
             tile j overlaps the W_v^T round trip of tile j-1 (one extra iteration drains the last).
The value partials of all of a program's tiles are summed in registers and added to x once per
program ((D,) float32 atomics: P adds per element instead of one per tile). Keys go to k (-1: not
predicted), counts to cnt (rows read, rows active) as ffn_key does.

Shapes: W_k (F, D) and W_v^T (F, D) row-major in the storage dtype; x, k, xo float32; BK = D (a
power of two, whole-width tiles); predicted: q (F, D / PER) uint8 codes, scales/zeros (F, G) with G a
power of two (the ONESHOT layout of ffn_key); BN rows per tile, NT = ceil(F / BN) tiles.
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
    globals().update(_sync=KD._sync, _ln_mix=KD._ln_mix, _codes=KD._codes)

    @triton.jit
    def _scores(byt, scale, zero, x2, xg, BN: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr,
                GC: tl.constexpr, NB: tl.constexpr):
        """n-bit predictor scores of a (BN,) row tile: byt (BN, GC*NB) packed codes, scale/zero
        (BN, GC), x2 (GC*NB, PER) = x reshaped (x2[c, s] = x[c*PER + s]), xg (GC,) group sums of x.
        2-D tiles only (as ffn_sparse): a (BN, GC*NB, PER) float32 temporary spilled registers."""
        qx = tl.zeros((BN, GC * NB), dtype=tl.float32)
        for s in tl.static_range(PER):
            code = ((byt >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            xq = tl.sum(tl.where(tl.arange(0, PER)[None, :] == s, x2, 0.0), axis=1)            # (GC*NB,)
            qx += code * xq[None, :]
        qg = tl.sum(tl.reshape(qx, (BN, GC, NB)), axis=2)                                     # (BN, GC)
        return tl.sum(scale * qg + zero * xg[None, :], axis=1)

    globals()["_scores"] = _scores

    @triton.jit
    def ffn_pipe(w_p, x_p, k_p, q_p, qs_p, qz_p, thr, F, D, vt_p, xo_p, cnt_p, NT, npg,
                 xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p,
                 BN: tl.constexpr, BK: tl.constexpr, PRED: tl.constexpr, BITS: tl.constexpr,
                 PER: tl.constexpr, NB: tl.constexpr, GC: tl.constexpr, MIXIN: tl.constexpr,
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
        if PRED:
            byt, scale, zero = _codes(q_p, qs_p, qz_p, rows, rm, GC, NB)     # tile pid's codes (weights)
        else:
            wk = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0,
                         eviction_policy=EVW)
        _sync(PDL)
        if MIXIN:
            xv = _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, pid == 0)
        else:
            xv = tl.load(x_p + ks, mask=km, other=0.0)
        if PRED:
            x2 = tl.reshape(xv, (GC * NB, PER))
            xg = tl.sum(tl.reshape(xv, (GC, NB * PER)), axis=1)
            ns = pid * 0
            # stage B state: the previous tile's rows, selection and (in flight) W_k rows
            prow = rows
            psel = rows < 0
            pwk = tl.zeros((BN, BK), dtype=w_p.dtype.element_ty)
            for t in range(pid, NT + npg, npg):      # one extra iteration drains the last tile
                sel = rm & (_scores(byt, scale, zero, x2, xg, BN, BITS, PER, GC, NB) >= thr)
                tl.store(k_p + rows, tl.full((BN,), -1.0, tl.float32), mask=rm & ~sel)   # -1: not predicted
                ns += tl.sum(sel.to(tl.int32), axis=0)
                wk = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=sel[:, None] & km[None, :], other=0.0,
                             eviction_policy=EVW)
                nrows = rows + npg * BN                                   # next tile's codes, early
                nrm = nrows < F
                byt, scale, zero = _codes(q_p, qs_p, qz_p, nrows, nrm, GC, NB)
                # stage B: keys of the previous tile, then its active W_v^T rows
                y = tl.maximum(tl.sum(pwk.to(tl.float32) * xv[None, :], axis=1), 0.0)
                y = y * y
                tl.store(k_p + prow, y, mask=psel)
                act = psel & (y > 0)
                na += tl.sum(act.to(tl.int32), axis=0)
                vv = tl.load(vt_p + prow[:, None] * D + ks[None, :], mask=act[:, None] & km[None, :], other=0.0,
                             eviction_policy=EVV)
                if DEFER:   # summed one iteration later: this wait overlaps the next round trips
                    acc += tl.sum(pvv.to(tl.float32) * py[:, None], axis=0)
                    pvv, py = vv, y
                else:
                    acc += tl.sum(vv.to(tl.float32) * y[:, None], axis=0)
                prow, psel, pwk = rows, sel, wk
                rows, rm = nrows, nrm
            tl.atomic_add(cnt_p, ns, sem="relaxed")
        else:
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
                if DEFER:
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
