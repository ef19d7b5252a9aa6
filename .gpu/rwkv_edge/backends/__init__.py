"""Kernel backends: modules with the same function set, chosen by name through a registry.

The function set is reference.py's: weight, to_host, adopt_state, embed, sigmoid, tanh, exp,
relu_sq, token_shift, l2_normalize, linear, matmul, layer_norm, group_norm, wkv5, wkv6, wkv7.
A CPU backend may leave out numpy elementwise ops: they default to the reference ones.
Backends are imported lazily so that e.g. numba or CUDA are only loaded when asked for.
"auto" (the default everywhere) is numba where it imports and runs, else the numpy reference.
"native" (backends/native.py) is not a function set but a whole-model runner for RWKV-7 int8 model
files in C: runtime.open_model builds its model (`NativeRWKV7`) instead of an RWKVModel.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

_REGISTRY = {
    "reference": "rwkv_edge.backends.reference",
    "numba": ("rwkv_edge.backends.numba_cpu", "rwkv_edge.backends.numba_v7"),   # kernels + fused RWKV-7 decode
    "cuda": "rwkv_edge.backends.cuda",
    "native": "rwkv_edge.backends.native",       # whole-model C runner (int8 RWKV-7 model files)
}


_CACHE: dict = {}


def available() -> list[str]:
    return list(_REGISTRY)


def resolve(name: str) -> tuple[str, str | None]:
    """(backend name, None) for a concrete name; for "auto": ("numba", None) when numba imports and
    runs one of its cached kernels, else ("reference", why not numba) - the caller tells the user."""
    if name != "auto":
        return name, None
    if "auto" not in _CACHE:
        try:
            import numpy as np

            nb = get_backend("numba")
            x, w = np.ones((1, 4), np.float32), np.ones(4, np.float32)
            nb.layer_norm(x, w, w * 0)                # compiles (or loads from the cache) and runs a kernel
            _CACHE["auto"] = ("numba", None)
        except Exception as e:                        # ImportError, numba typing/LLVM errors, ...
            _CACHE.pop("numba", None)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            _CACHE["auto"] = ("reference", f"numba kernels unavailable ({msg}); using the slower numpy reference backend")
    return _CACHE["auto"]


def get_backend(name: str):
    """Return the backend module registered under `name` (ValueError for unknown names)."""
    if not isinstance(name, str):
        return name  # already a backend object
    if name == "auto":
        name = resolve(name)[0]
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend '{name}', choose auto or one of {', '.join(_REGISTRY)}")
    if name not in _CACHE:
        ref = importlib.import_module(_REGISTRY["reference"])
        mods = _REGISTRY[name] if isinstance(_REGISTRY[name], tuple) else (_REGISTRY[name],)
        ns = {k: getattr(ref, k) for k in dir(ref) if not k.startswith("_")}
        for mod in map(importlib.import_module, mods):
            ns.update({k: getattr(mod, k) for k in dir(mod) if not k.startswith("_")})
        ns["name"] = name
        _CACHE[name] = SimpleNamespace(**ns)
    return _CACHE[name]
