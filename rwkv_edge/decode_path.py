"""Which batch-1 decode step a `generate.Generation` replays on the cuda backend.

    dec, path = batch1_step(model)      # path: "fused-dense", "fused-predicted", "cuda-graph" or "eager"
    dec.reset(state); logits = dec.step(token); st = dec.state()     # (None for "eager")

  fused-dense      an RWKV-7 model with the dense FFN and no hooks: `cuda_decode.FusedDecode` mode
                   "dense" (seven Triton launches a layer, one CUDA graph a step).
  fused-predicted  an RWKV-7 model from `runtime.run_sparse(model, bundle, "cuda")` (its FFN a
                   `sparse.DeviceSparseFFN`, which keeps the bundle; only that FFN's own hooks set):
                   FusedDecode mode "predicted" on the same bundle (n-bit W_k threshold predictors, or
                   an early bundle with a diagonal map), the same sets as the eager path up to scores
                   within rounding of a threshold.
  cuda-graph       the rest of the dense models (v5/v6, hooks set): the generic captured step
                   `cuda_graph.CudaGraphStep` (hooks must be capturable).
  eager            everything else (a sparse FFN FusedDecode refuses, another FFN replacement, the
                   CPU backends): model.forward per token.

Building FusedDecode rebinds the model's weights to stacked views (a transform: the model's other
paths, e.g. prefill, compute the same numbers). Where it refuses a model (its ValueError: e.g. a head
size or a predictor group size that is not a power of two, a full early map) the step falls back with
a one-line RuntimeWarning, so a supported combination never silently loses its fast path unnoticed.
"""
from __future__ import annotations

import warnings

PATHS = ("fused-dense", "fused-predicted", "cuda-graph", "eager")


def _foreign_hooks(model) -> bool:
    """True when the model has a hook that its FFN did not add itself (FusedDecode runs no hooks)."""
    own = getattr(model.ffn, "own_hooks", ()) if model.ffn is not None else ()
    h = model.hooks
    return any(f not in own for k in vars(h) for f in getattr(h, k))


def fused_mode(model):
    """(mode, bundle) FusedDecode would run for `model`, or None where it does not apply."""
    if getattr(model.ops, "name", "") != "cuda" or model.config.version != "x070" or _foreign_hooks(model):
        return None
    if model.ffn is None:
        return "dense", None
    bundle = getattr(model.ffn, "bundle", None)
    return ("predicted", bundle) if bundle is not None and hasattr(model.ffn, "share_value_t") else None


def batch1_step(model, fused: bool = True, tune: dict | None = None):
    """(step object or None, path name) for one-token decode of `model`; fused=False skips
    FusedDecode (the fallbacks, e.g. to measure what it gains). tune: FusedDecode launch knobs."""
    ops = model.ops
    if getattr(ops, "name", "") != "cuda":
        return None, "eager"
    fm = fused_mode(model) if fused else None
    if fm is not None:
        try:
            from .backends.cuda_decode import FusedDecode

            dec = FusedDecode(model, fm[0], bundle=fm[1], tune=tune)
        except (ValueError, ImportError) as e:
            from .errors import one_line

            warnings.warn(f"fused CUDA decode not used ({one_line(e)}); decoding on the generic path",
                          RuntimeWarning, stacklevel=2)
        else:
            if model.ffn is not None:
                model.ffn.share_value_t(model)    # W_v^T held once (FusedDecode stored it transposed)
            return dec, "fused-" + fm[0]
    if model.ffn is None and hasattr(ops, "CudaGraphStep"):
        return ops.CudaGraphStep(model), "cuda-graph"
    return None, "eager"
