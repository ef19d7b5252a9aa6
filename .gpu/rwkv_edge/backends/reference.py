"""Numpy reference backend: the oracle every fast path is tested against.

Shapes: activations are (T, D) float32 (T tokens); weights follow the official layout,
`linear(x, W)` computes x @ W.T with W of shape (out, in).
"""
from __future__ import annotations

import numpy as np

name = "reference"


def weight(a: np.ndarray) -> np.ndarray:
    """Adopt a weight array for this backend (the reference keeps numpy float32 as is)."""
    return a


def to_host(x) -> np.ndarray:
    return np.asarray(x)


def adopt_state(state):
    """Put a State's arrays where this backend computes (numpy here)."""
    return state


def embed(emb: np.ndarray, tokens) -> np.ndarray:
    """Rows of the embedding matrix (V, D) for token ids -> (T, D) float32."""
    return np.asarray(emb[tokens], dtype=np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def tanh(x):
    return np.tanh(x)


def exp(x):
    return np.exp(x)


def relu_sq(x):
    x = np.maximum(x, 0.0)
    return x * x


def token_shift(x: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """The previous token's vector at each position: (T, D) from x (T, D) and prev (D,). A new array."""
    if x.shape[0] == 1:
        return prev[None, :].copy()
    return np.concatenate([prev[None, :], x[:-1]], axis=0)


def l2_normalize(x: np.ndarray, n_groups: int) -> np.ndarray:
    """Each of n_groups equal slices of the last dim scaled to unit L2 norm (eps 1e-12, as torch)."""
    T, D = x.shape
    g = x.reshape(T, n_groups, D // n_groups)
    return (g / np.maximum(np.sqrt((g * g).sum(-1, keepdims=True)), 1e-12)).reshape(T, D)


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


def _wkv_decay_scan(state, r, k, v, w, u):
    """Shared RWKV-5/6 recurrence; w: (T, H, N) decays in (0, 1), u: (H, N), r/k/v: (T, H, N)."""
    H, N, _ = state.shape
    T = r.shape[0]
    s = state.astype(np.float32, copy=True)
    y = np.empty((T, H * N), np.float32)
    for t in range(T):
        kv = v[t][:, :, None] * k[t][:, None, :]                  # (H, N value, N key)
        # the current token enters through the bonus u instead of the state
        y[t] = ((s + kv * u[:, None, :]) @ r[t][:, :, None]).reshape(H * N)
        s = s * w[t][:, None, :] + kv
    return y, s


def wkv5(state, r, k, v, w, u):
    """RWKV-5.2 state update, token by token (decay fixed per channel).

    state: (H, N, N) indexed [head, value i, key j]; r, k, v: (T, H*N);
    w: (H, N) per key-channel decay in (0, 1), i.e. exp(-exp(time_decay));
    u: (H, N) the bonus `time_faaaa` of the current token.
    y_t = (S + u * v_t k_t^T) @ r_t ;  S = S * w[j] + v_t k_t^T.
    Returns (y (T, H*N), new state (H, N, N)).
    """
    H, N, _ = state.shape
    T = r.shape[0]
    r, k, v = (a.reshape(T, H, N) for a in (r, k, v))
    return _wkv_decay_scan(state, r, k, v, np.broadcast_to(w.reshape(1, H, N), (T, H, N)), u.reshape(H, N))


def wkv6(state, r, k, v, w, u):
    """RWKV-6 state update, token by token (data-dependent decay).

    state: (H, N, N) indexed [head, value i, key j]; r, k, v: (T, H*N);
    w: (T, H*N) per-token, per key-channel decay in (0, 1), i.e. exp(-exp(time_decay + lora));
    u: (H, N) the bonus `time_faaaa`.
    y_t = (S + u * v_t k_t^T) @ r_t ;  S = S * w_t[j] + v_t k_t^T.
    Returns (y (T, H*N), new state (H, N, N)).
    """
    H, N, _ = state.shape
    T = r.shape[0]
    r, k, v, w = (a.reshape(T, H, N) for a in (r, k, v, w))
    return _wkv_decay_scan(state, r, k, v, w, u.reshape(H, N))


# --- sparse FFN helpers (the CUDA backend has device versions) ------------------------------
def transpose_weight(W: np.ndarray) -> np.ndarray:
    """W (D, F) -> contiguous (F, D): each neuron's value column as one row."""
    return np.ascontiguousarray(np.asarray(W).T)


def predictor_weight(a: np.ndarray) -> np.ndarray:
    """Adopt a (dequantized) predictor matrix; kept float32 so neuron selection does not depend on
    the storage precision chosen for the model weights."""
    return np.asarray(a, dtype=np.float32)


def predictor_scores(x: np.ndarray, Wq: np.ndarray) -> np.ndarray:
    """x (T, D) @ Wq (F, D).T -> (T, F) approximate pre-activations."""
    return x @ Wq.T


def threshold_mask(scores: np.ndarray, threshold: float) -> np.ndarray:
    return scores >= threshold


def mask_to_indices(mask: np.ndarray) -> np.ndarray:
    """Bool (T, F) or (F,) -> sorted indices of neurons active for any row."""
    return np.flatnonzero(mask if mask.ndim == 1 else mask.any(0))
