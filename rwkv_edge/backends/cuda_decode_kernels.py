"""Triton kernels of the fused RWKV-7 one-token decode step (cuda_decode.py): seven launches per
layer, no host synchronisation, so the whole step captures as one CUDA graph.

Shapes (D = n_embd = H*N, F = FFN width, all activations float32, weights in any float dtype):
  mix        one program: [x = ln0(emb[tok])]; xl = LN(x);
             prev <- xl; out[m] = xl + (prev_old - xl) * mix[m] for NMIX mix vectors (NMIX 0: out = xl);
             PBITS > 0 (the predicted FFN input): also perm_x's permuted copy for the word-wise scores
  gemv       y[n] = act(W[n, :] . x_seg(n)) (+ base[n]); W (N, K) row-major, the input row of a
             block of rows chosen by a segment table (r/k/v and the LoRA first stages in one launch;
             the dense FFN value W_v (D, F) with base = x, the residual add)
  att_head   one program per head: LoRA second stages, decay/a/g/value-residual, kk normalise,
             the wkv state update (N x N in registers), group norm, bonus, times g
  ffn_key    k[j] = relu(W_k[j] . xk)^2 on the rows a fused n-bit predictor selects
             (score = zero.sum(x) + scale.(q x) per group >= threshold; k = -1 on the others;
             the scores' jit helpers are in cuda_decode_score.py)
             or on all rows; with COMPACT the active rows (k > 0) are appended to an index list
             of capacity F (slot from one atomic add per program: nothing can overflow or be dropped);
             with VALUE the program also adds sum_{its active j} k[j] Vt[j, :] into x (atomic adds
             of (D,) partials): one launch for the whole sparse FFN, no list
  ffn_value  sparse modes: x[d] += sum_{j in the index list} k[j] Vt[j, d], Vt = W_v^T (F, D); only
             listed rows are loaded (zero activations' bytes never leave memory); each program adds
             its (BD,) partial atomically (the float32 sum order varies between runs, ~1e-7 relative)

Programmatic dependent launch (PDL, Hopper+): with PDL every kernel first issues the loads of its
weights (never written by any kernel), then `gdc_launch_dependents` (the next kernel may be
scheduled now) and `gdc_wait` (returns when the previous kernel has finished and its stores are
visible); activations are read and everything is stored only after the wait. So the next kernel's
weight reads overlap this kernel's tail and the latency-bound single-program kernels, and the
ordering is the same as without PDL (each kernel waits for its predecessor, hence for all earlier).
"""
from __future__ import annotations

_K: dict = {}


