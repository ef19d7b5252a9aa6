"""RWKV-5.2 "Eagle" (x052): the math of one block, readable, on (T, D) float32 arrays.

Time-mix (per head of size N, state S indexed [value i, key j]):
    xk = x * mix_k + x_prev * (1 - mix_k)        (same for v, r, g)
    w = exp(-exp(time_decay))                    fixed per channel, (H, N)
    y = (S + u * v k^T) @ r ;  S = S * w + v k^T  u = time_faaaa (H, N)
    out = W_o (group_norm(y) * silu(W_g xg))
Channel-mix: sigmoid(W_r xr) * (relu(W_k xk)^2 then W_v).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from .base import RWKVModel

# ln_x is a group norm with eps 1e-5 * head_size_divisor**2 (divisor 8 in the official models)
_LNX_EPS = 64e-5


def lerp_prev(x: np.ndarray, prev: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """x * mix + prev * (1 - mix): the RWKV-4/5 token-shift interpolation."""
    return x * mix + prev * (1 - mix)


class RWKV5(RWKVModel):
    version = "x052"

    def _prepare_block(self, i, w):
        p = f"blocks.{i}."
        a = p + "att."
        f = p + "ffn."
        flat = lambda n: w[n].reshape(-1)
        H, N = self.config.n_head, self.config.head_size
        return SimpleNamespace(
            ln1_w=w[p + "ln1.weight"], ln1_b=w[p + "ln1.bias"],
            ln2_w=w[p + "ln2.weight"], ln2_b=w[p + "ln2.bias"],
            mix_k=flat(a + "time_mix_k"), mix_v=flat(a + "time_mix_v"),
            mix_r=flat(a + "time_mix_r"), mix_g=flat(a + "time_mix_g"),
            decay=np.exp(-np.exp(w[a + "time_decay"].astype(np.float32))).reshape(H, N),  # (H, N) in (0, 1)
            u=w[a + "time_faaaa"].reshape(H, N),
            att_r=w[a + "receptance.weight"], att_k=w[a + "key.weight"], att_v=w[a + "value.weight"],
            att_g=w[a + "gate.weight"], att_o=w[a + "output.weight"],
            lnx_w=w[a + "ln_x.weight"], lnx_b=w[a + "ln_x.bias"],
            ffn_mix_k=flat(f + "time_mix_k"), ffn_mix_r=flat(f + "time_mix_r"),
            ffn_key=w[f + "key.weight"], ffn_value=w[f + "value.weight"], ffn_r=w[f + "receptance.weight"],
        )

    def time_mix(self, i, x, state, ctx):
        ops, b = self.ops, self.blocks[i]
        H = self.config.n_head
        prev = ops.token_shift(x, state.att_x[i])
        state.att_x[i] = x[-1]

        r = ops.linear(lerp_prev(x, prev, b.mix_r), b.att_r)
        k = ops.linear(lerp_prev(x, prev, b.mix_k), b.att_k)
        v = ops.linear(lerp_prev(x, prev, b.mix_v), b.att_v)
        g = ops.linear(lerp_prev(x, prev, b.mix_g), b.att_g)
        g = g * ops.sigmoid(g)                                       # silu

        y, state.wkv[i] = ops.wkv5(state.wkv[i], r, k, v, b.decay, b.u)
        y = ops.group_norm(y, H, b.lnx_w, b.lnx_b, eps=_LNX_EPS)
        return ops.linear(y * g, b.att_o)

    def channel_mix(self, i, x, state):
        b = self.blocks[i]
        prev = self.ffn_token_shift(i, x, state)
        r = self.ops.sigmoid(self.ops.linear(lerp_prev(x, prev, b.ffn_mix_r), b.ffn_r))
        return r * self.ffn_core(i, lerp_prev(x, prev, b.ffn_mix_k))
