"""The rescored head of the native backend: `NativeRWKV7.open(path, head_rescore=K)` or
`model.with_head_rescore(K)` (csrc/nk_head.c runs it).

Why: on the reference model (V 16384, D 512) the int8 head is 8.4 MB a token, a quarter of a sparse
int8 step's bytes, and no FFN sparsity touches it. An int4 head alone costs KLD ~0.015 against fp16,
too much (tools/head_kld.py). But the error that matters sits in the few tokens that carry the
probability mass: so every token's logit comes from a 4-bit copy of the int8 head (half the bytes),
and the K tokens with the largest 4-bit logits are recomputed from their int8 rows. The head then
reads V D / 2 + K D bytes a token instead of V D, and the likely tokens get the int8 logits exactly.
The tail keeps the 4-bit logits, so this is lossy: measured on 2048 held-out positions of the
reference model, the head alone against the float head (tools/head_kld.py --rescore 64,256): KLD
int8 head 1e-6, int4 head 0.0164, int4 + top 64 rescored 0.0040, + top 256 0.0021; same-top-1 0.9995
for every K. `rwkv-edge eval --head-rescore K` measures the whole model.

The 4-bit copy is derived from the int8 rows when the model is built (quant/q4.py, least-squares
scales: 0.5 s at 16384 x 512), so any int8-head model file runs it and the file format is unchanged;
it lives in anonymous memory (V D / 2 + V D / 16 bytes).

Shapes: z4, z8 (T, V) float32 logits; K rows rescored per position.
"""
from __future__ import annotations

import numpy as np

from ..config import ModelLoadError


def with_q4_head(t: dict, k: int) -> dict:
    """Model file tensors t with the 4-bit copy of the int8 head added (t itself if it has one), for k > 0."""
    if k < 0:
        raise ValueError("head_rescore must be >= 0")
    if "head.weight.q" not in t:
        raise ModelLoadError("head_rescore needs a model file with an int8 head (its rows give the top "
                             "logits); this one stores the head in int4")
    if "head.weight.q4" in t:            # derived once per weights: shared by with_predictors etc.
        return t
    t = dict(t)
    t["head.weight.q4"], t["head.weight.s4"] = derive_q4(t)
    return t


def derive_q4(t: dict) -> tuple[np.ndarray, np.ndarray]:
    """(codes (V, D/2) uint8, scales (V, D/32) float16) of the int8 head of model file tensors t."""
    from rwkv_edge.quant import dequantize_int8_rows
    from rwkv_edge.quant.q4 import quantize_q4
    q, sc = t["head.weight.q"], t["head.weight.scale"]
    V, D = q.shape
    q4, s4 = np.empty((V, D // 2), np.uint8), np.empty((V, D // 32), np.float16)
    for r0 in range(0, V, 1024):          # in row blocks: the float32 copy and the scale search's
        w = dequantize_int8_rows(q[r0:r0 + 1024], sc[r0:r0 + 1024])         # temporaries stay small
        q4[r0:r0 + 1024], s4[r0:r0 + 1024] = quantize_q4(w, search=True)
    return q4, s4


def top_rows(z: np.ndarray, K: int) -> np.ndarray:
    """The rows of z (V,) with the K largest values, as csrc/nk_head.c picks them: tau = the K-th
    largest value; the rows above tau, then the rows equal to tau in index order until K."""
    z = np.asarray(z)
    if K >= z.size:
        return np.arange(z.size)
    tau = np.partition(z, z.size - K)[z.size - K]
    above = np.flatnonzero(z > tau)
    ties = np.flatnonzero(z == tau)[:K - above.size]
    return np.concatenate([above, ties])


def rescore_reference(z4: np.ndarray, z8: np.ndarray, K: int) -> np.ndarray:
    """The rescored head's logits from the 4-bit head's (z4) and the int8 head's (z8) logits of the same
    positions ((V,) or (T, V)): z4 with each row's top K (by z4) replaced by z8."""
    z4, z8 = np.atleast_2d(z4), np.atleast_2d(z8)
    out = z4.copy()
    for t in range(out.shape[0]):
        r = top_rows(z4[t], K)
        out[t, r] = z8[t, r]
    return out
