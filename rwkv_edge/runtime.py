"""One place that turns user choices (model path, backend, predictors, device) into a ready model."""
from __future__ import annotations

import os
import warnings

from .config import ModelLoadError

_PACKAGE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_MODEL = os.path.join(_PACKAGE_DATA, "default")      # the embedded model package (rwkv7-tiny-9m)


def default_model_path() -> str | None:
    """The embedded default model package shipped inside rwkv_edge, if this install has it."""
    from .package import is_package

    return DEFAULT_MODEL if is_package(DEFAULT_MODEL) else None


def _load(path: str, backend: str):
    """A dense model from an official `.pth` or an rwkv-edge model file, on a concrete backend."""
    from .modelfile import is_modelfile, load_modelfile
    from .models import model_class
    from .weights import load_checkpoint

    if is_modelfile(path):
        return load_modelfile(path, backend=backend)
    config, weights = load_checkpoint(path)
    return model_class(config.version)(config, weights, backend=backend)


def open_model(path: str, backend: str = "auto", predictors: str | None = None, device: str = "cpu",
               dtype: str = "fp32", dense: bool = False):
    """Load a model (official `.pth`, the project's model file, or a model package directory) and
    optionally make it sparse.

    backend: "auto" (numba where it works, else the numpy reference with a warning), "numba" or
    "reference"; device "cuda" selects the CUDA backend.
    predictors: path of a predictor bundle; the FFN then runs sparse on the predicted neurons. A
    package runs sparse with its own bundle unless `dense` (or `predictors` names another one).
    dtype: weight storage on CUDA (fp32, fp16, bf16); on the CPU the model file decides (`convert`).
    """
    from .backends import resolve
    from .package import is_package, open_package

    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{device}', choose cpu or cuda")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown dtype '{dtype}', choose fp32, fp16 or bf16")
    if is_package(path):
        if predictors is None:
            return open_package(path, backend=backend, dense=dense, device=device, dtype=dtype)[0]
        from .package import check_parts, part, read_manifest

        man = read_manifest(path)
        check_parts(path, man)
        path = part(path, man, "model")
    elif os.path.isdir(path):
        raise ModelLoadError(f"{path}: a directory without model.json is not a model package")
    if device == "cuda":
        from .backends import get_backend

        backend = "cuda"
        get_backend("cuda").set_dtype(dtype)
    elif dtype != "fp32":
        raise ValueError("--dtype applies to --device cuda; for the CPU convert the model (rwkv-edge convert --dtype)")
    backend, why = resolve(backend)
    if why:
        warnings.warn(why, RuntimeWarning, stacklevel=2)
    model = _load(path, backend)
    if predictors and not dense:
        if not os.path.exists(predictors):
            raise ModelLoadError(f"{predictors}: no such predictor bundle")
        from rwkv_edge.predictors.bundle import PredictorBundle
        from .sparse import DeviceSparseFFN, SparseFFN

        bundle = PredictorBundle.load(predictors, model=model)
        ffn = DeviceSparseFFN(model, bundle) if device == "cuda" else SparseFFN(model, bundle)
        model = model.with_ffn(ffn)
    return model
