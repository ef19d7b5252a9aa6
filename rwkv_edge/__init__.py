"""rwkv-edge: a small, fast RWKV runtime with real sparse FFN inference."""
from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig, ModelLoadError  # noqa: E402
from .state import State  # noqa: E402


def load_model(path, backend: str = "reference"):
    """Load an official RWKV `.pth` checkpoint (x052 / x060 / x070) or an rwkv-edge model file (`rwkv-edge convert`)."""
    from .modelfile import is_modelfile, load_modelfile
    from .weights import load_checkpoint
    from .models import model_class

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


__all__ = ["load_model", "ModelConfig", "ModelLoadError", "State", "__version__"]
