"""`FusedDecode`: batch-1 RWKV-7 decode on the CUDA backend in seven Triton launches per layer, with
a dense, an exact-sparse or a predicted-sparse FFN, captured once as a CUDA graph (six launches
per layer in the sparse modes: the value rows are added inside the key kernel).

    dec = FusedDecode(model, mode="exact")              # model built with the cuda backend
    dec = FusedDecode(model, mode="predicted", bundle=b) # a bundle of n-bit W_k threshold predictors
    dec.reset(state); logits = dec.step(token)            # (V,) float32 device tensor, state in place
    dec.stats()                                           # densities counted on the device

Modes (the FFN of every layer; the rest of the step is the same):
  dense      relu(W_k xk)^2 over all F neurons, then all F rows of W_v^T.
  exact      the same keys, then only the W_v^T rows whose activation is non-zero (the zero rows'
             loads are masked off, so their bytes are never read): lossless, no predictor.
  predicted  the bundle's n-bit W_k (packed codes read on the device) scores every neuron; only
             the W_k rows scoring >= the layer's threshold are read, then only the non-zero W_v^T
             rows. Same math as `sparse.SparseFFN` with that predicted set.
The active set lives on the device: by default each key program adds the value rows of its own
active neurons (a mask over its rows); with tune fused_value=False the key kernel appends the
active rows to a per-layer list of capacity F (one atomic slot per program) for a second launch.
Either way nothing can overflow or be dropped (the overflow count is 0 by construction) and no host
synchronisation is needed, so the step captures as one graph (graph=False launches the same
kernels eagerly, for timing the capture's effect). Predicted and active neuron counts are summed
per layer on the device (atomic adds) and read by `stats()` (a host sync).

Building rebinds the model's own weights (a transform, not a fork): per layer, att r/k/v and the
transposed LoRA first stages (w1, a1, g1, v1) become views of one stacked matrix so that a single
launch reads them all, and (sparse modes) ffn.value becomes a view of its transpose (F, D); the model's other code
paths compute the same numbers on the views, and no weight is held twice. Activations, state and
accumulation are float32; weights stay in the backend's storage dtype. See cuda_decode_kernels.py.

Measured on an H200: docs/cuda_decode_history.md keeps every earlier session's figures (sessions 1-10:
PDL, the fused value rows, eviction hints, gathered predicted programs, the bound: at 1.5B shapes an FFN
launch that reads no rows is 1.52x dense, predicted with scores alone 1.25x, the byte-wise 2-bit scores
costing ~150 us a token after the PDL wait).

Session 11: early scores of ln1 (cuda_decode_early.py), 1.5B 897 us (1.18x dense). Session 12: early bundles
with a diagonal map (the LN1 mix writes z = ln1 * d + c + mix * prev), 1.5B 900 us (1.179x); real rwkv7-ref-58m
dense 173.5, predicted (q2.npz) 198.7, early diag 183.1 (tools/gpu_early_real.py). Session 14: the early scores
as dp4a int dot products with an int8 copy of z (early_dp4a, cuda_decode_score.py): 1.5B 850 (1.247x), real
58M 178.0 against 190.3 byte-wise (dense 174.2) at the same KLD; the details in the history file.
"""
from __future__ import annotations

import math

import torch

from .cuda_decode_early import EARLY_BUNDLE_TUNE, early_auto, early_bundle_params
from .cuda_decode_early import kernels as early_kernels
from .cuda_decode_score import repack_dp4a
from .cuda_decode_kernels import kernels
from .cuda_decode_pipe import kernels as pipe_kernels

