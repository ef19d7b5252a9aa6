"""rwkv-edge: a small, fast RWKV runtime with real sparse FFN inference."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig, ModelLoadError  # noqa: E402
from .state import State  # noqa: E402


def load_model(path, backend: str = "auto"):
    """Load a model: an official RWKV `.pth` checkpoint (x052 / x060 / x070), an rwkv-edge model file
    (`rwkv-edge convert`) or a model package directory (sparse with its predictors).

    backend: "auto" (numba kernels where numba works, else the numpy reference with a warning),
    "numba", or "reference" (the numpy oracle: slow, float32 everywhere)."""
    from .runtime import open_model

    return open_model(path, backend=backend)


__all__ = ["load_model", "ModelConfig", "ModelLoadError", "State", "__version__"]
