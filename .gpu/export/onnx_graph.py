"""The ONNX graph of RWKV-7 (x070), built op by op with `onnx.helper` (no tracing).

Two graphs share this code:
- step (`seq=False`): input `token` int64 [1]; the one-token decode step.
- prefill (`seq=True`): input `tokens` int64 [T] (T dynamic); the time-mix recurrence runs in a
  `Scan`, everything else is batched over T; outputs the last token's logits.
Both take every layer's state (`att_x_{i}` [D], `wkv_{i}` [H, N, N], `ffn_x_{i}` [D], float32) and
return `logits` [V] and `new_att_x_{i}`, `new_wkv_{i}`, `new_ffn_x_{i}`.

The FFN is dense, or (`sparse_topk` given) sparse: predictor scores -> `TopK` with a static k per
layer -> `Gather` of the chosen neurons' key rows and value columns (value stored transposed, (F, D),
so both are row gathers) -> relu^2 -> MatMul. Only k of F neurons' weights are read.
The math mirrors rwkv_edge/models/v7.py line for line; shapes in comments are for T tokens.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from .onnx_ops import GraphBuilder, quantize_int8_rows

_DECAY_SCALE = 0.606531  # exp(-0.5), as in v7.py
F32 = TensorProto.FLOAT


def state_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """[(input name, shape)] of the per-layer state tensors, in graph input order."""
    D, H, N = config.n_embd, config.n_head, config.head_size
    specs = []
    for i in range(config.n_layer):
        specs += [(f"att_x_{i}", (D,)), (f"wkv_{i}", (H, N, N)), (f"ffn_x_{i}", (D,))]
    return specs


def _np_layer_norm(x, w, b, eps=1e-5):
    x = x.astype(np.float64)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return ((x - mu) / np.sqrt(var + eps) * w + b).astype(np.float32)


class _RWKV7Graph:
    def __init__(self, model, dtype: str, seq: bool, sparse_topk, predictors, int8_matmul: str,
                 exact_ffn: bool = False):
        self.m, self.cfg, self.seq, self.exact_ffn = model, model.config, seq, exact_ffn
        self.g = GraphBuilder(dtype, int8_matmul=int8_matmul)
        self.topk = sparse_topk
        self.pred = predictors

    # --- token shift: (T, D) of the previous token's vectors, and the new shift state --------
    def shift(self, x: str, prev: str, new_name: str) -> str:
        g, D = self.g, self.cfg.n_embd
        if not self.seq:
            g.reshape(x, [D], out=new_name)
            return prev                                    # (D,) broadcasts against x (1, D)
        last = g.op("Slice", x, g.ints([-1]), g.ints([np.iinfo(np.int64).max]), g.ints([0]))
        g.reshape(last, [D], out=new_name)
        head = g.op("Slice", x, g.ints([0]), g.ints([-1]), g.ints([0]))      # x[:-1]
        return g.op("Concat", g.reshape(prev, [1, D]), head, axis=0)

    # --- wkv7 recurrence ------------------------------------------------------------------
    def _wkv_one(self, g: GraphBuilder, S, r, w, k, v, a, b, hn, s_out):
        """One token: S (H,N,N); r..b flat (H*N) or (1, H*N). Writes S' as `s_out`; returns y (H, N, 1)."""
        H, N = hn
        col = lambda t: g.reshape(t, [H, N, 1])
        row = lambda t: g.reshape(t, [H, 1, N])
        sa = g.op("MatMul", S, col(a))                                       # (H, N, 1)
        S2 = g.add(g.add(g.mul(S, row(w)), g.mul(sa, row(b))), g.mul(col(v), row(k)), out=s_out)
        return g.op("MatMul", S2, col(r))

    def wkv(self, i, S, r, w, k, v, a, b) -> str:
        g, D, H, N = self.g, self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        if not self.seq:
            y = self._wkv_one(g, S, r, w, k, v, a, b, (H, N), f"new_wkv_{i}")
            return g.reshape(y, [1, D])
        # Scan over T: body(S; r_t..b_t (H, N)) -> (S'; y_t (H, N))
        body = GraphBuilder("fp32", prefix=f"scan{i}_")
        ins = ["S_in"] + [f"{c}_t" for c in "rwkvab"]
        body.add_input("S_in", F32, [H, N, N])
        for c in ins[1:]:
            body.add_input(c, F32, [H, N])
        y = self._wkv_one(body, *ins, (H, N), "S_out")
        body.reshape(y, [H, N], out="y_t")
        body.add_output("S_out", F32, [H, N, N])
        body.add_output("y_t", F32, [H, N])
        bg = helper.make_graph(body.nodes, f"wkv_body_{i}", body.inputs, body.outputs, body.inits)
        seqs = [g.reshape(t, [-1, H, N]) for t in (r, w, k, v, a, b)]
        S_out, ys = g.op("Scan", S, *seqs, n_out=2, body=bg, num_scan_inputs=6)
        g.op("Identity", S_out, out=f"new_wkv_{i}")
        return g.reshape(ys, [-1, D])

    # --- blocks ---------------------------------------------------------------------------
    def time_mix(self, i: int, x: str, ctx: dict) -> str:
        g, b, p = self.g, self.m.blocks[i], f"b{i}.att."
        D, H, N = self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size
        xx = g.sub(self.shift(x, f"att_x_{i}", f"new_att_x_{i}"), x)
        if self.seq:
            mix = lambda c: g.add(x, g.mul(xx, g.vec(getattr(b, "x_" + c), p + "x_" + c)))
            xr, xw, xk, xv, xa, xg = (mix(c) for c in "rwkvag")
        else:  # one token: the six mixes as one (6, D) Mul + Add, then Split (fewer nodes per step)
            coef = np.stack([getattr(b, "x_" + c) for c in "rwkvag"])
            mixed = g.add(x, g.mul(xx, g.vec(coef, p + "x_rwkvag")))
            xr, xw, xk, xv, xa, xg = g.op("Split", mixed, g.ints([1] * 6), n_out=6, axis=0)

        r = g.linear(xr, b.att_r, p + "receptance")
        w = g.matmul(g.op("Tanh", g.matmul(xw, b.w1, p + "w1")), b.w2, p + "w2")
        k = g.linear(xk, b.att_k, p + "key")
        v = g.linear(xv, b.att_v, p + "value")
        a = g.op("Sigmoid", g.add(g.vec(b.a0, p + "a0"),
                                  g.matmul(g.matmul(xa, b.a1, p + "a1"), b.a2, p + "a2")))
        gate = g.matmul(g.op("Sigmoid", g.matmul(xg, b.g1, p + "g1")), b.g2, p + "g2")

        kk = g.reshape(g.mul(k, g.vec(b.k_k, p + "k_k")), [-1, H, N])                  # (T, H, N)
        norm = g.op("Sqrt", g.reduce_sum(g.mul(kk, kk)))
        kk = g.reshape(g.op("Div", kk, g.op("Max", norm, g.const(1e-12))), [-1, D])
        # k * (1 + (a - 1) * k_a) = k * ((1 - k_a) + a * k_a)
        k = g.mul(k, g.add(g.vec(1.0 - b.k_a, p + "1-k_a"), g.mul(a, g.vec(b.k_a, p + "k_a"))))
        if i == 0:
            ctx["v_first"] = v
        else:  # value residual towards layer 0's value
            vg = g.op("Sigmoid", g.add(g.vec(b.v0, p + "v0"),
                                       g.matmul(g.matmul(xv, b.v1, p + "v1"), b.v2, p + "v2")))
            v = g.add(v, g.mul(g.sub(ctx["v_first"], v), vg))
        w = g.op("Exp", g.mul(g.const(-_DECAY_SCALE), g.op("Sigmoid", g.add(g.vec(b.w0, p + "w0"), w))))

        y = self.wkv(i, f"wkv_{i}", r, w, k, v, g.op("Neg", kk), g.mul(kk, a))      # (T, D)
        ones, zeros = g.const(np.ones(N)), g.const(np.zeros(N))
        y = g.op("LayerNormalization", g.reshape(y, [-1, H, N]), ones, zeros, axis=-1, epsilon=64e-5)
        y = g.add(g.mul(g.reshape(y, [-1, D]), g.vec(b.lnx_w, p + "ln_x.w")), g.vec(b.lnx_b, p + "ln_x.b"))
        rk = g.mul(g.reshape(g.mul(r, k), [-1, H, N]), g.vec(b.r_k, p + "r_k"))      # (T, H, N)
        bonus = g.mul(g.reduce_sum(rk), g.reshape(v, [-1, H, N]))
        y = g.add(y, g.reshape(bonus, [-1, D]))
        return g.linear(g.mul(y, gate), b.att_o, p + "output")

    def channel_mix(self, i: int, x: str) -> str:
        g, b = self.g, self.m.blocks[i]
        xx = g.sub(self.shift(x, f"ffn_x_{i}", f"new_ffn_x_{i}"), x)
        xk = g.add(x, g.mul(xx, g.vec(b.ffn_xk, f"b{i}.ffn.x_k")))
        if self.exact_ffn:
            return self.skip_zero_ffn(i, xk)
        if self.topk is None:
            h = g.op("Relu", g.linear(xk, b.ffn_key, f"b{i}.ffn.key"))
            return g.linear(g.mul(h, h), b.ffn_value, f"b{i}.ffn.value")
        return self.sparse_ffn(i, xk)

    def scores(self, i: int, xk: str) -> str:
        """Predictor scores (T, F): low-bit quantized matrix, float matrix, or W_k itself (None)."""
        g, p, name = self.g, (self.pred[i] if self.pred is not None else None), f"b{i}.ffn.predictor"
        if p is None:
            return g.linear(xk, self.m.blocks[i].ffn_key, name)
        if isinstance(p, np.ndarray):
            return g.linear(xk, p, name)
        return g.lowbit_scores(xk, p.codes(), p.scale, p.zero, p.bits, name)

    def skip_zero_ffn(self, i: int, xk: str) -> str:
        """The exact sparse FFN of one token: all keys (as the dense graph), then only the W_v rows
        of the neurons with relu(k)^2 > 0 (NonZero -> Gather of their stored rows), so the value
        matrix is read at the active density and the result is the dense graph's."""
        g, b = self.g, self.m.blocks[i]
        h = g.op("Relu", g.linear(xk, b.ffn_key, f"b{i}.ffn.key"))
        h = g.reshape(g.mul(h, h), [-1])                                                  # (F,)
        idx = g.reshape(g.op("NonZero", g.op("Greater", h, g.const(0.0))), [-1])        # (n,)
        # plus neuron 0 with weight 0: the list is never empty and the sum does not change
        hv = g.op("Concat", g.op("Gather", h, idx, axis=0), g.const([0.0]), axis=0)
        idx = g.op("Concat", idx, g.ints([0]), axis=0)
        return g.matmul_rows(g.reshape(hv, [1, -1]), np.asarray(b.ffn_value, np.float32).T, idx,
                             f"b{i}.ffn.value")                                           # (1, D)

    def sparse_ffn(self, i: int, xk: str) -> str:
        g, b, D = self.g, self.m.blocks[i], self.cfg.n_embd
        kk = int(self.topk[i])
        _, idx = g.op("TopK", self.scores(i, xk), g.ints([kk]), n_out=2, axis=-1, largest=1, sorted=0)
        # Key rows (F, D) and value columns stored transposed (F, D): both gathers are row gathers.
        # Two tables, not one (F, 2D) table: splitting the gathered rows costs a copy in onnxruntime.
        p = f"b{i}.ffn."
        if g.dtype == "int8" and g.int8_matmul == "dynamic" and not self.seq:
            # int8 throughout: MatMulInteger on the gathered key and value codes (no float copies)
            idx = g.reshape(idx, [-1])                                                       # (k,)
            h = g.op("Relu", g.rows_dot(xk, b.ffn_key, idx, p + "key_rows"))                  # (1, k)
            return g.matmul_rows(g.mul(h, h), np.asarray(b.ffn_value, np.float32).T, idx, p + "value_rows")
        if g.dtype == "int8":
            (qk, sk), (qv, sv) = quantize_int8_rows(b.ffn_key), quantize_int8_rows(b.ffn_value.T)
            kr = g.op("Cast", g.op("Gather", g.init(qk, p + "key_rows"), idx, axis=0), to=F32)   # (T, k, D)
            vr = g.op("Cast", g.op("Gather", g.init(qv, p + "value_rows"), idx, axis=0), to=F32)
            s_k = g.op("Gather", g.init(sk[:, None], p + "key_rows.scale"), idx, axis=0)       # (T, k, 1)
            s_v = g.op("Gather", g.init(sv[:, None], p + "value_rows.scale"), idx, axis=0)
        else:
            kr = g.gather_rows(b.ffn_key, idx, p + "key_rows")                                  # (T, k, D)
            vr = g.gather_rows(b.ffn_value.T, idx, p + "value_rows")
            s_k = s_v = None
        h = g.op("MatMul", kr, g.op("Unsqueeze", xk, g.ints([-1])))             # (T, k, 1)
        if s_k is not None:
            h = g.mul(h, s_k)
        h = g.op("Relu", h)
        h = g.mul(h, h)
        if s_v is not None:
            h = g.mul(h, s_v)
        out = g.op("MatMul", g.op("Transpose", h, perm=[0, 2, 1]), vr)          # (T, 1, D)
        return g.reshape(out, [-1, D])

    # --- whole graph ----------------------------------------------------------------------
    def build(self) -> onnx.ModelProto:
        g, m, cfg = self.g, self.m, self.cfg
        V = cfg.vocab_size
        if self.seq:
            tok = g.add_input("tokens", TensorProto.INT64, ["T"])
        else:
            tok = g.add_input("token", TensorProto.INT64, [1])
        for name, shape in state_specs(cfg):
            g.add_input(name, F32, list(shape))
        # ln0 folded into the embedding table (an exact per-row function of the row).
        x = g.gather_rows(_np_layer_norm(m.emb, *m.ln0), tok, "emb")                 # (T, D)
        ctx: dict = {}
        for i, b in enumerate(m.blocks):
            x = g.add(x, self.time_mix(i, g.layer_norm(x, b.ln1_w, b.ln1_b, f"b{i}.ln1"), ctx))
            x = g.add(x, self.channel_mix(i, g.layer_norm(x, b.ln2_w, b.ln2_b, f"b{i}.ln2")))
        if self.seq:
            x = g.op("Slice", x, g.ints([-1]), g.ints([np.iinfo(np.int64).max]), g.ints([0]))
        logits = g.linear(g.layer_norm(x, *m.ln_out, "ln_out"), m.head, "head")
        g.reshape(logits, [V], out="logits")
        g.add_output("logits", F32, [V])
        for name, shape in state_specs(cfg):
            g.add_output("new_" + name, F32, list(shape))
        kind = "prefill" if self.seq else "step"
        return g.model(f"rwkv7_{kind}", doc=f"rwkv-edge RWKV-7 {kind} graph, fingerprint {m.fingerprint}")