MODES = ("dense", "exact", "predicted")
_BIG = 1 << 30
# Launch shapes (any values give the same results; tools/gpu_decode_tune.py searches them on a GPU):
# GEMV tiles gemv_bn rows x the whole width when it is <= full_k (one load per program, issued
# before the PDL wait) else gemv_bk columns per loop step; the FFN key kernel's key_bn rows; the
# dense FFN value GEMV's value_bn rows of W_v (D, F); the sparse value kernel's value_bs listed rows
# x value_bd columns with ~value_per_sm programs per SM; warps per kind of kernel (None: by width);
# pdl: programmatic dependent launch (used on compute capability >= 9 only); fused_value: the sparse
# modes add the value rows inside the key kernel (fused_key_bn rows per program, key_value_bd
# columns per step) instead of listing the active rows for a second launch.
# gather_na > 0 (None: 8 in the predicted mode when the weights do not fit in L2 as for the eviction hints
# below, else 0): the sparse modes run `ffn_sparse` (sparse_bn rows per program, sparse_warps warps),
# which gathers the selected/active rows gather_na at a time instead of masking a (rows, D) tile
# (whole-width D only, and a power-of-two D and group count in the predicted mode; else the older
# kernel runs); fuse_ffn_mix: LN2 + the FFN token shift inside the FFN kernel (no mix launch).
# pipe_bn > 0: the exact mode runs `ffn_pipe` (cuda_decode_pipe.py): ~pipe_per_sm persistent programs
# per SM (pipe_warps warps) loop over tiles of pipe_bn rows, the next tile's W_k rows issued before
# this tile's value rows (whole width, D a power of two; gather_na takes precedence); pipe_defer: each
# tile's value rows summed one iteration later; pipe_stages: Triton's num_stages for that launch.
# score_perm: predicted scores from the codes as int32 words against a permuted copy of the FFN input
# that the LN2 mix launch writes (cuda_decode_score.py; power-of-two D and group count, whole words a
# group, not with fuse_ffn_mix); else byte-wise scores with int-to-float conversions.
# L2 eviction policies ("", "evict_first", "evict_last"): evict_stream on the GEMV weight tiles,
# evict_key on the W_k rows (None: as evict_stream), evict_value on the sparse W_v^T rows; None for
# evict_stream / evict_value: "evict_first" / "evict_last" when the weights read per token (dense)
# are <= evict_auto_l2x times the L2 size, else "" (see the measurements above).
# early_scores > 0 (predicted mode, D and the group count powers of two, whole width): the predictor
# scores layer L's LN1 output instead of its FFN input (the bundle's thresholds must be calibrated on
# that vector), in extra programs of the att_head launch (1) or of the stacked GEMV launch (2) or in a
# launch of its own after the LN1 mix (3), early_bn rows a scoring program; the FFN (`ffn_early`,
# early_ffn_bn rows, early_warps warps) loads the selected rows before its PDL wait, early_na at a time
# (0: one masked tile), with (early_vsel) or without their W_v^T rows (cuda_decode_early.py); None: 8-row
# masked tiles where the weights fit in L2 as for the eviction hints, else 8 of 32 rows at a time (session 11).
# Measured best: early_scores 2 with fuse_ffn_mix (the LN2 mix inside the FFN launch). early_ready: the mask
# bytes are per-row ready flags that ffn_early polls (early_spin polls at most, ~early_nap ns apart; stats()
# counts expired polls; 2: it triggers before the polls) instead of one launch waiting first (cuda_decode_early.py):
# 1.5B +1.2-1.9%, 58M -8% (session 12, docs/cuda_decode_history.md), so off by default. early_dp4a: the early
# scores as int dot products (dp4a) of the codes with an int8 copy of the scored vector (cuda_decode_score.py);
# on, with early_bn 16, for early bundles (EARLY_BUNDLE_TUNE: session 14, 1.5B 1.18x -> 1.25x dense); early
# bundles also get EARLY_BUNDLE_AUTO by size (2 warps in L2; else no early_vsel, GEMV evict_first, early_pf 1).
TUNE = dict(gemv_bn=4, gemv_bk=1024, full_k=8192, gemv_warps=4, key_bn=8, key_bk=1024, key_warps=4,
            value_bn=4, value_warps=8, value_bs=64, value_bd=256, value_per_sm=2, head_warps=8,
            mix_warps=None, pdl=True, fused_value=True, fused_key_bn=16, key_value_bd=2048,
            gather_na=None, sparse_bn=32, sparse_warps=4, fuse_ffn_mix=False, split_value=None, diag=0,
            split_warps=4, value_on_sel=False, evict_stream=None, evict_value=None, evict_key=None,
            evict_auto_l2x=2.0, pred_key_bn=8, pipe_bn=0, pipe_per_sm=2, pipe_warps=8, pipe_defer=False,
            pipe_stages=None, score_perm=False, early_scores=0, early_bn=8, early_ffn_bn=None, early_na=None,
            early_warps=4, early_vsel=True, early_ready=0, early_spin=1 << 22, early_nap=0,
            early_dp4a=False, early_pf=0)

