"""One place that turns user choices (model file, backend, predictors, device) into a ready model."""
from __future__ import annotations

import os

from .config import ModelLoadError

_PACKAGE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def default_model_path() -> str | None:
    """The embedded default model shipped inside the package, if this install has one."""
    for name in ("default.rwkv", "default.pth"):
        p = os.path.join(_PACKAGE_DATA, name)
        if os.path.exists(p):
            return p
    return None


def open_model(path: str, backend: str = "reference", predictors: str | None = None, device: str = "cpu",
               dtype: str = "fp32"):
    """Load a model (official `.pth` or the project's own model file) and optionally make it sparse.

    backend: "reference" (numpy) or "numba"; device "cuda" selects the CUDA backend.
    predictors: path of a predictor bundle; the FFN then runs sparse on the predicted neurons.
    dtype: weight storage on CUDA (fp32, fp16, bf16); on the CPU the model file decides (`convert`).
    """
    from . import load_model

    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{device}', choose cpu or cuda")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown dtype '{dtype}', choose fp32, fp16 or bf16")
    if device == "cuda":
        from .backends import get_backend

        backend = "cuda"
        get_backend("cuda").set_dtype(dtype)
    elif dtype != "fp32":
        raise ValueError("--dtype applies to --device cuda; for the CPU convert the model (rwkv-edge convert --dtype)")
    model = load_model(path, backend=backend)
    if predictors:
        if not os.path.exists(predictors):
            raise ModelLoadError(f"{predictors}: no such predictor bundle")
        from rwkv_edge.predictors.bundle import PredictorBundle
        from .sparse import DeviceSparseFFN, SparseFFN

        bundle = PredictorBundle.load(predictors, model=model)
        ffn = DeviceSparseFFN(model, bundle) if device == "cuda" else SparseFFN(model, bundle)
        model = model.with_ffn(ffn)
    return model