def build_graph(model, dtype: str = "fp32", sparse_topk: Optional[Sequence[int]] = None,
                predictor_weights: Optional[Sequence] = None, seq: bool = False,
                int8_matmul: str = "dynamic", exact_ffn: bool = False) -> onnx.ModelProto:
    """The ONNX model of one RWKV-7 step (`seq=False`) or of a prefill over T tokens (`seq=True`).

    dtype: "fp32" | "fp16" | "int8" weight storage (see export/onnx_ops.py); state is fp32.
    sparse_topk: None for the dense FFN, else one static k per layer (1 <= k <= F).
    predictor_weights: per layer, the matrix whose scores pick the top-k: a float (F, D) array
    (stored in `dtype`), a quantized matrix with `bits`, `codes()`, `scale`, `zero` (R, G) such as
    `quant.formats.QuantizedMatrix` (stored as 4-bit codes + fp32 scales/zeros), or None to use
    the layer's own W_k (an exact "oracle" top-k). Ignored for a dense graph.
    int8_matmul: how int8 matrices are multiplied: "dynamic" (DynamicQuantizeLinear + MatMulInteger,
    int8 x uint8 kernels) or "dequant" (DequantizeLinear + fp32 MatMul, weight-only quantization).
    exact_ffn: the one-token FFN reads only the W_v rows of active neurons (lossless; needs seq=False
    and no sparse_topk).
    """
    cfg = model.config
    if exact_ffn and (seq or sparse_topk is not None):
        raise ValueError("exact_ffn applies to the one-token graph without a top-k")
    if cfg.version != "x070":
        raise ValueError(f"ONNX export supports RWKV-7 (x070) models, got {cfg.version}")
    if sparse_topk is not None:
        sparse_topk = [int(k) for k in sparse_topk]
        if len(sparse_topk) != cfg.n_layer:
            raise ValueError(f"sparse_topk needs {cfg.n_layer} values (one per layer), got {len(sparse_topk)}")
        bad = [k for k in sparse_topk if not 1 <= k <= cfg.ffn_dim]
        if bad:
            raise ValueError(f"top-k values must lie in [1, {cfg.ffn_dim}], got {bad[:4]}")
        if predictor_weights is not None:
            if len(predictor_weights) != cfg.n_layer:
                raise ValueError(f"predictor_weights needs {cfg.n_layer} entries, got {len(predictor_weights)}")
            for i, p in enumerate(predictor_weights):
                shape = None if p is None else tuple(p.shape)
                if shape is not None and shape != (cfg.ffn_dim, cfg.n_embd):
                    raise ValueError(f"predictor of layer {i} has shape {shape}, expected "
                                     f"{(cfg.ffn_dim, cfg.n_embd)} (F, D)")
    if model.ffn is not None:
        raise ValueError("export the plain model: its FFN core has been replaced (model.with_ffn)")
    return _RWKV7Graph(model, dtype, seq, sparse_topk, predictor_weights, int8_matmul, exact_ffn).build()