def _p2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _rebind_block(b, i: int, D: int):
    """Stack att r/k/v and the LoRA first stages of block b (in place, as views); returns
    [(matrix, [(rows, input index)])]: one entry per storage dtype (usually one)."""
    lora = [(b.w1, 1), (b.a1, 4), (b.g1, 5)] + ([(b.v1, 3)] if i > 0 else [])
    parts = [(b.att_r, 0), (b.att_k, 2), (b.att_v, 3)] + [(m.t(), x) for m, x in lora]
    groups = []
    for p, x in parts:                                  # consecutive parts of one dtype share a matrix
        if groups and groups[-1][0][0].dtype == p.dtype:
            groups[-1].append((p, x))
        else:
            groups.append([(p, x)])
    out, names = [], ["att_r", "att_k", "att_v", "w1", "a1", "g1", "v1"]
    k = 0
    for g in groups:
        cat = torch.cat([p for p, _ in g], dim=0).contiguous()
        r0 = 0
        for p, _ in g:
            view = cat[r0:r0 + p.shape[0]]
            setattr(b, names[k], view if k < 3 else view.t())   # LoRA matrices keep their (D, L) shape
            r0 += p.shape[0]
            k += 1
        out.append((cat, [(p.shape[0], x) for p, x in g]))
    return out


def _seg_tables(segs, dev):
    ends, xs, r = [], [], 0
    for n, x in segs:
        r += n
        ends.append(r)
        xs.append(x)
    nseg = _p2(len(ends))
    ends += [_BIG] * (nseg - len(ends))
    xs += [0] * (nseg - len(xs))
    bn = 16
    while any(n % bn for n, _ in segs):
        bn //= 2
    return (torch.tensor(ends, dtype=torch.int32, device=dev), torch.tensor(xs, dtype=torch.int32, device=dev),
            nseg, bn)


