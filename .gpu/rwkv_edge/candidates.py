"""What `rwkv-edge eval` and the quality table compare against the dense base: candidates.

A candidate is anything with `forward(ids, state=None, full_output=True) -> (logits (T, V), state)`
and a `config`: a sparse model (`model.with_ffn(SparseFFN(...))`), another model file of the same
weights (an int8 / fp16 `rwkv-edge convert` output), or an ONNX export run by onnxruntime.

`MaskedFFN` is the backend-independent form of a sparse FFN for quality measurement: it computes
every key, then zeroes the neurons the predictor left out. It gives the sparse FFN's result (up to
float rounding; tested against `SparseFFN`) on any backend and for any predictor kind, but reads
every row, so it says nothing about speed.
"""
from __future__ import annotations

import math
import os

import numpy as np


class MaskedFFN:
    """FFN core (layer, xk (T, D)) -> (T, D) keeping only the neurons `predictor.predict(layer, xk)`
    (bool (T, F)) marks; counts n_tokens / n_active like `SparseFFN`."""

    def __init__(self, model, predictor):
        self.ops, self.blocks, self.predictor = model.ops, model.blocks, predictor
        self.F = model.config.ffn_dim
        self.n_tokens = 0
        self.n_active = 0

    def __call__(self, layer: int, xk):
        ops, b = self.ops, self.blocks[layer]
        mask = self.predictor.predict(layer, np.asarray(ops.to_host(xk), np.float32))      # (T, F) bool
        self.n_tokens += mask.shape[0]
        self.n_active += int(mask.sum())
        k = ops.relu_sq(ops.linear(xk, b.ffn_key)) * ops.weight(mask.astype(np.float32))
        return ops.linear(k, b.ffn_value)

    @property
    def density(self) -> float:
        return self.n_active / max(1, self.n_tokens * self.F)


def mlp_threshold_bundle(bundle, probability: float = 0.7):
    """A copy of an MLP bundle predicting a neuron active when sigmoid(logit) >= `probability`
    (the seed's fixed MLP threshold), i.e. logit >= log(p / (1 - p)) in every layer."""
    import copy

    from rwkv_edge.predictors.calibrate import Calibration

    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability}")
    out = copy.deepcopy(bundle)
    t = math.log(probability / (1.0 - probability))
    for p in out.predictors:
        if p.kind != "mlp":
            raise ValueError(f"a probability threshold needs MLP predictors, not {p.kind}")
        p.calib = Calibration(threshold=t)
    out.meta["calibration"] = {"mlp_probability": probability}
    return out


class OnnxCandidate:
    """An rwkv-edge ONNX export as a candidate: `forward` steps onnxruntime token by token from a
    fresh state (the prefill graph returns only the last logits) and stacks the logits (T, V)."""

    def __init__(self, onnx_dir: str, base_model, variant: str | None = None):
        from rwkv_edge.export.export import read_sidecar
        from rwkv_edge.export.run_ort import OrtModel

        meta = read_sidecar(onnx_dir)
        if meta.get("fingerprint") and meta["fingerprint"] != base_model.fingerprint:
            raise ValueError(f"{onnx_dir} was exported from another model "
                             f"(fingerprint {meta['fingerprint']} != {base_model.fingerprint})")
        if variant is None:
            variant = "sparse" if "sparse_step" in meta.get("graphs", {}) else "dense"
        self.ort = OrtModel(str(onnx_dir), variant)
        self.variant, self.config, self.fingerprint = variant, base_model.config, base_model.fingerprint
        sp = meta.get("sparsity") or {}
        topk = sp.get("topk")
        # a static per-layer top-k graph runs a known density
        self.density = (float(np.mean(topk)) / self.config.ffn_dim) if (variant == "sparse" and topk) else None

    def forward(self, tokens, state=None, full_output: bool = False):
        state = self.ort.zero_state() if state is None else state
        out = []
        for t in tokens:
            logits, state = self.ort.step(int(t), state)
            out.append(logits)
        logits = np.stack(out)
        return (logits if full_output else logits[-1]), state


def load_candidate(path: str, base_model, backend: str = "reference", device: str = "cpu",
                   onnx_variant: str | None = None):
    """A candidate from a path: an ONNX export directory (model.json of format rwkv-edge-onnx), a model
    package directory (format rwkv-edge-package: run sparse with its own bundle), or a model file of
    the base's weights (`rwkv-edge convert` output, .pth). ValueError with a one-line reason for
    anything else, or for a candidate of another model."""
    from .runtime import open_model

    if os.path.isdir(path):
        sidecar = os.path.join(path, "model.json")
        if not os.path.isfile(sidecar):
            raise ValueError(f"--candidate {path}: a directory without model.json is not an export or a model package")
        import json

        try:
            fmt = json.load(open(sidecar, encoding="utf-8")).get("format")
        except (OSError, ValueError) as e:
            raise ValueError(f"--candidate {path}: unreadable model.json ({e})") from None
        if fmt == "rwkv-edge-onnx":
            try:
                return OnnxCandidate(path, base_model, onnx_variant)
            except ImportError as e:
                raise ValueError(f"--candidate {path}: onnxruntime is needed for an ONNX export ({e})") from None
        if fmt != "rwkv-edge-package":
            raise ValueError(f"--candidate {path}: model.json format {fmt!r} is neither an rwkv-edge ONNX export "
                             "nor a model package")
    elif not os.path.isfile(path):
        raise ValueError(f"--candidate {path}: no such file or directory")
    cand = open_model(path, backend=backend, device=device)
    if cand.fingerprint != base_model.fingerprint or cand.config != base_model.config:
        raise ValueError(f"--candidate {path} holds another model (fingerprint {cand.fingerprint}, "
                         f"the base is {base_model.fingerprint})")
    return cand
