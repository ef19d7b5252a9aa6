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
               dtype: str = "fp32", max_resident_mb: float | None = None, resident_window: int = 8):
    """Load a model (official `.pth` or the project's own model file) and optionally make it sparse.

    backend: "reference" (numpy) or "numba"; device "cuda" selects the CUDA backend.
    predictors: path of a predictor bundle; the FFN then runs sparse on the predicted neurons.
    dtype: weight storage on CUDA (fp32, fp16, bf16); on the CPU the model file decides (`convert`).
    max_resident_mb: with predictors on a CPU model file, FFN neuron pages follow the active set
    (rwkv_edge.residency: unused for `resident_window` tokens -> dropped; budget for all weights).
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
    if backend == "numba" and device == "cpu" and getattr(model, "modelfile_dtype", None):
        from .lean import release_compiler_pages, warm_kernels
        # kernels loaded before any weight page is touched, then LLVM's code pages given back
        warm_kernels(model.modelfile_dtype, sparse=bool(predictors))
        release_compiler_pages()
    if predictors:
        if not os.path.exists(predictors):
            raise ModelLoadError(f"{predictors}: no such predictor bundle")
        from rwkv_edge.predictors.bundle import PredictorBundle
        from .sparse import DeviceSparseFFN, SparseFFN

        bundle = PredictorBundle.load(predictors, model=model)
        if max_resident_mb is not None:
            if device != "cpu" or not getattr(model, "modelfile_dtype", None):
                raise ValueError("--max-resident-mb needs a CPU model file (rwkv-edge convert): weights are mapped")
            from .residency import resident_sparse_ffn
            ffn = resident_sparse_ffn(model, bundle, resident_window, max_resident_mb)
        else:
            ffn = DeviceSparseFFN(model, bundle) if device == "cuda" else SparseFFN(model, bundle)
        model = model.with_ffn(ffn)
    return model
