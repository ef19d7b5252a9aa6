"""Early predictor scores for the fused decode's predicted mode (cuda_decode.py, tune early_scores > 0):
layer L's n-bit W_k predictor scores the vector that exists at the START of layer L, its LN1 output
(st.att_x[L], which the LN1 mix launch stores as the next token's shift state), instead of the FFN
input, so that the scores run while the attention launches stream their weights, and the FFN
launch finds its mask ready and issues the selected W_k and W_v^T rows' loads before its PDL wait.
The bundle's thresholds must be calibrated on that vector (a predictor fitted on the FFN input and
its threshold mean something else on ln1(x)); the format is the same (codes (F, D) packed PER = 8 //
BITS to a byte, float16 scales and zeros (F, G), one threshold a layer).

Early bundles (predictors/early.py EarlyPredictor with a diagonal map, bundle input "early", real
quality): the scores read z = ln1 * d + c + mix * prev instead of ln1, which the LN1 mix launch writes
(kernel `mix`, EZ) to its own buffer ez[L] next to ln1, so the scorers above are unchanged. prev is the
previous token's FFN token-shift state, read from st.ffn_x[L] after that launch's wait (every earlier
kernel completed): the LN2 mix of layer L (or, with fuse_ffn_mix, the copy of fnew[L] in the next layer's
att_head launch or in the final LN mix) wrote it during the previous token, and the FFN of this token
writes fnew[L], not st.ffn_x[L], so st.ffn_x[L] is the previous token's row for the whole step (fnew[L]
holds the same row until this token's FFN; st.ffn_x is also what `reset` sets). The scorer reads ez[L]
after its own wait, as it read ln1; the next write of ez[L] is the next token's.

Where the scoring programs run (early_scores):
  1  extra programs of the att_head launch (H heads, then ceil(F / early_bn) scoring programs): att_head
     occupies H of the SMs for a latency-bound ~8 us a layer at 1.5B shapes; the others are idle
  2  extra programs of the stacked r/k/v + LoRA GEMV launch (scoring programs first)
  3  a launch of their own right after the LN1 mix
Kernels here:
  gemv_early, att_head_early   the two host launches: `_early_score` in the first / last programs
  score_early                  the own launch
  ffn_early                    the FFN: reads the mask, loads the selected rows before its wait

PDL (why the FFN may read the mask before its wait): with the default trigger-then-wait order of every
kernel (`_sync`), a launch can start while its predecessor, and even older kernels, still run, so
nothing an earlier launch wrote is safe to read before the wait. So one launch between the scorer and
the FFN waits BEFORE it triggers (`_wait_first`): its successor starts only once it has passed its
wait, i.e. once its predecessor completed, and every kernel completes only after its own wait returned,
so by induction everything before that predecessor has completed too, its stores visible.
  2, 3 (scores in the GEMV / own launch): att_head waits first. The FFN starts only after its
     predecessor (LN2 mix, or att_o with fuse_ffn_mix) was launched, which follows att_o's launch, which
     follows att_head passing its wait, i.e. the completion of the GEMV launch (and of the own launch
     before it). att_head's cost: att_o is launched once the GEMV completed instead of at once; its
     weight loads still overlap att_head's ~8 us body. The FFN's row loads overlap att_o's tail.
  1  (scores in att_head): the LN2 mix waits first: the FFN starts after att_o completed (hence att_head,
     the writer); its row loads overlap only the LN2 mix (no fuse_ffn_mix here).
The FFN reads the mask with .cg (L2, never a stale L1 line from the last step). The next step's scorer
of layer L writes mask[L] after its own wait (all earlier kernels, this FFN included, done), so there
is no write-after-read hazard either.
Mask bytes: 0 not scored yet (early_ready only), 1 scored and not selected, 2 selected.
early_ready (tune): no launch waits first; the bytes are per-row ready flags. ffn_early polls its BN
rows' bytes (volatile loads, ~NAP ns apart) until none is 0, loads the selected rows, waits, and sets its
bytes back to 0. No deadlock: a PDL launch's programs are scheduled only once every program of its
predecessor has triggered (or exited); each scoring program triggers before its scores, so every scorer
of layer L is resident (and needs only the LN1 mix to finish) before the launch after its host exists,
let alone the FFN. No stale byte: the next step's scorer writes after its own wait, i.e. after this FFN
(its reset included) completed; reset() and construction leave 0s. The polls are bounded (tune
early_spin): a program whose bytes are still incomplete counts it (stats()["early_timeouts"], must
stay 0) and reads the mask again after its wait, when the scorers have completed, so the FFN never runs
on a partial mask.
"""
from __future__ import annotations

