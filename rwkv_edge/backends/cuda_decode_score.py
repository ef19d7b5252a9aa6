"""Predictor scores of the fused decode's predicted mode (cuda_decode.py), as Triton jit helpers that
the FFN kernels of cuda_decode_kernels.py call: score_j = sum_g zero_jg sum(x_g) + scale_jg (q_jg . x_g)
for an n-bit W_k predictor (codes q (F, D) packed PER = 8 // BITS to a byte, little-endian, groups of
GS columns, float16 scales and zeros (F, G)).

  _score        group by group, any D (the kernel waits for its input inside)
  _codes        one row tile's codes, scales and zeros in one load (G a power of two), for
  _score_bytes  the byte-wise scores of such a tile (an int-to-float conversion per code), x read
                from memory or from registers (the FFN kernels and the early scores share it)
  _score_words  the codes read as int32 words (CPW = 32 // BITS codes a word) against a permuted,
                pre-scaled copy of x that the FFN mix launch writes (`perm_x`): one and plus one FMA a
                code (tune score_perm; see below)
  perm_x        that copy, from the mixed FFN input x (D,): xp[m * NW + k] = x[k * CPW + m] * 2^(109 - p_m)
                (NW = D / CPW words a row, p_m = BITS * (m % (16 // BITS)) the code's bit offset in its
                half word), then the G group sums of x at xp[D + g]
  quant_x       (tune early_dp4a, the early scores only) the int8 copy of the scored vector that the LN1 mix
                launch writes: per group of GS columns x_q = round(x * 127 / amax), the step amax / 127 and
                the exact float sum of x
  _score_dp4a   scores from the code words of `repack_dp4a` (host side, once: the codes of 4 consecutive
                columns at the same bit offset of a word's 4 bytes) against x_q: one dp4a (4 codes times 4
                int8 x, added to an int32) after a shift and an and, ~3 instructions per 4 codes instead of
                ~3 per code; the int group dots are exact, so the only new error is x's rounding to int8
                (|score error| <= sum_g scale_g step_g / 2 sum(codes_g); tests/test_cuda_decode_dp4a.py)

Why word-wise scores were tried (session 10): the byte-wise 2-bit scores of the official 1.5B shapes
(F 8192, D 2048, group 64) cost ~150 us a token after the PDL wait, and an int-to-float conversion per
code (16 a clock per SM on Hopper) looked like the limit. ncu says otherwise: the byte-wise and the
word-wise forms execute about the same number of instructions (~3 a code either way: shift/and,
convert or add, FMA; ffn_key scores-only 5.92 M vs 5.89 M warp instructions a layer), and the kernels
are issue-latency bound at low occupancy (the gathered predicted kernel: 230-255 registers a thread,
2 programs of 4 warps an SM, issue slots 25% busy; the 8-row key kernel 96-126 registers, 37-46%).
The word-wise form first masked a code into a normal float (1 + code * 2^(p-23), then minus 1); it
measured slower (1.5B predicted 1034 vs 1086 tok/s, 58M 5073 vs 5116), in part because the mix launch,
a single program on the critical path, spent ~1.3 us a layer more on the scattered stores of its copy
of x (no-FFN step 625 vs 594 us). Now the code is read as a subnormal (one and, no exponent bits,
no add) and perm_x transposes in registers before contiguous stores: 17% fewer instructions in the
scores-only key kernel, but no faster (1.5B scores only 876 vs 849 us a token, predicted 930 vs 921;
58M even), so it stays an option; figures in docs/cuda_decode_history.md (session 10).
"""
from __future__ import annotations