def kernels():
    """The compiled-on-first-use jit functions (Triton must be importable)."""
    if _K:
        return _K
    import triton
    import triton.language as tl

    @triton.jit
    def _sync(PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _wait_first(PDL: tl.constexpr):
        """The wait before the trigger: a dependent launch starts only after this kernel's predecessor
        (hence every earlier kernel) has completed (early scores: cuda_decode_early.py)."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

    # the kernels call these by their global names (Triton resolves called jit functions there)
    globals().update(_sync=_sync, _wait_first=_wait_first)
    from .cuda_decode_score import helpers
    globals().update(helpers(_sync))    # predictor scores (cuda_decode_score.py)

    @triton.jit
    def mix(x_p, emb_p, tok_p, ln0w_p, ln0b_p, lnw_p, lnb_p, prev_p, mix_p, out_p, D, eps, cps_p, cpd_p, xp_p,
            ez_p, ezp_p, ezv_p, eq_p,
            BD: tl.constexpr, EMB: tl.constexpr, NMIX: tl.constexpr, BM: tl.constexpr, PDL: tl.constexpr,
            COPY: tl.constexpr, PBITS: tl.constexpr, PGS: tl.constexpr, WFIRST: tl.constexpr, EZ: tl.constexpr,
            QGS: tl.constexpr):
        # EZ (early bundle, cuda_decode_early.py): also z = xl * d + c + mix * ezv (ezp_p = [d; c; mix] (3, D),
        # ezv_p the FFN token-shift state, complete after the wait) to ez_p, the vector the early scores read;
        # QGS > 0 (tune early_dp4a, D = BD): that vector (z, else xl) also as quant_x's int8 copy to eq_p
        d = tl.arange(0, BD)
        dm = d < D
        m = tl.arange(0, BM)
        mm = (m < NMIX)[:, None] & dm[None, :]
        lw = tl.load(lnw_p + d, mask=dm, other=0.0)
        lb = tl.load(lnb_p + d, mask=dm, other=0.0)
        mv = tl.load(mix_p + m[:, None] * D + d[None, :], mask=mm, other=0.0)     # (BM, BD)
        if EMB:
            w0 = tl.load(ln0w_p + d, mask=dm, other=0.0)
            b0 = tl.load(ln0b_p + d, mask=dm, other=0.0)
        if EZ:
            ed = tl.load(ezp_p + d, mask=dm, other=0.0)
            ec = tl.load(ezp_p + D + d, mask=dm, other=0.0)
            em = tl.load(ezp_p + 2 * D + d, mask=dm, other=0.0)
        if WFIRST:
            _wait_first(PDL)
        else:
            _sync(PDL)
        if EZ:    # issued with the x load below (used last: its latency overlaps the LN)
            pv = tl.load(ezv_p + d, mask=dm, other=0.0)
        if COPY:  # the FFN token-shift state the fused FFN mix of the last layer left in scratch
            tl.store(cpd_p + d, tl.load(cps_p + d, mask=dm), mask=dm)
        if EMB:   # x = ln0(emb[tok]): the block input of layer 0
            tok = tl.load(tok_p)
            e = tl.load(emb_p + tok * D + d, mask=dm, other=0.0).to(tl.float32)
            mu = tl.sum(e, axis=0) / D
            c = tl.where(dm, e - mu, 0.0)
            x = c / tl.sqrt(tl.sum(c * c, axis=0) / D + eps) * w0 + b0
            tl.store(x_p + d, x, mask=dm)
        else:
            x = tl.load(x_p + d, mask=dm, other=0.0)
        mu = tl.sum(tl.where(dm, x, 0.0), axis=0) / D
        c = tl.where(dm, x - mu, 0.0)
        xl = c / tl.sqrt(tl.sum(c * c, axis=0) / D + eps) * lw + lb
        sv = xl           # the vector the early scores read: xl, or z for an early bundle
        if EZ:
            sv = xl * ed + ec + em * pv
            tl.store(ez_p + d, sv, mask=dm)
        if QGS > 0:
            quant_x(sv, eq_p, BD, QGS)
        if NMIX == 0:
            tl.store(out_p + d, xl, mask=dm)
        else:
            xx = tl.load(prev_p + d, mask=dm) - xl
            tl.store(prev_p + d, xl, mask=dm)
            o = xl[None, :] + xx[None, :] * mv
            tl.store(out_p + m[:, None] * D + d[None, :], o, mask=mm)
            if PBITS > 0:   # predicted FFN input (NMIX 1, D = BD): the word-wise scores' copy of it
                perm_x(tl.sum(o, axis=0), d, xp_p, BD, PBITS, PGS)

    @triton.jit
    def _gemv_tile(pid, w_p, x_p, y_p, base_p, segend_p, segx_p, N, K, y2_p,
                   BN: tl.constexpr, BK: tl.constexpr, NSEG: tl.constexpr, ACT: tl.constexpr, ADD: tl.constexpr,
                   FULL: tl.constexpr, PDL: tl.constexpr, DUAL: tl.constexpr, EVW: tl.constexpr):
        """Rows pid*BN.. of the GEMV (the `gemv` kernel's program pid)."""
        rows = pid * BN + tl.arange(0, BN)
        rm = rows < N
        if NSEG > 1:   # which input row feeds this block of rows (BN divides every segment)
            ends = tl.load(segend_p + tl.arange(0, NSEG))
            seg = tl.sum((pid * BN >= ends).to(tl.int32), axis=0)
            xo = tl.load(segx_p + seg) * K
        else:
            xo = 0
        if FULL:   # the whole (BN, K) tile in one load, issued before waiting for the input
            ks = tl.arange(0, BK)
            km = ks < K
            wv = tl.load(w_p + rows[:, None] * K + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0,
                         eviction_policy=EVW)
            _sync(PDL)
            xv = tl.load(x_p + xo + ks, mask=km, other=0.0)
            y = tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
        else:
            _sync(PDL)
            acc = tl.zeros((BN, BK), dtype=tl.float32)
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                km = ks < K
                xv = tl.load(x_p + xo + ks, mask=km, other=0.0)
                wv = tl.load(w_p + rows[:, None] * K + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
                acc += wv.to(tl.float32) * xv[None, :]
            y = tl.sum(acc, axis=1)
        if ACT == 1:
            y = tl.maximum(y, 0.0)
            y = y * y
        if ADD:
            y += tl.load(base_p + rows, mask=rm, other=0.0)
        tl.store(y_p + rows, y, mask=rm)
        if DUAL:   # the same rows again (att_o: the FFN's LN input and the base its atomics add to)
            tl.store(y2_p + rows, y, mask=rm)

    @triton.jit
    def gemv(w_p, x_p, y_p, base_p, segend_p, segx_p, N, K, y2_p,
             BN: tl.constexpr, BK: tl.constexpr, NSEG: tl.constexpr, ACT: tl.constexpr, ADD: tl.constexpr,
             FULL: tl.constexpr, PDL: tl.constexpr, DUAL: tl.constexpr, EVW: tl.constexpr):
        _gemv_tile(tl.program_id(0), w_p, x_p, y_p, base_p, segend_p, segx_p, N, K, y2_p,
                   BN, BK, NSEG, ACT, ADD, FULL, PDL, DUAL, EVW)

    @triton.jit
    def _att_head(h, y1_p, D, LW, LA, LG, LV, w2_p, a2_p, g2_p, v2_p, w0_p, a0_p, v0_p, kk_p, ka_p, rk_p,
                  lnxw_p, lnxb_p, vfirst_p, s_p, out_p, slot_p, cps_p, cpd_p,
                  N: tl.constexpr, BLW: tl.constexpr, BLA: tl.constexpr, BLG: tl.constexpr, BLV: tl.constexpr,
                  FIRST: tl.constexpr, PDL: tl.constexpr, COPY: tl.constexpr, WFIRST: tl.constexpr):
        """Head h of the `att_head` kernel (WFIRST: wait, then trigger; see cuda_decode_early.py)."""
        n = tl.arange(0, N)
        col = h * N + n
        # weights, constants and this layer's wkv state (last written by the previous step) first
        lw = tl.arange(0, BLW)
        la = tl.arange(0, BLA)
        lg = tl.arange(0, BLG)
        w2 = tl.load(w2_p + lw[:, None] * D + col[None, :], mask=(lw < LW)[:, None], other=0.0)
        a2 = tl.load(a2_p + la[:, None] * D + col[None, :], mask=(la < LA)[:, None], other=0.0)
        g2 = tl.load(g2_p + lg[:, None] * D + col[None, :], mask=(lg < LG)[:, None], other=0.0)
        w0 = tl.load(w0_p + col)
        a0 = tl.load(a0_p + col)
        kkw = tl.load(kk_p + col)
        kaw = tl.load(ka_p + col)
        rkw = tl.load(rk_p + col)
        lnw = tl.load(lnxw_p + col)
        lnb = tl.load(lnxb_p + col)
        soff = h * N * N + n[:, None] * N + n[None, :]
        S = tl.load(s_p + soff)
        if not FIRST:
            lv = tl.arange(0, BLV)
            v2 = tl.load(v2_p + lv[:, None] * D + col[None, :], mask=(lv < LV)[:, None], other=0.0)
            v0 = tl.load(v0_p + col)
        if WFIRST:
            _wait_first(PDL)
        else:
            _sync(PDL)
        if COPY:  # ffn_x[i-1] <- the scratch the fused FFN mix of layer i-1 wrote (read by nobody now)
            tl.store(cpd_p + col, tl.load(cps_p + col))
        tl.store(slot_p + tl.arange(0, 2), tl.zeros((2,), dtype=tl.int32), mask=(tl.arange(0, 2) < 2) & (h == 0))
        r = tl.load(y1_p + col)
        k = tl.load(y1_p + D + col)
        v = tl.load(y1_p + 2 * D + col)
        o = 3 * D
        hw = 2.0 * tl.sigmoid(2.0 * tl.load(y1_p + o + lw, mask=lw < LW, other=0.0)) - 1.0   # tanh
        wl = tl.sum(w2.to(tl.float32) * hw[:, None], axis=0)
        o += LW
        ha = tl.load(y1_p + o + la, mask=la < LA, other=0.0)
        al = tl.sum(a2.to(tl.float32) * ha[:, None], axis=0)
        o += LA
        hg = tl.sigmoid(tl.load(y1_p + o + lg, mask=lg < LG, other=0.0))
        g = tl.sum(g2.to(tl.float32) * hg[:, None], axis=0)
        o += LG
        w = tl.exp(-0.606531 * tl.sigmoid(w0 + wl))
        a = tl.sigmoid(a0 + al)
        kk = k * kkw
        kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=0)), 1e-12)
        k = k * (1.0 + (a - 1.0) * kaw)
        if FIRST:
            tl.store(vfirst_p + col, v)
        else:
            hv = tl.load(y1_p + o + lv, mask=lv < LV, other=0.0)
            vl = tl.sum(v2.to(tl.float32) * hv[:, None], axis=0)
            v = v + (tl.load(vfirst_p + col) - v) * tl.sigmoid(v0 + vl)
        # wkv: S[i, j] (value i, key j); S = S*w_j + (S @ -kk)_i (kk*a)_j + v_i k_j ; y_i = (S @ r)_i
        sa = tl.sum(S * (-kk)[None, :], axis=1)
        S = S * w[None, :] + sa[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
        tl.store(s_p + soff, S)
        y = tl.sum(S * r[None, :], axis=1)
        mu = tl.sum(y, axis=0) / N
        c = y - mu
        y = c / tl.sqrt(tl.sum(c * c, axis=0) / N + 64e-5) * lnw + lnb
        y = y + tl.sum(r * k * rkw, axis=0) * v
        tl.store(out_p + col, y * g)

    @triton.jit
    def att_head(y1_p, D, LW, LA, LG, LV, w2_p, a2_p, g2_p, v2_p, w0_p, a0_p, v0_p, kk_p, ka_p, rk_p,
                 lnxw_p, lnxb_p, vfirst_p, s_p, out_p, slot_p, cps_p, cpd_p,
                 N: tl.constexpr, BLW: tl.constexpr, BLA: tl.constexpr, BLG: tl.constexpr, BLV: tl.constexpr,
                 FIRST: tl.constexpr, PDL: tl.constexpr, COPY: tl.constexpr, WFIRST: tl.constexpr):
        _att_head(tl.program_id(0), y1_p, D, LW, LA, LG, LV, w2_p, a2_p, g2_p, v2_p, w0_p, a0_p, v0_p, kk_p, ka_p,
                  rk_p, lnxw_p, lnxb_p, vfirst_p, s_p, out_p, slot_p, cps_p, cpd_p,
                  N, BLW, BLA, BLG, BLV, FIRST, PDL, COPY, WFIRST)

    globals().update(_gemv_tile=_gemv_tile, _att_head=_att_head)

    @triton.jit
    def _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, WRITE):
        """The FFN input of one layer, as the mix kernel computes it (NMIX 1), in every program:
        xl = LN(xb); xk = xl + (prev - xl) * mix; xl goes to new_p (program 0 only; the state row is
        copied from there by a later launch, since other programs still read prev). (BK,) float32."""
        x = tl.load(xb_p + ks, mask=km, other=0.0)
        prev = tl.load(prev_p + ks, mask=km, other=0.0)
        m = tl.load(mix_p + ks, mask=km, other=0.0)
        lw = tl.load(lnw_p + ks, mask=km, other=0.0)
        lb = tl.load(lnb_p + ks, mask=km, other=0.0)
        mu = tl.sum(x, axis=0) / D
        c = tl.where(km, x - mu, 0.0)
        xl = c / tl.sqrt(tl.sum(c * c, axis=0) / D + 1e-5) * lw + lb
        tl.store(new_p + ks, xl, mask=km & WRITE)
        return xl + (prev - xl) * m

    globals()["_ln_mix"] = _ln_mix

    @triton.jit
    def ffn_key(w_p, x_p, k_p, idx_p, q_p, qs_p, qz_p, thr, slot_p, F, D, G, vt_p, xo_p, cnt_p,
                xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p,
                BN: tl.constexpr, BK: tl.constexpr, PRED: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                PER: tl.constexpr, NB: tl.constexpr, ONESHOT: tl.constexpr, GC: tl.constexpr,
                FULL: tl.constexpr, COMPACT: tl.constexpr, PDL: tl.constexpr, VALUE: tl.constexpr,
                BVD: tl.constexpr, MIXIN: tl.constexpr, DIAG: tl.constexpr, COUNT: tl.constexpr,
                VSEL: tl.constexpr, EVW: tl.constexpr, EVV: tl.constexpr, xp_p, WORDS: tl.constexpr,
                WPG: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rm = rows < F
        ks = tl.arange(0, BK)
        km = ks < D
        if PRED:   # n-bit W_k predictor: score_j = sum_g zero_jg sum(x_g) + scale_jg (q_jg . x_g)
            # PER = 8 // BITS codes per byte, NB = GS // PER bytes per group and row
            if WORDS:    # int32 words (q_p viewed so) against the mix launch's permuted x (cuda_decode_score)
                wd, scale, zero = _words(q_p, qs_p, qz_p, rows, rm, GC, WPG)
                _sync(PDL)
                sc = _score_words(xp_p, wd, scale, zero, GC, WPG, BITS)
            elif ONESHOT:  # the row tile's codes in one load (GC = G groups, D // PER and G powers of two)
                byt, scale, zero = _codes(q_p, qs_p, qz_p, rows, rm, GC, NB)
                _sync(PDL)
                sc = _score_bytes(x_p, x_p, byt, scale, zero, BN, GC, NB, PER, BITS, False)
            else:
                sc = _score(x_p, q_p, qs_p, qz_p, rows, rm, D, G, BN, BITS, GS, PER, NB, PDL)
            sel = rm & (sc >= thr)
            if DIAG == 3:   # timing only: no W_k and no W_v^T rows at all (the scores stay)
                sel = sel & (rows < 0)
            # only the selected rows of W_k are read (after the scores: no prefetch here)
            if FULL:
                xv = tl.load(x_p + ks, mask=km, other=0.0)
                wv = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=sel[:, None] & km[None, :], other=0.0)
                if VSEL:   # the selected rows of W_v^T in the same round trip (more bytes, one trip less)
                    vs = tl.load(vt_p + rows[:, None] * D + ks[None, :], mask=sel[:, None] & km[None, :], other=0.0,
                                 eviction_policy=EVV)
                y = tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
        else:
            sel = rm
            if FULL:
                wm = rm[:, None] & km[None, :]
                if DIAG == 3:   # timing only: no W_k rows (keys 0, so no W_v^T rows either)
                    wm = wm & (rows < 0)[:, None]
                wv = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=wm, other=0.0, eviction_policy=EVW)
                _sync(PDL)
                if MIXIN:   # LN2 + token shift of the residual here (no mix launch; dense mode only)
                    xv = _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, pid == 0)
                else:
                    xv = tl.load(x_p + ks, mask=km, other=0.0)
                y = tl.sum(wv.to(tl.float32) * xv[None, :], axis=1)
            else:
                _sync(PDL)
        if not FULL:
            acc = tl.zeros((BN, BK), dtype=tl.float32)
            for k0 in range(0, D, BK):
                kc = k0 + ks
                kcm = kc < D
                xv = tl.load(x_p + kc, mask=kcm, other=0.0)
                wv = tl.load(w_p + rows[:, None] * D + kc[None, :], mask=sel[:, None] & kcm[None, :], other=0.0)
                acc += wv.to(tl.float32) * xv[None, :]
            y = tl.sum(acc, axis=1)
        y = tl.maximum(y, 0.0)
        y = tl.where(sel, y * y, -1.0)                                   # -1: not predicted
        tl.store(k_p + rows, y, mask=rm)
        if VALUE:     # the value rows of this program's active neurons, right here (no second launch)
            act = y > 0
            na = tl.sum(act.to(tl.int32), axis=0)
            if VSEL:
                yv = tl.maximum(y, 0.0)                                     # k, with -1 -> 0
                tl.atomic_add(xo_p + ks, tl.sum(vs.to(tl.float32) * yv[:, None], axis=0), mask=km & (na > 0),
                              sem="relaxed")
            elif (na > 0) & (DIAG != 1):   # DIAG (timing only, wrong results): 1 no value rows, 2 no atomics
                # (3 no W_k rows either, 4 no FFN launch, 5 no running totals)
                for c0 in range(0, D, BVD):
                    cols = c0 + tl.arange(0, BVD)
                    cm = cols < D
                    vv = tl.load(vt_p + rows[:, None] * D + cols[None, :], mask=act[:, None] & cm[None, :], other=0.0,
                                 eviction_policy=EVV)
                    part = tl.sum(vv.to(tl.float32) * y[:, None], axis=0)
                    if DIAG == 2:
                        tl.store(xo_p + cols, part, mask=cm & (part != part))
                    else:
                        tl.atomic_add(xo_p + cols, part, mask=cm, sem="relaxed")
            if DIAG != 5:   # DIAG 5 (timing only): no running totals (two same-address atomics a program)
                tl.atomic_add(cnt_p + 1, na, sem="relaxed")                          # running totals
                if PRED:
                    tl.atomic_add(cnt_p, tl.sum(sel.to(tl.int32), axis=0), sem="relaxed")
        if COUNT:     # predicted rows into the running total (the split value kernel counts the active)
            tl.atomic_add(cnt_p, tl.sum(sel.to(tl.int32), axis=0), sem="relaxed")
        if COMPACT:   # append the active rows to the layer's index list (slot[1] = its length)
            act = (y > 0).to(tl.int32)
            base = tl.atomic_add(slot_p + 1, tl.sum(act, axis=0))
            pos = base + tl.cumsum(act, axis=0) - act
            tl.store(idx_p + pos, rows, mask=act > 0)
            if PRED:
                tl.atomic_add(slot_p, tl.sum(sel.to(tl.int32), axis=0))   # slot[0]: rows read

    @triton.jit
    def _gather(sel, pos, rows, y, c0, n, NA: tl.constexpr):
        """Slots c0..c0+NA of the in-program list of selected rows (pos = rank among them): the row
        numbers, their y and which slots are real (< n). (NA,) each; a (NA, BN) compare, no memory."""
        s = c0 + tl.arange(0, NA)
        eq = (pos[None, :] == s[:, None]) & sel[None, :]
        r = tl.sum(tl.where(eq, rows[None, :], 0), axis=1)
        yk = tl.sum(tl.where(eq, y[None, :], 0.0), axis=1)
        return r, yk, s < n

    globals()["_gather"] = _gather

    @triton.jit
    def ffn_sparse(w_p, x_p, k_p, q_p, qs_p, qz_p, thr, F, D, vt_p, xo_p, cnt_p,
                   xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p,
                   BN: tl.constexpr, BK: tl.constexpr, PRED: tl.constexpr, BITS: tl.constexpr,
                   PER: tl.constexpr, NB: tl.constexpr, GC: tl.constexpr, MIXIN: tl.constexpr,
                   NA: tl.constexpr, PDL: tl.constexpr, xp_p, WORDS: tl.constexpr, WPG: tl.constexpr):
        """The whole sparse FFN of one layer for BN rows (D <= BK, whole-width tiles): [LN2 + mix],
        [predictor scores -> the selected W_k rows, NA at a time, gathered into a (NA, BK) tile],
        keys, then the active rows' W_v^T columns gathered NA at a time, summed in registers and
        added to xo_p once per program (atomics over D). Registers hold NA rows, not BN masked ones,
        so that every program is resident at once and the dependent loads of all programs overlap."""
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rm = rows < F
        ks = tl.arange(0, BK)
        km = ks < D
        acc = tl.zeros((BK,), dtype=tl.float32)
        if PRED:   # codes, scales, zeros of the row tile first (weights: before the wait)
            if WORDS:   # (WORDS: not with MIXIN, whose x the mix launch does not see)
                wd, scale, zero = _words(q_p, qs_p, qz_p, rows, rm, GC, WPG)
            else:
                byt, scale, zero = _codes(q_p, qs_p, qz_p, rows, rm, GC, NB)
            _sync(PDL)
            if MIXIN:
                xv = _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, pid == 0)
            else:
                xv = tl.load(x_p + ks, mask=km, other=0.0)
            if WORDS:
                sc = _score_words(xp_p, wd, scale, zero, GC, WPG, BITS)
            else:       # x from registers (with MIXIN it exists nowhere else)
                sc = _score_bytes(x_p, xv, byt, scale, zero, BN, GC, NB, PER, BITS, True)
            sel = rm & (sc >= thr)
            tl.store(k_p + rows, tl.full((BN,), -1.0, tl.float32), mask=rm & (sc < thr))   # -1: not predicted
            sl = sel.to(tl.int32)
            ns = tl.sum(sl, axis=0)
            pos = tl.cumsum(sl, axis=0) - sl
            na = ns * 0
            for c0 in range(0, ns, NA):   # NA selected rows at a time: W_k rows, keys, W_v^T rows
                r, yk, ok = _gather(sel, pos, rows, rows.to(tl.float32), c0, ns, NA)
                wk = tl.load(w_p + r[:, None] * D + ks[None, :], mask=ok[:, None] & km[None, :], other=0.0)
                y = tl.maximum(tl.sum(wk.to(tl.float32) * xv[None, :], axis=1), 0.0)
                y = y * y
                tl.store(k_p + r, y, mask=ok)
                a = ok & (y > 0)
                na += tl.sum(a.to(tl.int32), axis=0)
                vv = tl.load(vt_p + r[:, None] * D + ks[None, :], mask=a[:, None] & km[None, :], other=0.0)
                acc += tl.sum(vv.to(tl.float32) * y[:, None], axis=0)
            tl.atomic_add(cnt_p, ns, sem="relaxed")
        else:      # exact: every W_k row (prefetched), then only the active rows of W_v^T
            wv = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=rm[:, None] & km[None, :], other=0.0)
            _sync(PDL)
            if MIXIN:
                xv = _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, pid == 0)
            else:
                xv = tl.load(x_p + ks, mask=km, other=0.0)
            y = tl.maximum(tl.sum(wv.to(tl.float32) * xv[None, :], axis=1), 0.0)
            y = y * y
            tl.store(k_p + rows, y, mask=rm)
            act = rm & (y > 0)
            al = act.to(tl.int32)
            na = tl.sum(al, axis=0)
            pos = tl.cumsum(al, axis=0) - al
            for c0 in range(0, na, NA):
                r, yk, ok = _gather(act, pos, rows, y, c0, na, NA)
                vv = tl.load(vt_p + r[:, None] * D + ks[None, :], mask=ok[:, None] & km[None, :], other=0.0)
                acc += tl.sum(vv.to(tl.float32) * yk[:, None], axis=0)
        if na > 0:
            tl.atomic_add(xo_p + ks, acc, mask=km, sem="relaxed")
        tl.atomic_add(cnt_p + 1, na, sem="relaxed")

    @triton.jit
    def ffn_vsplit(vt_p, k_p, x_p, cnt_p, F, D, BF: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr):
        """Sparse FFN value as a split-K pass over W_v^T (F, D): program (f, d) takes BF neurons x BD
        columns, loads only the rows with k > 0 (masked: zero rows never leave memory), and adds
        its (BD,) partial to x: (F / BF) atomic adds per element instead of one per key program."""
        pf = tl.program_id(0)
        pd = tl.program_id(1)
        fr = pf * BF + tl.arange(0, BF)
        fm = fr < F
        cols = pd * BD + tl.arange(0, BD)
        cm = cols < D
        _sync(PDL)
        k = tl.load(k_p + fr, mask=fm, other=0.0)
        act = k > 0
        na = tl.sum(act.to(tl.int32), axis=0)
        w = tl.load(vt_p + fr[:, None] * D + cols[None, :], mask=act[:, None] & cm[None, :], other=0.0)
        part = tl.sum(w.to(tl.float32) * k[:, None], axis=0)
        tl.atomic_add(x_p + cols, part, mask=cm & (na > 0), sem="relaxed")
        tl.atomic_add(cnt_p + 1, na, mask=pd == 0, sem="relaxed")

    @triton.jit
    def ffn_value(vt_p, k_p, idx_p, slot_p, cnt_p, x_p, D, NS,
                  BD: tl.constexpr, BS: tl.constexpr, PDL: tl.constexpr):
        pd = tl.program_id(0)
        ps = tl.program_id(1)
        cols = pd * BD + tl.arange(0, BD)
        cm = cols < D
        _sync(PDL)
        n = tl.sum(tl.load(slot_p + 1 + tl.arange(0, 1)), axis=0)   # active rows listed by ffn_key
        acc = tl.zeros((BS, BD), dtype=tl.float32)
        for j0 in range(ps * BS, n, NS * BS):
            js = j0 + tl.arange(0, BS)
            jm = js < n
            j = tl.load(idx_p + js, mask=jm, other=0)
            kv = tl.load(k_p + j, mask=jm, other=0.0)
            wv = tl.load(vt_p + j[:, None] * D + cols[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            acc += wv.to(tl.float32) * kv[:, None]
        tl.atomic_add(x_p + cols, tl.sum(acc, axis=0), mask=cm & (ps * BS < n))   # the residual add
        first = (pd == 0) & (ps == 0)                 # per-step counts into the running totals
        two = tl.arange(0, 2)
        tl.atomic_add(cnt_p + two, tl.load(slot_p + two), mask=(two < 2) & first)

    _K.update(mix=mix, gemv=gemv, att_head=att_head, ffn_key=ffn_key, ffn_value=ffn_value, ffn_sparse=ffn_sparse,
               ffn_vsplit=ffn_vsplit)
    return _K