_K: dict = {}
# tune for an early bundle unless the caller's tune sets them (session 11's best: scores in the GEMV launch,
# the LN2 mix inside the FFN launch; session 14: the scores as int8 dp4a dot products, 16 rows a scoring
# program: 1.5B shapes 1.18x -> 1.25x dense, docs/cuda_decode_history.md)
EARLY_BUNDLE_TUNE = {"early_scores": 2, "fuse_ffn_mix": True, "early_dp4a": True, "early_bn": 16}
# and by size (EARLY_BUNDLE_AUTO[small]; small: the weights read per token fit in evict_auto_l2x times the L2, as
# for the eviction hints), unless the caller's tune sets them (session 14's second sweep, tools/gpu_decode_sets21
# -22.txt): where they fit (58M shapes) 2-warp FFN programs, 174.6 -> 162.6 us a token (dense 170.0); where the
# weights stream from HBM (1.5B) value rows of the active rows only (848.5 -> 826.5, 1.280x dense), and (session
# 15, tools/gpu_decode_sets25-29.txt) evict_first on the streamed GEMV tiles (not the W_k rows) and early_pf 1
# (the W_k rows a program loads after its wait prefetched to L2 before it): 831.8 -> 810.9 and 839.5 -> 819.4 us
# in two processes (1.316x / 1.301x dense; sets29); evict_first on the W_k rows too costs 2-7 us, evict_last on the
# W_v^T rows 0-4 us, early_ready 1 6-12 us on top.
EARLY_BUNDLE_AUTO = {True: {"early_warps": 2},
                     False: {"early_vsel": False, "evict_stream": "evict_first", "evict_key": "", "early_pf": 1}}


def early_auto(tn: dict, user: dict, small: bool, ebun: bool) -> None:
    """Resolve the early FFN's size-dependent knobs in tn (the merged tune, in place): early_na / early_ffn_bn
    None (8-row masked tiles where the weights fit in L2, else 8 of 32 rows at a time: session 11), and for an
    early bundle (ebun) EARLY_BUNDLE_AUTO[small] where the caller's tune `user` leaves the knob unset."""
    if tn["early_na"] is None:
        tn["early_na"] = 0 if small else 8
    if tn["early_ffn_bn"] is None:
        tn["early_ffn_bn"] = 8 if small else 32
    for k, v in (EARLY_BUNDLE_AUTO[bool(small)] if ebun else {}).items():
        if k not in user:
            tn[k] = v


def early_bundle_params(bundle, D: int, dev):
    """[d; c; mix] (L, 3, D) float32 on `dev` from an early bundle (input "early") whose predictors all have
    a diagonal map; ValueError otherwise (a full (D, D) map is a GEMV the fused decode does not run)."""
    import numpy as np
    import torch

    rows = []
    for i, p in enumerate(bundle.predictors):
        d = getattr(p, "d", None)
        if d is None:
            raise ValueError(f"layer {i}: the fused decode runs early bundles with a diagonal map only "
                             f"(fit-predictors --early-map diag), not {p.describe()}")
        rows.append(np.stack([d, p.c, p.mix]).astype(np.float32).reshape(3, D))
    return torch.from_numpy(np.stack(rows)).to(dev).contiguous()