def helpers(sync):
    """Define the jit helpers (sync: the kernels' `_sync`); returns them by name."""
    import triton
    import triton.language as tl

    globals()["_sync"] = sync

    @triton.jit
    def _score(x_p, q_p, qs_p, qz_p, rows, rm, D, G, BN: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
               PER: tl.constexpr, NB: tl.constexpr, PDL: tl.constexpr):
        """Group-by-group n-bit predictor scores of `rows` (any D; waits for the input itself)."""
        _sync(PDL)
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
        return sc

    @triton.jit
    def _codes(q_p, qs_p, qz_p, rows, rm, GC: tl.constexpr, NB: tl.constexpr):
        """One row tile of an n-bit predictor in the ONESHOT layout (G = GC groups, a power of two):
        packed codes (BN, GC*NB) uint8 and float32 scales and zeros (BN, GC); 0 on rows not in rm."""
        cb = tl.arange(0, GC * NB)
        gi = tl.arange(0, GC)
        byt = tl.load(q_p + rows[:, None] * (GC * NB) + cb[None, :], mask=rm[:, None], other=0)
        scale = tl.load(qs_p + rows[:, None] * GC + gi[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        zero = tl.load(qz_p + rows[:, None] * GC + gi[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        return byt, scale, zero

    @triton.jit
    def _score_bytes(x_p, xv, byt, scale, zero, BN: tl.constexpr, GC: tl.constexpr, NB: tl.constexpr,
                     PER: tl.constexpr, BITS: tl.constexpr, XREG: tl.constexpr):
        """Scores (BN,) of a `_codes` tile against x (D = GC*NB*PER floats): x_p in memory, or XREG: the
        (D,) tensor xv in registers (the kernels whose x exists only there, e.g. the fused FFN mix)."""
        qx = tl.zeros((BN, GC * NB), dtype=tl.float32)
        xs = tl.zeros((GC * NB,), dtype=tl.float32)
        if XREG:
            x2 = tl.reshape(xv, (GC * NB, PER))                      # x2[c, s] = x[c * PER + s]
        for s in tl.static_range(PER):
            code = ((byt >> (s * BITS)) & ((1 << BITS) - 1)).to(tl.float32)
            if XREG:
                xq = tl.sum(tl.where(tl.arange(0, PER)[None, :] == s, x2, 0.0), axis=1)
            else:
                xq = tl.load(x_p + tl.arange(0, GC * NB) * PER + s)
            qx += code * xq[None, :]
            xs += xq
        qg = tl.sum(tl.reshape(qx, (BN, GC, NB)), axis=2)                  # (BN, G): q_g . x_g
        xg = tl.sum(tl.reshape(xs, (GC, NB)), axis=1)                      # (G,): sum(x_g)
        return tl.sum(scale * qg + zero * xg[None, :], axis=1)

    @triton.jit
    def _words(q_p, qs_p, qz_p, rows, rm, GC: tl.constexpr, WPG: tl.constexpr):
        """One row tile's codes as int32 words (BN, GC, WPG) (q_p: the packed codes viewed as int32,
        WPG words a group), float32 scales and zeros (BN, GC); issued before the PDL wait."""
        gi = tl.arange(0, GC)
        off = gi[:, None] * WPG + tl.arange(0, WPG)[None, :]                       # (GC, WPG)
        wd = tl.load(q_p + rows[:, None, None] * (GC * WPG) + off[None, :, :], mask=rm[:, None, None], other=0)
        scale = tl.load(qs_p + rows[:, None] * GC + gi[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        zero = tl.load(qz_p + rows[:, None] * GC + gi[None, :], mask=rm[:, None], other=0.0).to(tl.float32)
        return wd, scale, zero

    @triton.jit
    def _score_words(xp_p, wd, scale, zero, GC: tl.constexpr, WPG: tl.constexpr, BITS: tl.constexpr):
        """Scores (BN,) from `_words` and the permuted x of `perm_x` (after the wait). Code m of a word
        (bits BITS*m, LSB first) is column k*CPW + m of word k; the high half word is shifted down once,
        so that every code sits at p <= 16 - BITS bits. The masked word read as a float is a subnormal,
        code * 2^(p-149) exactly (no exponent bits; fp32 FMAs keep subnormals), so a code costs one and
        and one FMA; times x * 2^(109-p) it is code * x * 2^-40 to the bit (normal for |code x| > 2^-86)."""
        gi = tl.arange(0, GC)
        off = gi[:, None] * WPG + tl.arange(0, WPG)[None, :]                       # (GC, WPG)
        hi = wd >> 16
        acc = tl.zeros(wd.shape, dtype=tl.float32)
        for m in tl.static_range(32 // BITS):
            if m < 16 // BITS:
                src = wd
            else:
                src = hi
            v = (src & (((1 << BITS) - 1) << (BITS * (m % (16 // BITS))))).to(tl.float32, bitcast=True)
            acc += v * tl.load(xp_p + m * (GC * WPG) + off)[None, :, :]              # contiguous x rows
        qg = tl.sum(acc, axis=2) * 1099511627776.0                                  # (BN, GC) q_g . x_g (x 2^40)
        xg = tl.load(xp_p + (32 // BITS) * (GC * WPG) + gi)                         # (GC,): sum(x_g)
        return tl.sum(scale * qg + zero * xg[None, :], axis=1)

    @triton.jit
    def perm_x(xk, d, xp_p, D: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr):
        """Store the permuted, scaled copy of xk (D,) (d = arange(D), D a power of two) and its group
        sums for `_score_words` (called by the mix kernel that computes xk): a transpose in registers,
        then contiguous stores."""
        cpw: tl.constexpr = 32 // BITS
        m = tl.arange(0, cpw)
        sc = ((236 - BITS * (m % (16 // BITS))) << 23).to(tl.float32, bitcast=True)     # 2^(109 - p)
        xt = tl.trans(tl.reshape(xk, (D // cpw, cpw)))                                   # (CPW, NW)
        tl.store(xp_p + m[:, None] * (D // cpw) + tl.arange(0, D // cpw)[None, :], xt * sc[:, None])
        tl.store(xp_p + D + tl.arange(0, D // GS), tl.sum(tl.reshape(xk, (D // GS, GS)), axis=1))

    @triton.jit
    def quant_x(v, xq_p, D: tl.constexpr, GS: tl.constexpr):
        """The int8 copy of v (D,) that `_score_dp4a` reads (called by the LN1 mix kernel that computes v):
        per group of GS columns x_q = floor(v * 127 / amax + 0.5), stored as D int8 in column order (the
        scorers read them as D / 4 int32 words), then the G float32 group steps amax / 127 and the G exact
        float group sums. (This single program is on the critical path: no repacking of the bytes here.)"""
        g = tl.reshape(v, (D // GS, GS))
        amax = tl.max(tl.abs(g), axis=1)
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        xq = tl.reshape(tl.floor(g * inv[:, None] + 0.5), (D,)).to(tl.int8)
        tl.store(xq_p.to(tl.pointer_type(tl.int8)) + tl.arange(0, D), xq)
        gi = tl.arange(0, D // GS)
        tl.store(xq_p + D // 4 + gi, amax / 127.0)
        tl.store(xq_p + D // 4 + D // GS + gi, tl.sum(g, axis=1))

    @triton.jit
    def _score_dp4a(xq_p, wd, scale, zero, GC: tl.constexpr, WPG: tl.constexpr, BITS: tl.constexpr):
        """Scores (BN,) from `_words` of the dp4a-repacked codes (`repack_dp4a`: byte i of word w holds at
        bits BITS*k the code of column w*4*PER + 4*k + i) against `quant_x`'s int8 x: for each k, the
        masked word (4 codes, one a byte) times x word w*PER + k (columns w*4*PER + 4k .. +3) in one dp4a,
        so ~3 instructions (shift, and, dp4a) per 4 codes; the int group dots are exact (|dot| <= GS *
        (2^BITS - 1) * 127), then q_g . x_g ~ step_g * idot_g, and the zero term uses x's exact group sums."""
        PER: tl.constexpr = 8 // BITS
        MASK: tl.constexpr = ((1 << BITS) - 1) * 0x01010101
        xw_p = xq_p.to(tl.pointer_type(tl.int32))
        gi = tl.arange(0, GC)
        off = gi[:, None] * WPG + tl.arange(0, WPG)[None, :]                       # (GC, WPG) code words
        acc = tl.zeros(wd.shape, dtype=tl.int32)
        for k in tl.static_range(PER):
            xw = tl.broadcast_to(tl.load(xw_p + off * PER + k)[None, :, :], wd.shape)
            acc = tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r",
                                            [(wd >> (BITS * k)) & MASK, xw, acc],
                                            dtype=tl.int32, is_pure=True, pack=1)
        idot = tl.sum(acc, axis=2).to(tl.float32)                                  # (BN, GC)
        sx = tl.load(xq_p + GC * WPG * PER + gi)                                   # (GC,) group steps
        xg = tl.load(xq_p + GC * WPG * PER + GC + gi)                              # (GC,) sum(x_g)
        return tl.sum(scale * (idot * sx[None, :]) + zero * xg[None, :], axis=1)

    return dict(_score=_score, _codes=_codes, _score_bytes=_score_bytes, _words=_words,
                _score_words=_score_words, perm_x=perm_x, quant_x=quant_x, _score_dp4a=_score_dp4a)


def repack_dp4a(q, bits: int):
    """The packed codes q (F, D / PER) uint8 (code of column PER*b + s at bits BITS*s of byte b) as int32
    words (F, D / (4 PER)) for `_score_dp4a`: within each word's 4 PER columns, byte i's slot k holds
    column 4k + i (instead of PER*i + k), so that the k-th masked word meets 4 consecutive x bytes.
    BITS 1, 2 or 4; a torch tensor in, a torch tensor out (on q's device)."""
    import torch

    per = 8 // bits
    F, nb = q.shape
    sh = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    codes = (q.to(torch.int32)[..., None] >> sh) & ((1 << bits) - 1)          # (F, nb, PER): column order
    cb = codes.reshape(F, nb // 4, per, 4).transpose(2, 3)                     # [w, i, k] = column 4k + i
    byt = (cb << sh).sum(-1).to(torch.uint8)                                   # (F, nb / 4, 4): byte i
    return byt.reshape(F, nb).contiguous().view(torch.int32)


def quant_x_ref(x, gs: int):
    """numpy emulation of `quant_x` (float32): int8 codes (D,), group steps and group sums (G,)."""
    import numpy as np

    g = np.asarray(x, np.float32).reshape(-1, gs)
    amax = np.abs(g).max(1)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.floor(g * inv[:, None] + np.float32(0.5)).astype(np.int32)
    return xq.reshape(-1), (amax / np.float32(127.0)).astype(np.float32), g.sum(1, dtype=np.float32)
