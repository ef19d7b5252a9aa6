"""What every RWKV version shares: embedding, block loop, head, FFN core and hook points.

A version module (v5.py, v6.py, v7.py) subclasses `RWKVModel` and supplies `_prepare_block`,
`time_mix` and `channel_mix`; all math goes through `self.ops` (a backend).
"""
from __future__ import annotations

import copy as _copy
from types import SimpleNamespace
from typing import Callable, List, Sequence

import numpy as np

from ..backends import get_backend
from ..config import ModelConfig, fingerprint_arrays
from ..state import State


class Hooks:
    """Named hook points. `att_input`: fn(layer, x (T, D), xa (T, D)) observes a block's input x (the
    residual stream) and xa = ln1(x), the time-mix input, before the time-mix runs (what is known at
    the start of a layer, e.g. for predicting its FFN set early).
    `ffn_shift`: fn(layer, x (T, D), prev (T, D)) observes the channel-mix input x = ln2(.) and its
    token shift prev (row t: token t-1's x; row 0 from the state, so known when the layer starts).
    `ffn_input`: fn(layer, xk (T, D)) observes the FFN input after token shift.
    `ffn_activation`: fn(layer, k (T, F)) -> k observes or replaces relu(W_k xk)^2."""

    def __init__(self):
        self.att_input: List[Callable] = []
        self.ffn_shift: List[Callable] = []
        self.ffn_input: List[Callable] = []
        self.ffn_activation: List[Callable] = []

    def any(self) -> bool:
        """True when some hook is set (fused kernels that skip the hook points cannot run)."""
        return bool(self.att_input or self.ffn_shift or self.ffn_input or self.ffn_activation)


class RWKVModel:
    version = ""

    def __init__(self, config: ModelConfig, weights: dict, backend="reference", fingerprint: str | None = None):
        if config.version != self.version:
            raise ValueError(f"config version {config.version} given to a {self.version} model")
        self.config = config
        self.ops = get_backend(backend)
        self.fingerprint = fingerprint or fingerprint_arrays(
            config, [weights["emb.weight"][:8], weights["blocks.0.ffn.key.weight"][:8], weights["head.weight"][-8:]])
        W = self.ops.weight
        self.emb = weights["emb.weight"]                       # (V, D), kept on the host; ln0 applied per token
        self.ln0 = (W(weights["blocks.0.ln0.weight"]), W(weights["blocks.0.ln0.bias"]))
        self.ln_out = (W(weights["ln_out.weight"]), W(weights["ln_out.bias"]))
        self.head = W(weights["head.weight"])                  # (V, D)
        self.blocks = []
        for i in range(config.n_layer):
            b = self._prepare_block(i, weights)
            self.blocks.append(SimpleNamespace(**{k: W(v) for k, v in vars(b).items()}))
        self.hooks = Hooks()
        self.ffn = None  # None: dense FFN; else a callable (layer, xk (T, D)) -> (T, D), e.g. a sparse FFN

    # --- version-specific -------------------------------------------------------------
    def _prepare_block(self, i: int, w: dict) -> SimpleNamespace:
        raise NotImplementedError

    def time_mix(self, i: int, x: np.ndarray, state: State, ctx: dict) -> np.ndarray:
        raise NotImplementedError

    def channel_mix(self, i: int, x: np.ndarray, state: State) -> np.ndarray:
        raise NotImplementedError

    # --- shared -------------------------------------------------------------------------
    def ffn_token_shift(self, i: int, x: np.ndarray, state: State) -> np.ndarray:
        """The channel-mix token shift of x (T, D): the previous token's rows (T, D), the first from
        state.ffn_x[i]; the state keeps x's last row. Runs the `ffn_shift` hooks."""
        prev = self.ops.token_shift(x, state.ffn_x[i])
        state.ffn_x[i] = x[-1]
        for h in self.hooks.ffn_shift:
            h(i, x, prev)
        return prev

    def ffn_core(self, i: int, xk: np.ndarray) -> np.ndarray:
        """relu(xk @ W_k.T)^2 @ W_v.T with the hook points; xk: (T, D) -> (T, D)."""
        for h in self.hooks.ffn_input:
            h(i, xk)
        if self.ffn is not None:
            return self.ffn(i, xk)
        b = self.blocks[i]
        if not self.hooks.ffn_activation and hasattr(self.ops, "ffn_dense"):
            return self.ops.ffn_dense(xk, b.ffn_key, b.ffn_value)   # one fused pass (e.g. neuron-bundled weights)
        k = self.ops.relu_sq(self.ops.linear(xk, b.ffn_key))           # (T, F)
        for h in self.hooks.ffn_activation:
            k = h(i, k)
        return self.ops.linear(k, b.ffn_value)

    def with_ffn(self, ffn) -> "RWKVModel":
        """A shallow copy of this model whose FFN core is `ffn` (e.g. a sparse FFN); weights are shared."""
        m = _copy.copy(self)
        m.hooks = Hooks()
        m.ffn = ffn
        return m

    def block(self, i: int, x: np.ndarray, state: State, ctx: dict) -> np.ndarray:
        """Block i: x (T, D) -> x + time_mix(ln1 x), then + channel_mix(ln2 of that)."""
        ops, b = self.ops, self.blocks[i]
        xa = ops.layer_norm(x, b.ln1_w, b.ln1_b)
        for h in self.hooks.att_input:
            h(i, x, xa)
        x = x + self.time_mix(i, xa, state, ctx)
        return x + self.channel_mix(i, ops.layer_norm(x, b.ln2_w, b.ln2_b), state)

    def zero_state(self) -> State:
        return State.zeros(self.config)

    def forward(self, tokens: Sequence[int], state: State | None = None, full_output: bool = False):
        """Run tokens through the model. Returns (logits, new_state); logits is (V,) for the last
        token, or (T, V) with full_output. The input state is not modified."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ValueError("forward needs at least one token")
        V = self.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= V:
            raise ValueError(f"token id out of range [0, {V})")
        ops = self.ops
        state = ops.adopt_state(self.zero_state() if state is None else state.copy())
        x = ops.layer_norm(ops.embed(self.emb, tokens), *self.ln0)   # (T, D)
        ctx: dict = {}
        for i in range(len(self.blocks)):
            x = self.block(i, x, state, ctx)
        if not full_output:
            x = x[-1:]
        logits = ops.to_host(ops.linear(ops.layer_norm(x, *self.ln_out), self.head))
        return (logits if full_output else logits[0]), state

    def step(self, token: int, state: State | None = None):
        """One token: (logits (V,), new_state)."""
        return self.forward([token], state)

