"""Input importance of the linear weights, for int4 conversion (`convert --dtype int4 --calib TEXT`).

The error a quantized row w_hat adds to one output is (w - w_hat) . x; over calibration tokens its mean
square is sum_c E[x_c^2] (w_c - w_hat_c)^2 plus cross terms. quant/q4.py's scale search minimises the
first part per group when given importance[c] = E[x_c^2] of the input column c multiplies (llama.cpp
calls the same statistic an importance matrix). Here: run the float32 reference model over calibration
text in prefill windows and record E[x^2] (in,) of the input of every linear matrix (attention, FFN key,
head). The FFN value matrix is left out: its int4 groups run along its output (a neuron's value
column), where every element of a group meets the same input.
"""
from __future__ import annotations

import numpy as np


class _Recorder:
    """The reference op set with `linear` recording the mean square of its input per weight array."""

    def __init__(self, ops, names: dict):
        self._ops, self._names, self.sums, self.counts = ops, names, {}, {}

    def __getattr__(self, attr):
        if attr == "ffn_dense":                  # the FFN goes through linear, so its key input is seen
            raise AttributeError(attr)
        return getattr(self._ops, attr)

    def linear(self, x, W):
        name = self._names.get(id(W))
        if name is not None:
            x2 = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
            self.sums[name] = self.sums.get(name, 0.0) + (x2 * x2).sum(0)
            self.counts[name] = self.counts.get(name, 0) + x2.shape[0]
        return self._ops.linear(x, W)


def input_moments(config, weights: dict, ids, ctx: int = 512, progress=None) -> dict:
    """{official weight name: E[x^2] (in,) float32} over the token ids `ids`, scored in windows of ctx
    tokens each from a fresh state. weights: official float32 arrays (they are used as they are)."""
    from .backends import get_backend
    from .models import model_class

    m = model_class(config.version)(config, weights, backend="reference")
    names = {id(a): n for n, a in weights.items() if np.ndim(a) == 2 and not n.endswith(("emb.weight", "ffn.value.weight"))}
    rec = m.ops = _Recorder(get_backend("reference"), names)
    ids = list(ids)
    for i in range(0, len(ids), ctx):
        m.forward(ids[i:i + ctx], None, full_output=False)
        if progress is not None:
            progress(len(ids[i:i + ctx]))
    return {n: (rec.sums[n] / rec.counts[n]).astype(np.float32) for n in rec.sums}


def text_moments(model_path: str, text_path: str, n_tokens: int, ctx: int = 512) -> tuple:
    """(config, weights, moments) for a .pth and a UTF-8 calibration text (its first n_tokens tokens)."""
    from tqdm import tqdm

    from .tokenizer import load_tokenizer
    from .weights import load_checkpoint

    config, weights = load_checkpoint(model_path)
    tok = load_tokenizer(None, model_path, config.vocab_size)
    with open(text_path, encoding="utf-8") as f:
        ids = tok.encode(f.read())[:n_tokens]
    if not ids:
        raise ValueError(f"{text_path}: no tokens to calibrate on")
    with tqdm(total=len(ids), desc="calibrate", unit="tok", leave=False) as bar:
        mom = input_moments(config, weights, ids, ctx, progress=bar.update)
    return config, weights, mom
