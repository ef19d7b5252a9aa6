"""One module per RWKV version; `model_class(version)` picks it."""
from __future__ import annotations

import importlib

_BY_VERSION = {"x052": ("v5", "RWKV5"), "x060": ("v6", "RWKV6"), "x070": ("v7", "RWKV7")}


def model_class(version: str):
    if version not in _BY_VERSION:
        raise ValueError(f"unsupported RWKV version '{version}'")
    mod, cls = _BY_VERSION[version]
    return getattr(importlib.import_module(f"{__name__}.{mod}"), cls)
