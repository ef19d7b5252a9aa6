"""Triton kernels of the fused RWKV-7 one-token decode step (cuda_decode.py): seven launches per
layer, no host synchronisation, so the whole step captures as one CUDA graph.

Shapes (D = n_embd = H*N, F = FFN width, all activations float32, weights in any float dtype):
  mix        one program: [x = ln0(emb[tok])]; xl = LN(x);
             prev <- xl; out[m] = xl + (prev_old - xl) * mix[m] for NMIX mix vectors (NMIX 0: out = xl)
  gemv       y[n] = act(W[n, :] . x_seg(n)) (+ base[n]); W (N, K) row-major, the input row of a
             block of rows chosen by a segment table (r/k/v and the LoRA first stages in one launch)
  att_head   one program per head: LoRA second stages, decay/a/g/value-residual, kk normalise,
             the wkv state update (N x N in registers), group norm, bonus, times g
  ffn_key    k[j] = relu(W_k[j] . xk)^2 on the rows a fused n-bit predictor selects
             (score = zero.sum(x) + scale.(q x) per group >= threshold; k = -1 on the others)
             or on all rows; predicted
             and active neurons are counted on the device (atomic adds, read after the run)
  ffn_value  x[d] += sum_{j in split s} k[j] Vt[j, d] (atomic add per split: the float32 sum order
             varies between runs, ~1e-7 relative); Vt = W_v^T (F, D); with SKIP, rows whose k[j] is
             not > 0 are masked out of the load, so their bytes are never read
The active set is a device-side mask over all F neurons (no index buffer of bounded capacity), so
no neuron can be dropped: there is no overflow to handle.
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
    def mix(x_p, emb_p, tok_p, ln0w_p, ln0b_p, lnw_p, lnb_p, prev_p, mix_p, out_p, D, eps,
            BD: tl.constexpr, EMB: tl.constexpr, NMIX: tl.constexpr):
        d = tl.arange(0, BD)
        dm = d < D
        if EMB:   # x = ln0(emb[tok]): the block input of layer 0
            tok = tl.load(tok_p)
            e = tl.load(emb_p + tok * D + d, mask=dm, other=0.0).to(tl.float32)
            mu = tl.sum(e, axis=0) / D
            c = tl.where(dm, e - mu, 0.0)
            x = c / tl.sqrt(tl.sum(c * c, axis=0) / D + eps) * tl.load(ln0w_p + d, mask=dm) + tl.load(ln0b_p + d, mask=dm)
            tl.store(x_p + d, x, mask=dm)
        else:
            x = tl.load(x_p + d, mask=dm, other=0.0)
        mu = tl.sum(tl.where(dm, x, 0.0), axis=0) / D
        c = tl.where(dm, x - mu, 0.0)
        xl = c / tl.sqrt(tl.sum(c * c, axis=0) / D + eps) * tl.load(lnw_p + d, mask=dm) + tl.load(lnb_p + d, mask=dm)
        if NMIX == 0:
            tl.store(out_p + d, xl, mask=dm)
        else:
            xx = tl.load(prev_p + d, mask=dm) - xl
            tl.store(prev_p + d, xl, mask=dm)
            for m in tl.static_range(NMIX):
                tl.store(out_p + m * D + d, xl + xx * tl.load(mix_p + m * D + d, mask=dm), mask=dm)

    @triton.jit
    def gemv(w_p, x_p, y_p, base_p, segend_p, segx_p, N, K,
             BN: tl.constexpr, BK: tl.constexpr, NSEG: tl.constexpr, ACT: tl.constexpr, ADD: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rm = rows < N
        if NSEG > 1:   # which input row feeds this block of rows (BN divides every segment)
            ends = tl.load(segend_p + tl.arange(0, NSEG))
            seg = tl.sum((pid * BN >= ends).to(tl.int32), axis=0)
            xo = tl.load(segx_p + seg) * K
        else:
            xo = 0
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

    @triton.jit
    def att_head(y1_p, D, LW, LA, LG, LV, w2_p, a2_p, g2_p, v2_p, w0_p, a0_p, v0_p, kk_p, ka_p, rk_p,
                 lnxw_p, lnxb_p, vfirst_p, s_p, out_p,
                 N: tl.constexpr, BLW: tl.constexpr, BLA: tl.constexpr, BLG: tl.constexpr, BLV: tl.constexpr,
                 FIRST: tl.constexpr):
        h = tl.program_id(0)
        n = tl.arange(0, N)
        col = h * N + n
        r = tl.load(y1_p + col)
        k = tl.load(y1_p + D + col)
        v = tl.load(y1_p + 2 * D + col)
        o = 3 * D
        lw = tl.arange(0, BLW)
        hw = 2.0 * tl.sigmoid(2.0 * tl.load(y1_p + o + lw, mask=lw < LW, other=0.0)) - 1.0   # tanh
        wl = tl.sum(tl.load(w2_p + lw[:, None] * D + col[None, :], mask=(lw < LW)[:, None], other=0.0).to(tl.float32)
                    * hw[:, None], axis=0)
        o += LW
        la = tl.arange(0, BLA)
        ha = tl.load(y1_p + o + la, mask=la < LA, other=0.0)
        al = tl.sum(tl.load(a2_p + la[:, None] * D + col[None, :], mask=(la < LA)[:, None], other=0.0).to(tl.float32)
                    * ha[:, None], axis=0)
        o += LA
        lg = tl.arange(0, BLG)
        hg = tl.sigmoid(tl.load(y1_p + o + lg, mask=lg < LG, other=0.0))
        g = tl.sum(tl.load(g2_p + lg[:, None] * D + col[None, :], mask=(lg < LG)[:, None], other=0.0).to(tl.float32)
                   * hg[:, None], axis=0)
        o += LG
        w = tl.exp(-0.606531 * tl.sigmoid(tl.load(w0_p + col) + wl))
        a = tl.sigmoid(tl.load(a0_p + col) + al)
        kk = k * tl.load(kk_p + col)
        kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, axis=0)), 1e-12)
        k = k * (1.0 + (a - 1.0) * tl.load(ka_p + col))
        if FIRST:
            tl.store(vfirst_p + col, v)
        else:
            lv = tl.arange(0, BLV)
            hv = tl.load(y1_p + o + lv, mask=lv < LV, other=0.0)
            vl = tl.sum(tl.load(v2_p + lv[:, None] * D + col[None, :], mask=(lv < LV)[:, None], other=0.0).to(tl.float32)
                        * hv[:, None], axis=0)
            v = v + (tl.load(vfirst_p + col) - v) * tl.sigmoid(tl.load(v0_p + col) + vl)
        # wkv: S[i, j] (value i, key j); S = S*w_j + (S @ -kk)_i (kk*a)_j + v_i k_j ; y_i = (S @ r)_i
        soff = h * N * N + n[:, None] * N + n[None, :]
        S = tl.load(s_p + soff)
        sa = tl.sum(S * (-kk)[None, :], axis=1)
        S = S * w[None, :] + sa[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
        tl.store(s_p + soff, S)
        y = tl.sum(S * r[None, :], axis=1)
        mu = tl.sum(y, axis=0) / N
        c = y - mu
        y = c / tl.sqrt(tl.sum(c * c, axis=0) / N + 64e-5) * tl.load(lnxw_p + col) + tl.load(lnxb_p + col)
        y = y + tl.sum(r * k * tl.load(rk_p + col), axis=0) * v
        tl.store(out_p + col, y * g)

    @triton.jit
    def ffn_key(w_p, x_p, k_p, q_p, qs_p, qz_p, thr, cnt_p, F, D, G,
                BN: tl.constexpr, BK: tl.constexpr, PRED: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                PER: tl.constexpr, NB: tl.constexpr, ONESHOT: tl.constexpr, GC: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rm = rows < F
        if PRED:   # n-bit W_k predictor: score_j = sum_g zero_jg sum(x_g) + scale_jg (q_jg . x_g)
            # PER = 8 // BITS codes per byte, NB = GS // PER bytes per group and row
            if ONESHOT:  # the row tile's codes in one load (GC = G groups, D // PER and G powers of two)
                cb = tl.arange(0, GC * NB)
                byt = tl.load(q_p + rows[:, None] * (GC * NB) + cb[None, :], mask=rm[:, None], other=0)
                qx = tl.zeros((BN, GC * NB), dtype=tl.float32)
                xs = tl.zeros((GC * NB,), dtype=tl.float32)
                for s in tl.static_range(PER):
                    code = ((byt >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                    xq = tl.load(x_p + cb * PER + s)
                    qx += code * xq[None, :]
                    xs += xq
                qg = tl.sum(tl.reshape(qx, (BN, GC, NB)), axis=2)                  # (BN, G)
                xg = tl.sum(tl.reshape(xs, (GC, NB)), axis=1)                      # (G,)
                gi = tl.arange(0, GC)
                scale = tl.load(qs_p + rows[:, None] * GC + gi[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
                zero = tl.load(qz_p + rows[:, None] * GC + gi[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
                sc = tl.sum(scale * qg + zero * xg[None, :], axis=1)
            else:
                c = tl.arange(0, NB)
                sc = tl.zeros((BN,), dtype=tl.float32)
                for g in range(0, G):
                    byt = tl.load(q_p + rows[:, None] * (D // PER) + g * NB + c[None, :], mask=rm[:, None], other=0)
                    qx = tl.zeros((BN, NB), dtype=tl.float32)
                    xs = 0.0
                    for s in tl.static_range(PER):
                        code = ((byt >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
                        xq = tl.load(x_p + g * GS + c * PER + s)
                        qx += code * xq[None, :]
                        xs += tl.sum(xq, axis=0)
                    scale = tl.load(qs_p + rows * G + g, mask=rm, other=0.0).to(tl.float32)
                    zero = tl.load(qz_p + rows * G + g, mask=rm, other=0.0).to(tl.float32)
                    sc += zero * xs + scale * tl.sum(qx, axis=1)
            sel = rm & (sc >= thr)
        else:
            sel = rm
        acc = tl.zeros((BN, BK), dtype=tl.float32)
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            km = ks < D
            xv = tl.load(x_p + ks, mask=km, other=0.0)
            wv = tl.load(w_p + rows[:, None] * D + ks[None, :], mask=sel[:, None] & km[None, :], other=0.0)
            acc += wv.to(tl.float32) * xv[None, :]
        y = tl.maximum(tl.sum(acc, axis=1), 0.0)
        y = tl.where(sel, y * y, -1.0)                                   # -1: not predicted
        tl.store(k_p + rows, y, mask=rm)
        tl.atomic_add(cnt_p, tl.sum(sel.to(tl.int32), axis=0))            # [0]: predicted (read) rows
        tl.atomic_add(cnt_p + 1, tl.sum((y > 0).to(tl.int32), axis=0))    # [1]: active rows

    @triton.jit
    def ffn_value(vt_p, k_p, x_p, F, D, RPS, BD: tl.constexpr, BS: tl.constexpr, SKIP: tl.constexpr):
        pd = tl.program_id(0)
        ps = tl.program_id(1)
        cols = pd * BD + tl.arange(0, BD)
        cm = cols < D
        acc = tl.zeros((BS, BD), dtype=tl.float32)
        for j0 in range(ps * RPS, ps * RPS + RPS, BS):
            js = j0 + tl.arange(0, BS)
            jm = js < F
            kv = tl.load(k_p + js, mask=jm, other=0.0)
            if SKIP:   # a zero activation's row is not loaded: its bytes never leave memory
                jm = jm & (kv > 0.0)
            wv = tl.load(vt_p + js[:, None] * D + cols[None, :], mask=jm[:, None] & cm[None, :], other=0.0)
            acc += wv.to(tl.float32) * kv[:, None]
        tl.atomic_add(x_p + cols, tl.sum(acc, axis=0), mask=cm)   # the residual add, split over programs

    _K.update(mix=mix, gemv=gemv, att_head=att_head, ffn_key=ffn_key, ffn_value=ffn_value)
    return _K