class FusedDecode:
    def __init__(self, model, mode: str = "dense", bundle=None, graph: bool = True, tune: dict | None = None):
        unknown = sorted(set(tune or {}) - set(TUNE))   # a knob that is gone or misspelt would time the default
        if unknown:
            raise ValueError(f"unknown tune keys {', '.join(unknown)} (cuda_decode.TUNE lists the knobs)")
        if getattr(model.ops, "name", "") != "cuda" or model.config.version != "x070":
            raise ValueError("FusedDecode needs an RWKV-7 (x070) model built with the cuda backend")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}, choose one of {', '.join(MODES)}")
        if (mode == "predicted") != (bundle is not None):
            raise ValueError("mode 'predicted' needs a predictor bundle (and only it takes one)")
        from . import cuda as C

        self.C, self.model, self.mode, self.K = C, model, mode, kernels()
        ebun = getattr(bundle, "input", "ffn") == "early"   # scores z = ln1 * d + c + mix * prev (early.py)
        self.tune = {**TUNE, **(EARLY_BUNDLE_TUNE if ebun else {}), **(tune or {})}
        cfg = model.config
        L, D, F, H, N = cfg.n_layer, cfg.n_embd, cfg.ffn_dim, cfg.n_head, cfg.head_size
        if N & (N - 1):
            raise ValueError(f"head size {N} must be a power of two")
        self.L, self.D, self.F, self.H, self.N = L, D, F, H, N
        dev = C.device()
        f32 = lambda a: C._dev_f32(a).reshape(-1)  # noqa: E731
        self.emb = C._device_emb(model.emb)
        model.emb = self.emb                       # the host copy is no longer needed
        self.layers = []
        for i, b in enumerate(model.blocks):
            lay = dict(ln1=(f32(b.ln1_w), f32(b.ln1_b)), ln2=(f32(b.ln2_w), f32(b.ln2_b)),
                       amix=torch.stack([f32(getattr(b, "x_" + c)) for c in "rwkvag"]).contiguous(),
                       fmix=f32(b.ffn_xk).reshape(1, D).contiguous(),
                       w0=f32(b.w0), a0=f32(b.a0), v0=f32(b.v0) if i else f32(b.w0), kk=f32(b.k_k),
                       ka=f32(b.k_a), rk=f32(b.r_k), lnx=(f32(b.lnx_w), f32(b.lnx_b)),
                       w2=b.w2.contiguous(), a2=b.a2.contiguous(), g2=b.g2.contiguous(),
                       v2=(b.v2 if i else b.w2).contiguous(),
                       lw=b.w1.shape[1], la=b.a1.shape[1], lg=b.g1.shape[1], lv=b.v1.shape[1] if i else 0,
                       att_o=b.att_o, key=b.ffn_key)
            lay["mats"] = [(m,) + _seg_tables(s, dev) for m, s in _rebind_block(b, i, D)]
            if mode == "dense":                    # W_v (D, F): a plain GEMV, residual as its base
                lay["wv"] = b.ffn_value = b.ffn_value.contiguous()
            else:                                  # (F, D): one neuron's value column per row
                vt = b.ffn_value.t().contiguous()
                b.ffn_value = vt.t()
                lay["wv"] = vt
            self.layers.append(lay)
        self.ln0 = tuple(f32(t) for t in model.ln0)
        self.ln_out = tuple(f32(t) for t in model.ln_out)
        self.head = model.head
        self.pred = None
        if mode == "predicted":
            self.pred = [self._predictor(p, D, dev) for p in getattr(bundle, "predictors", [])]
            if len(self.pred) != L:
                raise ValueError("the predicted mode needs one n-bit W_k threshold predictor per layer "
                                 "(a --kind quantized bundle)")
        # static buffers: x, the six mixed inputs, r/k/v + LoRA hiddens, head outputs, FFN input,
        # keys of every layer (kept for tests: -1 = not predicted), logits
        z = lambda *s: torch.zeros(s, dtype=torch.float32, device=dev)  # noqa: E731
        ny1 = 3 * D + max(l["lw"] + l["la"] + l["lg"] + l["lv"] for l in self.layers)
        self.x, self.x6, self.y1, self.yg, self.xk = z(D), z(6, D), z(ny1), z(D), z(D)
        self.kbuf, self.vfirst, self.xo = z(L, F), z(D), z(D)
        self.xb, self.fnew = z(D), z(L, D)        # fused FFN mix: post-attention residual, new ffn_x rows
        full = _p2(D) <= self.tune["full_k"]
        one = D == _p2(D) and all(p["g"] == _p2(p["g"]) for p in self.pred or [])
        tn, self.vsel = self.tune, False            # (vsel: read by bytes_per_token, set below)
        l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) if dev.type == "cuda" else 0
        small = self.bytes_per_token(1.0) <= tn["evict_auto_l2x"] * l2    # the weights mostly fit in L2
        early_auto(tn, tune or {}, small, ebun)    # early_na / early_ffn_bn None, an early bundle's size rule
        if tn["gather_na"] is None:   # auto: gathered predicted programs where the weights stream from HBM
            tn["gather_na"] = 8 if mode == "predicted" and not small else 0
        self.gather = mode != "dense" and tn["gather_na"] > 0 and full and (mode == "exact" or one)
        self.pipe = mode == "exact" and self.tune["pipe_bn"] > 0 and not self.gather and full and D == _p2(D)
        if self.pipe:
            self.K = dict(self.K, **pipe_kernels())
        self.early = int(tn["early_scores"]) if mode == "predicted" and one and full else 0
        if ebun and not self.early:
            raise ValueError("an early bundle needs tune early_scores > 0, a power-of-two width and group count")
        self.ezp = early_bundle_params(bundle, D, dev) if ebun else None     # (L, 3, D): [d; c; mix]
        self.ez = z(L, D) if ebun else None         # z of every layer (the LN1 mix writes it, the scores read it)
        self.dp4a = bool(self.early and tn["early_dp4a"])   # its int8 copy (quant_x: D / 4 words, 2 G floats)
        if self.dp4a and any(p["bits"] not in (1, 2, 4) or p["gs"] % (32 // p["bits"]) for p in self.pred):
            raise ValueError("early_dp4a needs 1, 2 or 4-bit codes and whole int32 words a group")
        for p in self.pred if self.dp4a else ():
            p["qd"] = repack_dp4a(p["q"], p["bits"])
        self.eq = z(L, D // 4 + 2 * max(p["g"] for p in self.pred)) if self.dp4a else None
        self.gather = self.gather and not self.early
        self.mixin = bool(self.tune["fuse_ffn_mix"]) and full and (mode == "dense" or self.gather or self.pipe
                                                                   or self.early in (2, 3))
        self.words = (mode == "predicted" and bool(tn["score_perm"]) and one and not self.mixin and not self.early
                      and all(p["qw"] is not None for p in self.pred))
        self.xp = z(D + max(D // p["gs"] for p in self.pred) if self.words else 1)   # perm_x's copy of xk
        if self.early:
            self.K = dict(self.K, **early_kernels())
        self.emask = torch.zeros((L, F) if self.early else (1, 1), dtype=torch.int8, device=dev)  # early masks
        self.ready = int(tn["early_ready"]) if self.early else 0
        self.eerr = torch.zeros(1, dtype=torch.int32, device=dev)   # early_ready: mask polls that ran out
        # predicted, fused value: W_v^T rows of the selected (not active) rows, early
        self.vsel = (mode == "predicted" and bool(tn["value_on_sel"]) and tn["fused_value"] and not self.gather
                     and tn["split_value"] is None and full and _p2(D) <= tn["key_value_bd"])
        for k, v in (("evict_stream", "evict_first"), ("evict_value", "evict_last")):
            if tn[k] is None:
                tn[k] = v if small else ""
        # sparse FFN value launch: (D / BD column blocks) x (NS splits of the active-row list), each
        # split taking every NS-th block of BS listed rows; ~value_per_sm programs per SM
        nsm = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        self.pdl = bool(tn["pdl"]) and dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9
        self.bd, self.bs = min(tn["value_bd"], _p2(D)), tn["value_bs"]
        nd = -(-D // self.bd)
        self.ns = max(1, min(-(-F // self.bs), -(-tn["value_per_sm"] * nsm // nd)))
        self.pipe_grid = min(-(-F // max(1, tn["pipe_bn"])), max(1, int(tn["pipe_per_sm"] * nsm)))
        self.idx = torch.zeros((L, F), dtype=torch.int32, device=dev)    # active rows per layer
        self.slot = torch.zeros((L, 2), dtype=torch.int32, device=dev)   # per step: rows read, listed
        self.logits = z(model.config.vocab_size)
        self.cnt = torch.zeros((L, 2), dtype=torch.int32, device=dev)   # running sums of slot
        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.st = C.adopt_state(model.zero_state())
        self.n_steps = 0
        self.graph = None
        self._forward()                             # compile every kernel outside a capture
        torch.cuda.synchronize(dev)
        if graph:
            s = torch.cuda.Stream(device=dev)
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                self._forward()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._forward()
        self.reset(None)

    @staticmethod
    def _predictor(p, D, dev):
        qm = getattr(p, "qm", None)
        if qm is None or getattr(p, "mode", "") != "threshold":
            raise ValueError("the predicted mode needs n-bit W_k threshold predictors (--kind quantized)")
        gs = qm.group_size or D
        per = 8 // qm.bits
        if gs & (gs - 1) or gs % per or (gs // per) & (gs // per - 1):
            raise ValueError(f"predictor group size {gs} must be a power of two")
        t = lambda a: torch.from_numpy(a).to(dev).contiguous()  # noqa: E731
        q = t(qm.packed)
        words = qm.bits in (1, 2, 4, 8) and (gs // per) % 4 == 0 and q.shape[1] % 4 == 0
        return dict(q=q, s=t(qm.scale), z=t(qm.zero), thr=float(p.calib.threshold), bits=qm.bits, gs=gs,
                    g=D // gs, per=per, qw=q.view(torch.int32) if words else None)

    # --- the step ---------------------------------------------------------------------------
    def _kw(self, warps, stages=None):
        kw = dict(num_warps=warps, launch_pdl=True) if self.pdl else dict(num_warps=warps)
        return kw if stages is None else dict(kw, num_stages=stages)   # stages: Triton's loop pipelining

    def _escore(self, i):
        """Layer i's early-score arguments: runtime (scored vector, codes, scales, zeros, threshold, mask, F)
        and constexpr (SBN, BITS, PER, NB, GC); the grid of scoring programs."""
        p, bn = self.pred[i], self.tune["early_bn"]
        ex = self.st.att_x[i] if self.ez is None else self.ez[i]     # ln1, or an early bundle's z
        ex, q = (self.eq[i], p["qd"]) if self.dp4a else (ex, p["q"])
        return ((ex, q, p["s"], p["z"], p["thr"], self.emask[i], self.F),
                dict(SBN=bn, BITS=p["bits"], PER=p["per"], NB=p["gs"] // p["per"], GC=p["g"], DP4A=self.dp4a),
                -(-self.F // bn))

    def _gemv(self, W, x, y, base=None, seg=None, act=0, bn=4, warps=None, y2=None, score=None):
        # tiles of BN rows x the whole width (<= full_k): one load per program, issued before the
        # PDL wait, and thousands of programs, so that the HBM pipe stays full (BN divides every segment)
        n, k = W.shape
        ends, xs, nseg = seg if seg is not None else (y, y, 1)
        full = _p2(k) <= self.tune["full_k"]
        args, kw, nsc = score or ((), {}, 0)    # early scores: nsc scoring programs first (gemv_early)
        args = args + (nsc,) if score else ()
        self.K["gemv_early" if score else "gemv"][(nsc + -(-n // bn),)](
                                       W, x, y, base if base is not None else y, ends, xs, n, k,
                                       y2 if y2 is not None else y, *args, **kw,
                                       BN=bn, BK=_p2(k) if full else min(self.tune["gemv_bk"], _p2(k)), NSEG=nseg,
                                       ACT=act, ADD=base is not None, FULL=full, PDL=self.pdl, DUAL=y2 is not None,
                                       EVW=self.tune["evict_stream"],
                                       **self._kw(warps or self.tune["gemv_warps"]))

    def _mix(self, emb: bool, ln, prev, mix, out, nmix, copy=None, perm=None, wfirst=False, ez=None, eq=None):
        D = self.D
        cp = copy or (out, out)
        use_ez, ez = ez is not None, ez or (out, out, out)   # (z out, [d; c; mix], FFN shift state)
        self.K["mix"][(1,)](self.x, self.emb, self.tok, self.ln0[0], self.ln0[1], ln[0], ln[1],
                            prev, mix, out, D, 1e-5, cp[0], cp[1], self.xp, *ez, out if eq is None else eq[0],
                            BD=_p2(D), EMB=emb, NMIX=nmix,
                            BM=_p2(max(1, nmix)), PDL=self.pdl, COPY=copy is not None,
                            PBITS=perm["bits"] if perm else 0, PGS=perm["gs"] if perm else 1, WFIRST=wfirst,
                            EZ=use_ez, QGS=0 if eq is None else eq[1],
                            **self._kw(self.tune["mix_warps"] or (4 if D <= 1024 else 16)))

    def _forward(self):
        K, D, F, N, tn = self.K, self.D, self.F, self.N, self.tune
        st = self.st
        sparse = self.mode != "dense"
        fv = tn["fused_value"]
        mixin = self.mixin
        evk = tn["evict_stream"] if tn["evict_key"] is None else tn["evict_key"]   # W_k rows' L2 hint
        for i, lay in enumerate(self.layers):
            self._mix(i == 0, lay["ln1"], st.att_x[i], lay["amix"], self.x6, 6,
                      ez=(self.ez[i], self.ezp[i], st.ffn_x[i]) if self.ez is not None else None,
                      eq=(self.eq[i], self.pred[i]["gs"]) if self.dp4a else None)
            sc = self._escore(i) if self.early else None
            if self.early == 3:   # early scores in their own launch (reads the LN1 output st.att_x[i])
                K["score_early"][(sc[2],)](*sc[0], **sc[1], PDL=self.pdl, **self._kw(tn["key_warps"]))
            r0 = 0
            for m, ends, xs, nseg, bn in lay["mats"]:
                self._gemv(m, self.x6, self.y1[r0:r0 + m.shape[0]], seg=(ends, xs, nseg),
                           bn=min(bn, tn["gemv_bn"]), score=sc if self.early == 2 and r0 == 0 else None)
                r0 += m.shape[0]
            cp = (self.fnew[i - 1], st.ffn_x[i - 1]) if mixin and i else (self.yg, self.yg)
            eh = self.early == 1    # att_head_early: the H heads, then the scoring programs
            head = K["att_head_early"] if eh else K["att_head"]
            head[(self.H + (sc[2] if eh else 0),)](self.y1, D, lay["lw"], lay["la"], lay["lg"], lay["lv"], lay["w2"],
                                     lay["a2"],
                                     lay["g2"], lay["v2"], lay["w0"], lay["a0"], lay["v0"], lay["kk"], lay["ka"],
                                     lay["rk"], lay["lnx"][0], lay["lnx"][1], self.vfirst, st.wkv[i], self.yg,
                                     self.slot[i], cp[0], cp[1], *((self.H,) + sc[0] if eh else ()),
                                     **(sc[1] if eh else {}), N=N, BLW=_p2(lay["lw"]), BLA=_p2(lay["la"]),
                                     BLG=_p2(lay["lg"]), BLV=_p2(max(1, lay["lv"])), FIRST=i == 0, PDL=self.pdl,
                                     COPY=mixin and i > 0, WFIRST=self.early in (2, 3) and not self.ready,
                                     **self._kw(tn["head_warps"]))
            if mixin:   # x stays the layer input; xb = x + att (the FFN's LN input); sparse: x = xb too
                self._gemv(lay["att_o"], self.yg, self.xb, base=self.x, bn=min(4, tn["gemv_bn"]),
                           y2=self.x if sparse else None)
            else:
                self._gemv(lay["att_o"], self.yg, self.x, base=self.x, bn=min(4, tn["gemv_bn"]))
                # early scores in att_head (1): this launch waits before it triggers, so that the FFN launch
                # (which reads the mask before its own wait) starts only after att_o, hence att_head, completed
                # (2, 3: att_head waits first; cuda_decode_early.py gives the reasoning)
                self._mix(False, lay["ln2"], st.ffn_x[i], lay["fmix"], self.xk, 1,
                          perm=self.pred[i] if self.words else None, wfirst=self.early == 1 and not self.ready)
            mx = (self.xb, st.ffn_x[i], lay["fmix"], lay["ln2"][0], lay["ln2"][1], self.fnew[i])
            if self.early:    # the sparse FFN from the early mask (cuda_decode_early.ffn_early)
                bn = tn["early_ffn_bn"]
                if tn["diag"] != 4:   # (diag 4, timing only: no FFN launch)
                    K["ffn_early"][(-(-F // bn),)](
                        lay["key"], self.xk, self.kbuf[i], self.emask[i], F, D, lay["wv"], self.x, self.cnt[i], *mx,
                        self.eerr, tn["early_spin"], D * lay["key"].element_size(), BN=bn, BK=_p2(D), MIXIN=mixin,
                        NA=tn["early_na"], PDL=self.pdl, VSEL=bool(tn["early_vsel"]), EVW=evk, EVV=tn["evict_value"],
                        DIAG=tn["diag"], READY=self.ready, NAP=tn["early_nap"], PF=int(tn["early_pf"]) * self.pdl,
                        **self._kw(tn["early_warps"]))
                continue
            p = self.pred[i] if self.pred else None
            wq = dict(xp_p=self.xp, WORDS=self.words, WPG=max(1, p["gs"] // p["per"] // 4) if p else 1)
            q = p or dict(q=self.xk, s=self.xk, z=self.xk, thr=0.0, bits=8, gs=1, g=0, per=1)
            if self.gather:   # the whole sparse FFN, rows gathered (see ffn_sparse)
                bn = tn["sparse_bn"]
                K["ffn_sparse"][(-(-F // bn),)](
                    lay["key"], self.xk, self.kbuf[i], q["qw"] if self.words else q["q"], q["s"], q["z"], q["thr"],
                    F, D, lay["wv"], self.x,
                    self.cnt[i], *mx, BN=bn, BK=_p2(D), PRED=p is not None, BITS=q["bits"], PER=q["per"],
                    NB=q["gs"] // q["per"], GC=max(1, q["g"]), MIXIN=mixin, NA=tn["gather_na"], PDL=self.pdl,
                    **wq, **self._kw(tn["sparse_warps"]))
                continue
            if self.pipe:     # the whole exact FFN, persistent programs over row tiles (see ffn_pipe)
                bn = tn["pipe_bn"]
                K["ffn_pipe"][(self.pipe_grid,)](
                    lay["key"], self.xk, self.kbuf[i], F, D, lay["wv"], self.x, self.cnt[i], -(-F // bn),
                    self.pipe_grid, *mx, BN=bn, BK=D, MIXIN=mixin, PDL=self.pdl, EVW=evk,
                    EVV=tn["evict_value"], DEFER=bool(tn["pipe_defer"]),
                    **self._kw(tn["pipe_warps"], tn["pipe_stages"]))
                continue
            if tn["diag"] == 4:   # timing only, wrong results: no FFN launch at all (the LN2 mix stays)
                continue
            one = q["g"] > 0 and q["g"] == _p2(q["g"]) and D == _p2(D)
            full = _p2(D) <= tn["full_k"]
            split = sparse and tn["split_value"] is not None    # (BF, BD): keys, then ffn_vsplit
            fv = fv and not split
            kbn = (tn["pred_key_bn"] if p else tn["fused_key_bn"]) if sparse and fv else tn["key_bn"]
            K["ffn_key"][(-(-F // kbn),)](
                lay["key"], self.xk, self.kbuf[i], self.idx[i], q["qw"] if self.words else q["q"], q["s"], q["z"],
                q["thr"], self.slot[i],
                F, D, q["g"], lay["wv"], self.x, self.cnt[i], *mx, BN=kbn,
                BK=_p2(D) if full else min(tn["key_bk"], _p2(D)), PRED=p is not None,
                BITS=q["bits"], GS=q["gs"], PER=q["per"], NB=q["gs"] // q["per"], ONESHOT=one,
                GC=q["g"] if one else 1, FULL=full, COMPACT=sparse and not fv, PDL=self.pdl, VALUE=sparse and fv,
                BVD=min(_p2(D), tn["key_value_bd"]), MIXIN=mixin, DIAG=tn["diag"], COUNT=split and p is not None,
                VSEL=self.vsel, EVW=evk, EVV=tn["evict_value"], **wq,
                **self._kw(tn["key_warps"]))
            if split:
                bf, bd = tn["split_value"]
                bd = min(bd, _p2(D))
                K["ffn_vsplit"][(-(-F // bf), -(-D // bd))](lay["wv"], self.kbuf[i], self.x, self.cnt[i], F, D,
                                                          BF=bf, BD=bd, PDL=self.pdl, **self._kw(tn["split_warps"]))
            elif sparse and not fv:   # only the listed (active) rows of W_v^T
                K["ffn_value"][(-(-D // self.bd), self.ns)](lay["wv"], self.kbuf[i], self.idx[i], self.slot[i],
                                                             self.cnt[i], self.x, D, self.ns, BD=self.bd, BS=self.bs,
                                                             PDL=self.pdl, **self._kw(tn["value_warps"]))
            elif not sparse:   # x += W_v k over all F neurons (fused mix: x = xb + W_v k)
                self._gemv(lay["wv"], self.kbuf[i], self.x, base=self.xb if mixin else self.x, bn=tn["value_bn"],
                           warps=tn["value_warps"])
        L = self.L
        self._mix(False, self.ln_out, self.xo, self.xo, self.xo, 0,
                  copy=(self.fnew[L - 1], st.ffn_x[L - 1]) if mixin else None)
        self._gemv(self.head, self.xo, self.logits, bn=tn["gemv_bn"])
        return self.logits

    # --- public -----------------------------------------------------------------------------
    def reset(self, state=None) -> None:
        """Copy a State (host or device; None: zeros) into the step's buffers; zero the counters."""
        src = self.C.adopt_state(self.model.zero_state() if state is None else state)
        for f in ("att_x", "wkv", "ffn_x"):
            getattr(self.st, f).copy_(getattr(src, f))
        self.cnt.zero_()
        self.emask.zero_()    # early_ready: 0 = not scored yet (ffn_early leaves them so after every step)
        self.n_steps = 0

    def step(self, token) -> torch.Tensor:
        """One token (int or device tensor): logits (V,) float32 on the device, state advanced."""
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.reshape(1))
        else:
            self.tok.fill_(int(token))
        if self.graph is not None:
            self.graph.replay()
        else:
            self._forward()
        self.n_steps += 1
        return self.logits

    def state(self):
        return self.st.copy()

    def stats(self) -> dict:
        """Per-token FFN densities since reset, summed over layers on the device: `read` = key rows
        read (1.0 unless predicted), `active` = neurons with relu(k)^2 > 0 = W_v^T rows read (None in
        the dense mode, which counts nothing); early_ready: `early_timeouts` = FFN programs whose mask polls
        ran out since construction (must stay 0; their mask was read again after the wait). A host sync."""
        c = self.cnt.sum(0).tolist()
        tot = max(1, self.n_steps * self.L * self.F)
        out = {"steps": self.n_steps, "read_density": round(c[0] / tot, 4) if self.pred else 1.0,
               "active_density": round(c[1] / tot, 4) if self.mode != "dense" else None}
        return dict(out, early_timeouts=int(self.eerr.item())) if self.ready else out

    def bytes_per_token(self, density: float | None = None) -> int:
        """Weight bytes one step must read (each needed byte once): the roof's numerator."""
        it = lambda t: t.numel() * t.element_size()  # noqa: E731
        s = self.stats() if density is None else None
        rd = 1.0 if self.mode != "predicted" else (s["read_density"] if s else density)
        ac = 1.0 if self.mode == "dense" else (s["active_density"] if s else density)
        # value rows of every predicted row (value_on_sel; early scores with early_vsel)
        ac = rd if self.vsel or (getattr(self, "early", 0) and self.tune["early_vsel"]) else ac
        n = it(self.head) + self.D * self.emb.element_size()
        for i, lay in enumerate(self.layers):
            n += sum(it(m[0]) for m in lay["mats"]) + it(lay["att_o"])
            n += sum(it(lay[k]) for k in ("w2", "a2", "g2")) + (it(lay["v2"]) if i else 0)
            n += int(rd * it(lay["key"])) + int(ac * it(lay["wv"]))
            if self.pred:
                p = self.pred[i]
                n += it(p["q"]) + it(p["s"]) + it(p["z"])
        return n


def roof_tok_s(bytes_per_token: int, bw: float) -> float:
    return bw / max(1, bytes_per_token) if math.isfinite(bw) else float("nan")
