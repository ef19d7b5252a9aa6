"""One place that turns user choices (model path, backend, predictors, device) into a ready model."""
from __future__ import annotations

import os
import warnings

from .config import ModelLoadError

_PACKAGE_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_MODEL = os.path.join(_PACKAGE_DATA, "default")      # the embedded model package (rwkv7-tiny-9m)
# `--backend auto` on an int8 RWKV-7 model file takes the native C backend where it is built (faster
# decode and prefill, no numba in the process; tests/test_native.py and test_embedded.py check it)
AUTO_NATIVE = False


def default_model_path() -> str | None:
    """The embedded default model package shipped inside rwkv_edge, if this install has it."""
    from .package import is_package

    return DEFAULT_MODEL if is_package(DEFAULT_MODEL) else None


def _native_fits(path: str) -> bool:
    """True when `path` is an int8 RWKV-7 model file and the native library loads here."""
    from .modelfile import is_modelfile, read_header

    if not is_modelfile(path):
        return False
    try:
        h = read_header(path)
    except ModelLoadError:
        return False
    if h.get("dtype") != "int8" or h.get("config", {}).get("version") != "x070":
        return False
    from .backends.native import available
    return available()[0]


def _load(path: str, backend: str):
    """A dense model from an official `.pth` or an rwkv-edge model file, on a concrete backend."""
    from .modelfile import is_modelfile, load_modelfile
    from .models import model_class
    from .weights import load_checkpoint

    if backend == "native":
        if not is_modelfile(path):
            raise ModelLoadError(f"{path}: --backend native runs int8 and int4 model files "
                                 "(rwkv-edge convert --dtype int8 --model M.pth --out M.rwkve)")
        from .backends.native import NativeRWKV7, available
        ok, why = available()
        if not ok:
            raise ModelLoadError(f"--backend native: {why}")
        return NativeRWKV7.open(path)
    if is_modelfile(path):
        return load_modelfile(path, backend=backend)
    if backend == "cuda":  # RWKV-7 straight to the GPU in its storage dtype (no float32 host copy)
        from .backends import get_backend
        from .weights import load_checkpoint_to

        get_backend("cuda").device()   # "CUDA is not available" (RuntimeError) before reading the file
        got = load_checkpoint_to(path, get_backend("cuda").weight)
        if got is not None:
            config, weights, fp = got
            return model_class(config.version)(config, weights, backend=backend, fingerprint=fp)
    config, weights = load_checkpoint(path)
    return model_class(config.version)(config, weights, backend=backend)


def open_model(path: str, backend: str = "auto", predictors: str | None = None, device: str = "cpu",
               dtype: str = "fp32", dense: bool = False, max_resident_mb: float | None = None,
               resident_window: int = 8):
    """Load a model (official `.pth`, the project's model file, or a model package directory) and
    optionally make it sparse.

    backend: "auto" (native for int8 RWKV-7 model files where its C library is built, see AUTO_NATIVE;
    else numba where it works, else the numpy reference with a warning), "native", "numba" or
    "reference"; device "cuda" selects the CUDA backend.
    predictors: path of a predictor bundle; the FFN then runs sparse on the predicted neurons. A
    package runs sparse with its own bundle unless `dense` (or `predictors` names another one).
    dtype: weight storage on CUDA (fp32, fp16, bf16); on the CPU the model file decides (`convert`).
    max_resident_mb: with predictors on a CPU model file, FFN neuron pages follow the active set
    (rwkv_edge.residency: unused for `resident_window` tokens -> dropped; budget for all weights).
    """
    from .backends import resolve
    from .package import check_parts, is_package, part, read_manifest

    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device '{device}', choose cpu or cuda")
    if dtype not in ("fp32", "fp16", "bf16"):
        raise ValueError(f"unknown dtype '{dtype}', choose fp32, fp16 or bf16")
    if is_package(path):                  # its model file, sparse with its own bundle unless told otherwise
        man = read_manifest(path)
        check_parts(path, man)
        if predictors is None:
            predictors = part(path, man, "predictors")
        path = part(path, man, "model")
    elif os.path.isdir(path):
        raise ModelLoadError(f"{path}: a directory without model.json is not a model package")
    if device == "cuda":
        from .backends import get_backend

        backend = "cuda"
        get_backend("cuda").set_dtype(dtype)
    elif dtype != "fp32":
        raise ValueError("--dtype applies to --device cuda; for the CPU convert the model (rwkv-edge convert --dtype)")
    if backend == "native" and device != "cpu":
        raise ValueError("--backend native runs on the CPU")
    if backend == "auto" and device == "cpu" and AUTO_NATIVE and max_resident_mb is None and _native_fits(path):
        backend = "native"
    backend, why = resolve(backend)
    if why:
        warnings.warn(why, RuntimeWarning, stacklevel=2)
    model = _load(path, backend)
    sparse = bool(predictors) and not dense
    if backend == "numba" and device == "cpu" and getattr(model, "modelfile_dtype", None):
        from .lean import release_compiler_pages, warm_kernels
        # kernels loaded before any weight page is touched, then LLVM's code pages given back
        warm_kernels(model.modelfile_dtype, sparse=sparse)
        release_compiler_pages()
    if sparse:
        if not os.path.exists(predictors):
            raise ModelLoadError(f"{predictors}: no such predictor bundle")
        from rwkv_edge.predictors.bundle import PredictorBundle

        bundle = PredictorBundle.load(predictors, model=model)
        if max_resident_mb is None:
            return run_sparse(model, bundle, device)
        if backend == "native":
            raise ValueError("--max-resident-mb needs --backend numba (the native backend has no residency policy)")
        if device != "cpu" or not getattr(model, "modelfile_dtype", None):
            raise ValueError("--max-resident-mb needs a CPU model file (rwkv-edge convert): weights are mapped")
        from .residency import resident_sparse_ffn
        model = model.with_ffn(resident_sparse_ffn(model, bundle, resident_window, max_resident_mb))
    return model


def run_sparse(model, bundle, device: str = "cpu"):
    """`model` with its FFN run sparse on `bundle` (checked against the model): the native backend
    scores and selects in C, the others through a SparseFFN (DeviceSparseFFN on cuda, which keeps the
    bundle: batch-1 decode then runs it in cuda_decode.FusedDecode, see generate.py). An early bundle
    (input "early") runs on the numba, reference or cuda backend: hooks score each layer's set when the
    layer starts (predictors.early.EarlySets) and a SparseFFN (DeviceSparseFFN) runs it."""
    early = getattr(bundle, "input", "ffn") == "early"
    if early and hasattr(model, "with_predictors"):
        raise ValueError("an early-input predictor bundle runs on the numba, reference or cuda backend, "
                         "not the native one")
    from .sparse import DeviceSparseFFN, SparseFFN

    if device == "cuda":
        return DeviceSparseFFN(model, bundle).attach(model)
    if early:
        from rwkv_edge.predictors.early import EarlySets

        sets = EarlySets(bundle)
        return sets.attach(model.with_ffn(SparseFFN(model, sets)))
    if hasattr(model, "with_predictors"):
        return model.with_predictors(bundle)
    return model.with_ffn(SparseFFN(model, bundle))
