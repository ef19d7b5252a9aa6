"""RWKV-6 "Finch" (x060): the math of one block, readable, on (T, D) float32 arrays.

Time-mix (per head of size N, state S indexed [value i, key j]):
    dx = x_prev - x ;  m_{w,k,v,r,g} = tanh((x + dx * maa_x) @ maa_w1) @ maa_w2[.]   (data-dependent lerp)
    x_c = x + dx * (maa_c + m_c)
    w = exp(-exp(time_decay + tanh(x_w @ decay_w1) @ decay_w2))   per token and channel
    y = (S + u * v k^T) @ r ;  S = S * w + v k^T                   u = time_faaaa (H, N)
    out = W_o (group_norm(y) * silu(W_g x_g))
Channel-mix: sigmoid(W_r xr) * (relu(W_k xk)^2 then W_v), xk = x + dx * maa_k.
"""
from __future__ import annotations

from types import SimpleNamespace


from .base import RWKVModel

# ln_x is a group norm with eps 1e-5 * head_size_divisor**2 (divisor 8 in the official models)
_LNX_EPS = 64e-5


class RWKV6(RWKVModel):
    version = "x060"

    def _prepare_block(self, i, w):
        p = f"blocks.{i}."
        a = p + "att."
        f = p + "ffn."
        flat = lambda n: w[n].reshape(-1)
        H, N = self.config.n_head, self.config.head_size
        return SimpleNamespace(
            ln1_w=w[p + "ln1.weight"], ln1_b=w[p + "ln1.bias"],
            ln2_w=w[p + "ln2.weight"], ln2_b=w[p + "ln2.bias"],
            maa_x=flat(a + "time_maa_x"), maa_w=flat(a + "time_maa_w"), maa_k=flat(a + "time_maa_k"),
            maa_v=flat(a + "time_maa_v"), maa_r=flat(a + "time_maa_r"), maa_g=flat(a + "time_maa_g"),
            maa_w1=w[a + "time_maa_w1"],                      # (D, 5*E)
            maa_w2=w[a + "time_maa_w2"],                      # (5, E, D), order w, k, v, r, g
            decay=flat(a + "time_decay"),                     # (D,) log-log decay before the LoRA
            decay_w1=w[a + "time_decay_w1"], decay_w2=w[a + "time_decay_w2"],   # (D, E'), (E', D)
            u=w[a + "time_faaaa"].reshape(H, N),
            att_r=w[a + "receptance.weight"], att_k=w[a + "key.weight"], att_v=w[a + "value.weight"],
            att_g=w[a + "gate.weight"], att_o=w[a + "output.weight"],
            lnx_w=w[a + "ln_x.weight"], lnx_b=w[a + "ln_x.bias"],
            ffn_maa_k=flat(f + "time_maa_k"), ffn_maa_r=flat(f + "time_maa_r"),
            ffn_key=w[f + "key.weight"], ffn_value=w[f + "value.weight"], ffn_r=w[f + "receptance.weight"],
        )

    def time_mix(self, i, x, state, ctx):
        ops, b = self.ops, self.blocks[i]
        T = x.shape[0]
        H = self.config.n_head
        dx = self.ops.token_shift(x, state.att_x[i]) - x
        state.att_x[i] = x[-1]

        n_mix = b.maa_w2.shape[0]                                            # 5
        m = ops.tanh(ops.matmul(x + dx * b.maa_x, b.maa_w1)).reshape(T, n_mix, -1)   # (T, 5, E)
        mw, mk, mv, mr, mg = (ops.matmul(m[:, j], b.maa_w2[j]) for j in range(n_mix))  # each (T, D)
        xw = x + dx * (b.maa_w + mw)
        xk = x + dx * (b.maa_k + mk)
        xv = x + dx * (b.maa_v + mv)
        xr = x + dx * (b.maa_r + mr)
        xg = x + dx * (b.maa_g + mg)

        r = ops.linear(xr, b.att_r)
        k = ops.linear(xk, b.att_k)
        v = ops.linear(xv, b.att_v)
        g = ops.linear(xg, b.att_g)
        g = g * ops.sigmoid(g)                                                   # silu
        w = ops.exp(-ops.exp(b.decay + ops.matmul(ops.tanh(ops.matmul(xw, b.decay_w1)), b.decay_w2)))  # (T, D)

        y, state.wkv[i] = ops.wkv6(state.wkv[i], r, k, v, w, b.u)
        y = ops.group_norm(y, H, b.lnx_w, b.lnx_b, eps=_LNX_EPS)
        return ops.linear(y * g, b.att_o)

    def channel_mix(self, i, x, state):
        b = self.blocks[i]
        dx = self.ffn_token_shift(i, x, state) - x
        r = self.ops.sigmoid(self.ops.linear(x + dx * b.ffn_maa_r, b.ffn_r))
        return r * self.ffn_core(i, x + dx * b.ffn_maa_k)
