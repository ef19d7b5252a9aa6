"""Kernel backends: modules with the same function set, chosen by name through a registry.

Every backend provides: linear, matmul, layer_norm, group_norm, wkv5, wkv6, wkv7.
Backends are imported lazily so that e.g. numba or CUDA are only loaded when asked for.
"""
from __future__ import annotations

import importlib

_REGISTRY = {
    "reference": "rwkv_edge.backends.reference",
    "numba": "rwkv_edge.backends.numba_cpu",
    "cuda": "rwkv_edge.backends.cuda",
}


def available() -> list[str]:
    return list(_REGISTRY)


def get_backend(name: str):
    """Return the backend module registered under `name` (ValueError for unknown names)."""
    if not isinstance(name, str):
        return name  # already a backend object
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend '{name}', choose one of {', '.join(_REGISTRY)}")
    return importlib.import_module(_REGISTRY[name])