def kernels():
    if _K:
        return _K
    import triton
    import triton.language as tl

    from . import cuda_decode_kernels as KD

    KD.kernels()                        # defines the shared jit helpers in that module's globals
    globals().update(_sync=KD._sync, _codes=KD._codes, _score_bytes=KD._score_bytes,
                     _gather=KD._gather, _gemv_tile=KD._gemv_tile, _ln_mix=KD._ln_mix,
                     _att_head=KD._att_head, _words=KD._words, _score_dp4a=KD._score_dp4a)

    @triton.jit
    def _early_score(pid, ex_p, q_p, qs_p, qz_p, thr, mk_p, F, SBN: tl.constexpr, BITS: tl.constexpr,
                     PER: tl.constexpr, NB: tl.constexpr, GC: tl.constexpr, PDL: tl.constexpr, DP4A: tl.constexpr):
        """Rows pid*SBN.. : codes before the wait, then the scores of ex_p (the LN1 output the LN1 mix
        launch wrote: complete once the wait returns) and mask[j] = 1 + (score_j >= thr) (int8).
        DP4A (tune early_dp4a): q_p the repack_dp4a words, ex_p the mix launch's quant_x copy of x."""
        rows = pid * SBN + tl.arange(0, SBN)
        rm = rows < F
        if DP4A:
            wd, scale, zero = _words(q_p, qs_p, qz_p, rows, rm, GC, NB // 4)
            _sync(PDL)
            sc = _score_dp4a(ex_p, wd, scale, zero, GC, NB // 4, BITS)
        else:
            byt, scale, zero = _codes(q_p, qs_p, qz_p, rows, rm, GC, NB)
            _sync(PDL)
            sc = _score_bytes(ex_p, ex_p, byt, scale, zero, SBN, GC, NB, PER, BITS, False)
        tl.store(mk_p + rows, (sc >= thr).to(tl.int8) + 1, mask=rm)   # 1: scored, 2: selected

    @triton.jit
    def score_early(ex_p, q_p, qs_p, qz_p, thr, mk_p, F, SBN: tl.constexpr, BITS: tl.constexpr,
                    PER: tl.constexpr, NB: tl.constexpr, GC: tl.constexpr, PDL: tl.constexpr, DP4A: tl.constexpr):
        _early_score(tl.program_id(0), ex_p, q_p, qs_p, qz_p, thr, mk_p, F, SBN, BITS, PER, NB, GC, PDL, DP4A)

    @triton.jit
    def gemv_early(w_p, x_p, y_p, base_p, segend_p, segx_p, N, K, y2_p,
                   ex_p, q_p, qs_p, qz_p, thr, mk_p, F, NSC,
                   BN: tl.constexpr, BK: tl.constexpr, NSEG: tl.constexpr, ACT: tl.constexpr, ADD: tl.constexpr,
                   FULL: tl.constexpr, PDL: tl.constexpr, DUAL: tl.constexpr, EVW: tl.constexpr,
                   SBN: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, NB: tl.constexpr, GC: tl.constexpr,
                   DP4A: tl.constexpr):
        """The GEMV launch with NSC scoring programs first (dispatched first, so their latency-bound
        scores overlap the GEMV programs' weight stream)."""
        pid = tl.program_id(0)
        if pid < NSC:
            _early_score(pid, ex_p, q_p, qs_p, qz_p, thr, mk_p, F, SBN, BITS, PER, NB, GC, PDL, DP4A)
        else:
            _gemv_tile(pid - NSC, w_p, x_p, y_p, base_p, segend_p, segx_p, N, K, y2_p,
                       BN, BK, NSEG, ACT, ADD, FULL, PDL, DUAL, EVW)

    @triton.jit
    def att_head_early(y1_p, D, LW, LA, LG, LV, w2_p, a2_p, g2_p, v2_p, w0_p, a0_p, v0_p, kk_p, ka_p, rk_p,
                       lnxw_p, lnxb_p, vfirst_p, s_p, out_p, slot_p, cps_p, cpd_p, H,
                       ex_p, q_p, qs_p, qz_p, thr, mk_p, F,
                       N: tl.constexpr, BLW: tl.constexpr, BLA: tl.constexpr, BLG: tl.constexpr,
                       BLV: tl.constexpr, FIRST: tl.constexpr, PDL: tl.constexpr, COPY: tl.constexpr,
                       SBN: tl.constexpr, BITS: tl.constexpr, PER: tl.constexpr, NB: tl.constexpr,
                       GC: tl.constexpr, WFIRST: tl.constexpr, DP4A: tl.constexpr):
        """The att_head launch (programs 0..H-1, dispatched first: they are the critical path) with
        scoring programs after them on the SMs the heads leave idle."""
        pid = tl.program_id(0)
        if pid < H:
            _att_head(pid, y1_p, D, LW, LA, LG, LV, w2_p, a2_p, g2_p, v2_p, w0_p, a0_p, v0_p, kk_p, ka_p,
                      rk_p, lnxw_p, lnxb_p, vfirst_p, s_p, out_p, slot_p, cps_p, cpd_p,
                      N, BLW, BLA, BLG, BLV, FIRST, PDL, COPY, False)
        else:
            _early_score(pid - H, ex_p, q_p, qs_p, qz_p, thr, mk_p, F, SBN, BITS, PER, NB, GC, PDL, DP4A)

    @triton.jit
    def _early_rows(w_p, vt_p, r, ok, ks, km, D, xv, k_p, wk, vv, VSEL: tl.constexpr, EVV: tl.constexpr):
        """Keys of NA gathered rows (W_k rows wk, loaded by the caller; VSEL: their W_v^T rows vv too),
        stored; without VSEL the active rows' W_v^T rows are loaded now. Returns (BK,) partial, count."""
        y = tl.maximum(tl.sum(wk.to(tl.float32) * xv[None, :], axis=1), 0.0)
        y = y * y
        tl.store(k_p + r, y, mask=ok)
        a = ok & (y > 0)
        if not VSEL:
            vv = tl.load(vt_p + r[:, None] * D + ks[None, :], mask=a[:, None] & km[None, :], other=0.0,
                         eviction_policy=EVV)
        return tl.sum(vv.to(tl.float32) * y[:, None], axis=0), tl.sum(a.to(tl.int32), axis=0)

    @triton.jit
    def _load_rows(w_p, vt_p, r, ok, ks, km, D, VSEL: tl.constexpr, EVW: tl.constexpr, EVV: tl.constexpr):
        """The W_k rows r (NA or BN, BK) where ok, and (VSEL) their W_v^T rows; without VSEL the second
        tile is the first (unused: _early_rows loads the active rows' W_v^T itself)."""
        wk = tl.load(w_p + r[:, None] * D + ks[None, :], mask=ok[:, None] & km[None, :], other=0.0,
                     eviction_policy=EVW)
        vv = wk
        if VSEL:
            vv = tl.load(vt_p + r[:, None] * D + ks[None, :], mask=ok[:, None] & km[None, :], other=0.0,
                         eviction_policy=EVV)
        return wk, vv

    @triton.jit
    def _pf_l2(a, on, nbytes):
        """One cp.async.bulk.prefetch.L2 (sm_90+) of nbytes from each address a (int64) where on: the lines
        come to L2 with no registers held and nothing to wait for (tune early_pf)."""
        tl.inline_asm_elementwise(
            "{ .reg .pred pf; setp.ne.s32 pf, $2, 0; @pf cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [a, on.to(tl.int32), nbytes + on.to(tl.int32) * 0], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _pick(mk, rows, rm, w_p, vt_p, D, ks, km, NA: tl.constexpr, VSEL: tl.constexpr, EVW: tl.constexpr,
              EVV: tl.constexpr, DIAG: tl.constexpr):
        """The selected rows (mask byte 2) of a program's BN rows, the first NA of them gathered (NA 0: all
        of them as one masked tile), their W_k rows loaded (VSEL: and their W_v^T rows).
        Returns sel (BN,), its count, gather positions, rows (NA,), valid (NA,), W_k and W_v^T tiles."""
        sel = rm & (mk == 2)
        if DIAG == 3:
            sel = sel & (rows < 0)
        sl = sel.to(tl.int32)
        ns = tl.sum(sl, axis=0)
        if NA == 0:
            pos, r, ok = sl, rows, sel
        else:
            pos = tl.cumsum(sl, axis=0) - sl
            r, _y, ok = _gather(sel, pos, rows, rows.to(tl.float32), 0, ns, NA)
        wk, vv = _load_rows(w_p, vt_p, r, ok, ks, km, D, VSEL, EVW, EVV)
        return sel, ns, pos, r, ok, wk, vv

    @triton.jit
    def ffn_early(w_p, x_p, k_p, mk_p, F, D, vt_p, xo_p, cnt_p, xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p,
                  err_p, spin, rowb,
                  BN: tl.constexpr, BK: tl.constexpr, MIXIN: tl.constexpr,
                  NA: tl.constexpr, PDL: tl.constexpr, VSEL: tl.constexpr, EVW: tl.constexpr, EVV: tl.constexpr,
                  DIAG: tl.constexpr, READY: tl.constexpr, NAP: tl.constexpr, PF: tl.constexpr):
        """The sparse FFN of BN rows (D <= BK) from the early mask: the selected rows' W_k rows (VSEL: and
        their W_v^T rows, whatever their keys) are loaded BEFORE the wait, NA gathered at a time (the
        first NA before the wait, the rest after), or NA = 0: as one masked (BN, BK) tile. After the wait:
        [MIXIN: LN2 + token shift of the residual xb_p here, as ffn_sparse does (no LN2 mix launch)], keys,
        -1 for the rows not selected, the value partial added to xo_p once per program.
        READY (early_ready): the mask bytes are the flags: poll them (volatile, ~NAP ns apart; READY 2:
        after the trigger, else before it) until every row's byte is non-zero, at most `spin` polls (then
        err_p += 1 and the mask is read again after the wait, when it is complete); reset them to 0 after
        the wait (module docstring).
        DIAG 3 (timing only, wrong results): no rows at all (the bound with the scores off this launch).
        PF (early_pf, bits; before the wait, rowb = bytes of a weight row): 1 L2 prefetch of the W_k rows of
        the selected rows past the first NA (loaded after the wait), 2 of the selected rows' W_v^T rows
        (without VSEL: the active ones are loaded after the keys). Prefetches only: the same results. sm_90+
        (the host passes PF 0 without PDL)."""
        pid = tl.program_id(0)
        rows = pid * BN + tl.arange(0, BN)
        rm = rows < F
        ks = tl.arange(0, BK)
        km = ks < D
        if READY:
            if READY == 2 and PDL:    # trigger first: the next launches are scheduled during the polls
                tl.extra.cuda.gdc_launch_dependents()
            mk = tl.load(mk_p + rows, mask=rm, other=1, volatile=True)
            polls = pid * 0
            while (tl.min(mk.to(tl.int32), axis=0) == 0) & (polls < spin):
                if NAP > 0:
                    tl.inline_asm_elementwise("nanosleep.u32 $1;\n\tmov.u32 $0, $1;", "=r,r", [polls * 0 + NAP],
                                              dtype=tl.int32, is_pure=False, pack=1)
                mk = tl.load(mk_p + rows, mask=rm, other=1, volatile=True)
                polls += 1
        else:   # the mask of the early scores: complete before this launch started (module docstring)
            mk = tl.load(mk_p + rows, mask=rm, other=0, cache_modifier=".cg")
        sel, ns, pos, r, ok, wk, vv = _pick(mk, rows, rm, w_p, vt_p, D, ks, km, NA, VSEL, EVW, EVV, DIAG)
        if PF % 2 == 1 and NA > 0:
            _pf_l2((w_p + rows.to(tl.int64) * D).to(tl.int64), sel & (pos >= NA), rowb)
        if PF // 2 % 2 == 1 and not VSEL:
            _pf_l2((vt_p + rows.to(tl.int64) * D).to(tl.int64), sel, rowb)
        if READY == 2:
            if PDL:
                tl.extra.cuda.gdc_wait()
        else:
            _sync(PDL)
        if READY:
            if tl.min(mk.to(tl.int32), axis=0) == 0:   # the polls ran out: count it, take the whole mask now
                tl.atomic_add(err_p, 1, sem="relaxed")
                mk = tl.load(mk_p + rows, mask=rm, other=0, volatile=True)
                sel, ns, pos, r, ok, wk, vv = _pick(mk, rows, rm, w_p, vt_p, D, ks, km, NA, VSEL, EVW, EVV, DIAG)
            tl.store(mk_p + rows, tl.zeros((BN,), tl.int8), mask=rm)    # not scored: for the next step
        sl = sel.to(tl.int32)
        if MIXIN:
            xv = _ln_mix(xb_p, prev_p, mix_p, lnw_p, lnb_p, new_p, D, ks, km, pid == 0)
        else:
            xv = tl.load(x_p + ks, mask=km, other=0.0)
        tl.store(k_p + rows, tl.full((BN,), -1.0, tl.float32), mask=rm & (sl == 0))  # -1: not predicted
        acc, na = _early_rows(w_p, vt_p, r, ok, ks, km, D, xv, k_p, wk, vv, VSEL, EVV)
        if NA > 0:
            for c0 in range(NA, ns, NA):   # more than NA selected rows: the rest after the wait
                r, _y, ok = _gather(sel, pos, rows, rows.to(tl.float32), c0, ns, NA)
                wk, vv = _load_rows(w_p, vt_p, r, ok, ks, km, D, VSEL, EVW, EVV)
                part, n = _early_rows(w_p, vt_p, r, ok, ks, km, D, xv, k_p, wk, vv, VSEL, EVV)
                acc += part
                na += n
        if na > 0:
            tl.atomic_add(xo_p + ks, acc, mask=km, sem="relaxed")
        tl.atomic_add(cnt_p, ns, sem="relaxed")
        tl.atomic_add(cnt_p + 1, na, sem="relaxed")

    _K.update(score_early=score_early, gemv_early=gemv_early, att_head_early=att_head_early, ffn_early=ffn_early)
    return _K
