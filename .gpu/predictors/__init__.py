"""FFN sparsity predictors: learn which FFN neurons fire, per layer, from collected activations.

Public API:
  collect(model, tokens, out_dir, n_tokens)     -- stream FFN inputs to float16 shards + manifest
  load_layer(dir, layer) / labels(model, layer, xk)
  fit(model, data_dir, kind="quantized"|"mlp"|"pq"|"quantized+mlp", bits=2, target=0.99, metric="mass")
  PredictorBundle: .predict(layer, xk (T, D)) -> bool (T, F), .predict_indices(layer, x (D,)) -> int32,
                   .save(path), PredictorBundle.load(path, model=None)
  report(model, bundle_or_list, tokens)         -- per-layer table + summary line
"""
from .bundle import PredictorBundle
from .collect import CollectError, collect, labels, load_layer, read_manifest
from .fit import fit
from .report import report

__all__ = ["PredictorBundle", "CollectError", "collect", "labels", "load_layer", "read_manifest", "fit", "report"]
