"""RWKV-7 "Goose" (x070): the math of one block, readable, on (T, D) float32 arrays.

Time-mix (per head of size N, state S indexed [value i, key j]):
    w = exp(-e^-0.5 * sigmoid(w0 + tanh(xw @ w1) @ w2))          decay in (e^-0.607, 1)
    kk = normalize(k * k_k)   a = sigmoid(a0 + xa @ a1 @ a2)
    S = S * w + (S @ -kk) (kk * a)^T + v k^T ;  y = S @ r
Channel-mix: relu(W_k xk)^2 then W_v.
"""
from __future__ import annotations

from types import SimpleNamespace


from .base import RWKVModel

_DECAY_SCALE = 0.606531  # exp(-0.5), as in the official implementation


class RWKV7(RWKVModel):
    version = "x070"

    def _prepare_block(self, i, w):
        p = f"blocks.{i}."
        a = p + "att."
        flat = lambda n: w[n].reshape(-1)
        b = SimpleNamespace(
            ln1_w=w[p + "ln1.weight"], ln1_b=w[p + "ln1.bias"],
            ln2_w=w[p + "ln2.weight"], ln2_b=w[p + "ln2.bias"],
            x_r=flat(a + "x_r"), x_w=flat(a + "x_w"), x_k=flat(a + "x_k"),
            x_v=flat(a + "x_v"), x_a=flat(a + "x_a"), x_g=flat(a + "x_g"),
            w0=flat(a + "w0"), w1=w[a + "w1"], w2=w[a + "w2"],
            a0=flat(a + "a0"), a1=w[a + "a1"], a2=w[a + "a2"],
            g1=w[a + "g1"], g2=w[a + "g2"],
            k_k=flat(a + "k_k"), k_a=flat(a + "k_a"), r_k=w[a + "r_k"],     # r_k: (H, N)
            att_r=w[a + "receptance.weight"], att_k=w[a + "key.weight"],
            att_v=w[a + "value.weight"], att_o=w[a + "output.weight"],
            lnx_w=w[a + "ln_x.weight"], lnx_b=w[a + "ln_x.bias"],
            ffn_xk=flat(p + "ffn.x_k"), ffn_key=w[p + "ffn.key.weight"], ffn_value=w[p + "ffn.value.weight"],
        )
        if i > 0:  # layer 0 has no value residual
            b.v0, b.v1, b.v2 = flat(a + "v0"), w[a + "v1"], w[a + "v2"]
        return b

    def block(self, i, x, state, ctx):
        ops = self.ops
        if x.shape[0] == 1 and hasattr(ops, "block7_step") and not self.hooks.any() \
                and ops.block7_step(self.blocks[i], x, state, i, ctx, self.ffn):
            return x      # the math of super().block (time_mix + channel_mix) in one kernel call, in place
        return super().block(i, x, state, ctx)

    def time_mix(self, i, x, state, ctx):
        ops, b = self.ops, self.blocks[i]
        T, D = x.shape
        H, N = self.config.n_head, self.config.head_size
        if T == 1 and hasattr(ops, "time_mix7_step"):  # the same math fused into one kernel call
            out, _, v = ops.time_mix7_step(b, x, state.att_x[i], state.wkv[i], ctx.get("v_first"), wkv_out=state.wkv[i])
            state.att_x[i] = x[-1]
            if i == 0:
                ctx["v_first"] = v
            return out
        xx = self.ops.token_shift(x, state.att_x[i]) - x
        state.att_x[i] = x[-1]
        xr, xw, xk = x + xx * b.x_r, x + xx * b.x_w, x + xx * b.x_k
        xv, xa, xg = x + xx * b.x_v, x + xx * b.x_a, x + xx * b.x_g

        r = ops.linear(xr, b.att_r)
        w = ops.matmul(ops.tanh(ops.matmul(xw, b.w1)), b.w2)
        k = ops.linear(xk, b.att_k)
        v = ops.linear(xv, b.att_v)
        a = ops.sigmoid(b.a0 + ops.matmul(ops.matmul(xa, b.a1), b.a2))
        g = ops.matmul(ops.sigmoid(ops.matmul(xg, b.g1)), b.g2)

        kk = ops.l2_normalize(k * b.k_k, H)
        k = k * (1 + (a - 1) * b.k_a)
        if i == 0:
            ctx["v_first"] = v
        else:  # value residual towards layer 0's value
            v = v + (ctx["v_first"] - v) * ops.sigmoid(b.v0 + ops.matmul(ops.matmul(xv, b.v1), b.v2))
        w = ops.exp(-_DECAY_SCALE * ops.sigmoid(b.w0 + w))

        y, state.wkv[i] = ops.wkv7(state.wkv[i], r, w, k, v, -kk, kk * a)
        y = ops.group_norm(y, H, b.lnx_w, b.lnx_b, eps=64e-5)
        bonus = (r * k).reshape(T, H, N) * b.r_k
        y = y + (bonus.sum(-1, keepdims=True) * v.reshape(T, H, N)).reshape(T, D)
        return ops.linear(y * g, b.att_o)

    def channel_mix(self, i, x, state):
        b = self.blocks[i]
        xx = self.ffn_token_shift(i, x, state) - x
        return self.ffn_core(i, x + xx * b.ffn_xk)
