"""PredictorBundle: one calibrated predictor per layer, saved as one versioned .npz.

File layout (np.savez, no pickles):
    magic "rwkv-edge-predictors", format_version, fingerprint, config (JSON), kind, bits (0: n/a),
    target, metric, meta (JSON: fit options, timings), input (version 2: what the predictors score,
    "ffn" = the FFN input xk, "early" = [ln1(x_L), FFN shift state], see early.py; version 1 files
    are "ffn"; version 3: an early-shift predictor may store a diagonal map as "d" (D,) instead of "A"
    (D, D)), n_layer, then each layer's arrays under
    "L{i}." (kind, calib = [threshold, k, percentile, recall], and the predictor's own arrays).
Written atomically (temp file in the same directory + os.replace), so a crash never leaves a
half-written bundle under the final name.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from rwkv_edge.config import ModelConfig
from rwkv_edge.fileio import atomic_write, read_versioned_npz

from .base import LayerPredictor
from . import early, ensemble, mlp, pq, quantized  # noqa: F401  (register the kinds)

MAGIC = "rwkv-edge-predictors"
FORMAT_VERSION = 3
READS = (1, 2, 3)              # version 1: no `input` entry, the predictors score the FFN input


class PredictorBundle:
    """Per-layer predictors of one model. `predict(layer, x (T, .)) -> bool (T, F)`;
    `predict_indices(layer, x) -> int32 sorted`; `save(path)`; `PredictorBundle.load(path, model)`.
    `input` says what x is: "ffn", the FFN input xk (T, D); "early", [ln1(x_L), the FFN token-shift
    state] (T, 2D), known when layer L starts (early.EarlySets runs such a bundle)."""

    def __init__(self, predictors: list, fingerprint: str, config: ModelConfig, kind: str,
                 bits: int | None = None, target: float | None = None, metric: str = "mass",
                 meta: dict | None = None, input: str = "ffn"):
        if len(predictors) != config.n_layer:
            raise ValueError(f"bundle needs {config.n_layer} layer predictors, got {len(predictors)}")
        if input not in early.BUNDLE_INPUTS:
            raise ValueError(f"unknown bundle input {input!r}: use one of {', '.join(early.BUNDLE_INPUTS)}")
        self.input = input
        self.predictors = list(predictors)
        self.fingerprint, self.config, self.kind = fingerprint, config, kind
        self.bits, self.target, self.metric = bits, target, metric
        self.meta = dict(meta or {})

    @classmethod
    def union(cls, bundles: list) -> "PredictorBundle":
        """Union of already calibrated bundles of one model, each member keeping its own calibration
        (an "independent" union: denser than `fit(kind="a+b")`, which calibrates the members jointly)."""
        if len(bundles) < 2:
            raise ValueError("a union needs at least two bundles")
        b0 = bundles[0]
        for b in bundles[1:]:
            if (b.fingerprint, b.config) != (b0.fingerprint, b0.config):
                raise ValueError("bundles of different models cannot be joined")
            if b.input != b0.input:
                raise ValueError("bundles scoring different inputs (ffn / early) cannot be joined")
        from .ensemble import UnionPredictor

        preds = [UnionPredictor([b.predictors[i] for b in bundles]) for i in range(b0.config.n_layer)]
        bits = next((b.bits for b in bundles if b.bits), None)
        return cls(preds, b0.fingerprint, b0.config, "+".join(b.kind for b in bundles), bits, b0.target, b0.metric,
                   {"union_of": [b.describe() for b in bundles], "calibration": "independent"}, b0.input)

    # --- inference -----------------------------------------------------------------------
    def predict(self, layer: int, xk: np.ndarray) -> np.ndarray:
        """Inputs (T, D) of `layer` (T, 2D for an early bundle) -> bool (T, F), True where the neuron
        is predicted active."""
        return self.predictors[layer].mask(xk)

    def predict_indices(self, layer: int, x: np.ndarray) -> np.ndarray:
        """One FFN input x (D,) -> int32 sorted indices of the neurons predicted active."""
        return self.predictors[layer].indices(x)

    @property
    def nbytes(self) -> int:
        """Bytes of all predictor parameters (what a runtime must hold besides the model)."""
        return int(sum(p.nbytes for p in self.predictors))

    def layer_nbytes(self, layer: int) -> int:
        return int(self.predictors[layer].nbytes)

    def describe(self) -> str:
        on = "" if self.input == "ffn" else f", scored on {self.input} inputs"
        return f"{self.kind} ({self.predictors[0].describe()}), target {self.metric} recall {self.target}{on}"

    # --- checks --------------------------------------------------------------------------
    def check_model(self, model, where: str = "bundle") -> None:
        """ValueError unless this bundle was fitted for `model` (fingerprint and config)."""
        if self.config != model.config:
            raise ValueError(f"{where}: predictors are for a model with config {self.config.to_dict()}, "
                             f"not {model.config.to_dict()}")
        if self.fingerprint != model.fingerprint:
            raise ValueError(f"{where}: predictors belong to another model (fingerprint {self.fingerprint}, "
                             f"this model is {model.fingerprint})")

    # --- files ---------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the bundle to `path` (.npz) atomically."""
        path = os.fspath(path)
        arrays = {"magic": np.array(MAGIC), "format_version": np.array(FORMAT_VERSION, np.int64),
                  "fingerprint": np.array(self.fingerprint), "config": np.array(json.dumps(self.config.to_dict())),
                  "kind": np.array(self.kind), "bits": np.array(self.bits or 0, np.int64),
                  "target": np.array(np.nan if self.target is None else self.target, np.float64),
                  "metric": np.array(self.metric), "meta": np.array(json.dumps(self.meta)),
                  "n_layer": np.array(len(self.predictors), np.int64), "input": np.array(self.input)}
        for i, p in enumerate(self.predictors):
            arrays.update(p.to_arrays(f"L{i}"))
        with atomic_write(path, prefix=".bundle-") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: str, model=None) -> "PredictorBundle":
        """Read a bundle; with `model`, also check it belongs to that model. ValueError if the file
        is missing, is not a predictor bundle, has another format version, or fits another model."""
        path = os.fspath(path)
        data = read_versioned_npz(path, MAGIC, READS, "predictor bundle")
        try:
            config = ModelConfig.from_dict(json.loads(str(data["config"])))
            preds = [LayerPredictor.from_arrays(data, f"L{i}") for i in range(int(data["n_layer"]))]
            target = float(data["target"])
            b = cls(preds, str(data["fingerprint"]), config, str(data["kind"]), int(data["bits"]) or None,
                    None if np.isnan(target) else target, str(data["metric"]), json.loads(str(data["meta"])),
                    str(data["input"]) if "input" in data else "ffn")
        except (KeyError, TypeError, json.JSONDecodeError, zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"{path}: damaged predictor bundle ({type(e).__name__}: {e})") from None
        if model is not None:
            b.check_model(model, path)
        return b
