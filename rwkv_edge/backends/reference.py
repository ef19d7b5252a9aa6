"""Numpy reference backend: the oracle every fast path is tested against.

Shapes: activations are (T, D) float32 (T tokens); weights follow the official layout,
`linear(x, W)` computes x @ W.T with W of shape (out, in).
"""
from __future__ import annotations

import numpy as np

name = "reference"


def linear(x: np.ndarray, W: np.ndarray) -> np.ndarray:
    """x (..., in) @ W(out, in).T -> (..., out)."""
    return x @ W.T


def matmul(x: np.ndarray, M: np.ndarray) -> np.ndarray:
    """x (..., in) @ M (in, out) -> (..., out); used for the small LoRA-style matrices."""
    return x @ M


def layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    xc = x - mu
    var = (xc * xc).mean(-1, keepdims=True)
    return xc / np.sqrt(var + eps) * w + b


def group_norm(x: np.ndarray, n_groups: int, w: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    """Group norm over the last dim split into n_groups equal groups (x: (T, D))."""
    T, D = x.shape
    g = x.reshape(T, n_groups, D // n_groups)
    mu = g.mean(-1, keepdims=True)
    gc = g - mu
    var = (gc * gc).mean(-1, keepdims=True)
    return (gc / np.sqrt(var + eps)).reshape(T, D) * w + b


def wkv7(state, r, w, k, v, a, b):
    """RWKV-7 state update, token by token.

    state: (H, N, N) indexed [head, value i, key j]; r, w, k, v, a, b: (T, H*N).
    S_t = S * w_t[j] + (S @ a_t) b_t^T + v_t k_t^T ; y_t = S_t @ r_t.
    Returns (y (T, H*N), new state).
    """
    H, N, _ = state.shape
    T = r.shape[0]
    s = state.astype(np.float32, copy=True)
    y = np.empty((T, H * N), np.float32)
    r, w, k, v, a, b = (t.reshape(T, H, N) for t in (r, w, k, v, a, b))
    for t in range(T):
        sa = s @ a[t][:, :, None]                      # (H, N, 1)
        s = s * w[t][:, None, :] + sa * b[t][:, None, :] + v[t][:, :, None] * k[t][:, None, :]
        y[t] = (s @ r[t][:, :, None]).reshape(H * N)
    return y, s
