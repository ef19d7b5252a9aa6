"""Measure a PredictorBundle on text: per-layer sparsity, recall, mass recall and bytes.

The text runs through the dense model; at each layer's FFN input the bundle's prediction (from
xk, or for an early bundle from ln1(x_L) and the FFN shift state of the same tokens) is compared with the true active set relu(W_k xk) > 0 and with the activation mass relu(W_k xk)^2.
The last line of the report is machine-readable:

    mean_pred_sparsity=0.XXX mean_recall=0.XXX mean_mass_recall=0.XXX predictor_bytes=N ffn_key_fp16_bytes=N
"""
from __future__ import annotations

import numpy as np

from .calibrate import recall_stats
from .collect import labels


def evaluate(model, bundle, tokens, chunk: int = 512, progress: bool = True) -> list:
    """Run token ids through `model` (windows of `chunk`, state carried) and return one dict of
    summed counts per layer (see `calibrate.recall_stats`) for `bundle`'s predictions.
    `bundle` may be a list of bundles: they are measured on the same run, and a list of
    per-bundle results is returned."""
    many = isinstance(bundle, (list, tuple))
    bundles = list(bundle) if many else [bundle]
    for b in bundles:
        b.check_model(model)
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("predictor report needs at least one token")
    L = model.config.n_layer
    acc = [[None] * L for _ in bundles]

    early = {}                                            # layer -> [ln1 (T, D), prev (T, D)]

    def hook(layer, xk):
        _, act = labels(model, layer, xk)                 # (T, F)
        xe = np.concatenate(early.pop(layer), 1) if layer in early else None
        for j, b in enumerate(bundles):
            s = recall_stats(b.predict(layer, xe if b.input == "early" else xk), act)   # (T, F) bool
            a = acc[j][layer]
            acc[j][layer] = s if a is None else {k: a[k] + v for k, v in s.items()}

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tokens), unit="tok", desc="report", dynamic_ncols=True)
    hooks = [(model.hooks.ffn_input, hook)]
    if any(b.input == "early" for b in bundles):
        hooks += [(model.hooks.att_input, lambda i, x, xa: early.__setitem__(i, [model.ops.to_host(xa)])),
                  (model.hooks.ffn_shift, lambda i, x, prev: early[i].append(model.ops.to_host(prev)))]
    for where, h in hooks:
        where.append(h)
    try:
        state = None
        for a in range(0, len(tokens), chunk):
            _, state = model.forward(tokens[a:a + chunk], state)
            if bar is not None:
                bar.update(min(chunk, len(tokens) - a))
    finally:
        for where, h in hooks:
            where.remove(h)
        if bar is not None:
            bar.close()
    return acc if many else acc[0]


def summarize(stats: list[dict], bundle, config) -> list[dict]:
    """Per-layer rates from summed counts."""
    rows = []
    for i, s in enumerate(stats):
        rows.append({
            "layer": i,
            "true_sparsity": 1.0 - s["active"] / s["cells"],
            "pred_sparsity": 1.0 - s["predicted"] / s["cells"],
            "recall": s["hit"] / s["active"] if s["active"] else 1.0,
            "mass_recall": s["mass_hit"] / s["mass"] if s["mass"] > 0 else 1.0,
            "bytes": bundle.layer_nbytes(i),
            "fp16_bytes": config.ffn_dim * config.n_embd * 2,
        })
    return rows


def final_line(rows: list[dict], bundle, config) -> str:
    """The machine-readable summary line (means over layers)."""
    m = lambda k: float(np.mean([r[k] for r in rows]))
    key_bytes = config.n_layer * config.ffn_dim * config.n_embd * 2
    return (f"mean_pred_sparsity={m('pred_sparsity'):.3f} mean_recall={m('recall'):.3f} "
            f"mean_mass_recall={m('mass_recall'):.3f} predictor_bytes={bundle.nbytes} ffn_key_fp16_bytes={key_bytes}")


def format_report(rows: list[dict], bundle, config, n_tokens: int | None = None, name: str | None = None) -> str:
    """The per-layer table followed by the summary line."""
    lines = [f"predictors: {name + ': ' if name else ''}{bundle.describe()}"]
    if n_tokens is not None:
        lines.append(f"tokens: {n_tokens}")
    head = ("layer", "true_sp", "pred_sp", "recall", "mass_rec", "bytes", "%fp16Wk")
    lines.append(f"{head[0]:>5} " + " ".join(f"{h:>8}" for h in head[1:5]) + f" {head[5]:>9} {head[6]:>8}")
    for r in rows:
        lines.append(f"{r['layer']:>5d} {r['true_sparsity']:>8.3f} {r['pred_sparsity']:>8.3f} {r['recall']:>8.4f} "
                     f"{r['mass_recall']:>8.4f} {r['bytes']:>9d} {100 * r['bytes'] / r['fp16_bytes']:>7.2f}%")
    lines.append(final_line(rows, bundle, config))
    return "\n".join(lines)


def report(model, bundle, tokens, chunk: int = 512, progress: bool = True, names=None) -> str:
    """evaluate + format_report: the full text of `predictor-report`. With a list of bundles, one
    table per bundle (each ending with its summary line), separated by blank lines; `names`
    (e.g. file names) label the tables."""
    many = isinstance(bundle, (list, tuple))
    bundles = list(bundle) if many else [bundle]
    names = list(names) if names is not None else [None] * len(bundles)
    stats = evaluate(model, bundles, tokens, chunk, progress)
    return "\n\n".join(format_report(summarize(st, b, model.config), b, model.config, len(tokens), nm)
                        for st, b, nm in zip(stats, bundles, names))
