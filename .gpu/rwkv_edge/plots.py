"""PNG plots of predictor and quality results (matplotlib, an optional dependency: `pip install rwkv-edge[plot]`).

- `plot_report`: per-layer recall and predicted sparsity of predictor bundles (`predictor-report --plot`);
- `plot_front`: the quality/speed front of a sparsity table (KLD vs decode tok/s, one marker per kind);
- `plot_layer_density`: the per-layer density each row of a sparsity table runs at.
matplotlib is imported only inside these functions (Agg backend, no display needed); without it they
raise `PlotError` with a one-line install hint. Files are written atomically.
"""
from __future__ import annotations

import io
import os

from .fileio import atomic_write

MARKERS = {"1bit": "v", "2bit": "o", "4bit": "s", "mlp": "^", "pq": "D", "4bit+mlp": "P", "dense": "*"}


class PlotError(RuntimeError):
    """Plotting is not possible (matplotlib missing)."""


def _plt():
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'rwkv-edge[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    with atomic_write(os.fspath(path), prefix=".plot-") as f:
        f.write(buf.getvalue())


def plot_report(tables: list, names: list, path: str) -> None:
    """tables: per bundle, the per-layer rows of `predictors.report.summarize` (layer, recall,
    mass_recall, pred_sparsity, true_sparsity). Left: recall per layer; right: sparsity per layer."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for rows, name in zip(tables, names):
        layers = [r["layer"] for r in rows]
        line, = a.plot(layers, [r["mass_recall"] for r in rows], marker="o", label=f"{name} mass recall")
        a.plot(layers, [r["recall"] for r in rows], marker=".", ls="--", color=line.get_color(),
               label=f"{name} active recall")
        b.plot(layers, [r["pred_sparsity"] for r in rows], marker="o", color=line.get_color(), label=f"{name} predicted")
    if tables:
        b.plot([r["layer"] for r in tables[0]], [r["true_sparsity"] for r in tables[0]], color="k", ls=":",
               marker="x", label="true (relu(W_k x) = 0)")
    a.set(xlabel="layer", ylabel="recall", title="recall per layer")
    b.set(xlabel="layer", ylabel="sparsity (share of neurons skipped)", title="sparsity per layer")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def plot_front(rows: list, path: str, title: str = "") -> None:
    """rows: sparsity-table rows (kind, setting, kld_mean, tok_s, bytes_tok_i8 or density). Left: KLD
    (log scale) against decode tok/s; right: KLD against FFN + predictor bytes read per token (int8
    model file; the density if a row lacks it), which does not depend on the machine's load. One marker
    per predictor kind, the setting written beside each point."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    kinds = []
    for r in rows:
        if r["kind"] != "dense" and r["kind"] not in kinds:
            kinds.append(r["kind"])
    xb = "bytes_tok_i8" if all(r.get("bytes_tok_i8") for r in rows if r["kind"] != "dense") else "density"
    for ax, xkey in zip(axes, ("tok_s", xb)):
        for k in kinds:
            pts = [r for r in rows if r["kind"] == k and r.get(xkey) == r.get(xkey) and r.get(xkey)]
            if not pts:
                continue
            xs = [r[xkey] / (2**20 if xkey == "bytes_tok_i8" else 1) for r in pts]
            ys = [max(r["kld_mean"], 1e-6) for r in pts]
            ax.scatter(xs, ys, marker=MARKERS.get(k, "o"), s=45, label=k)
            for r, x, y in zip(pts, xs, ys):
                ax.annotate(r["setting"], (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        if dense is not None and dense.get(xkey) and dense.get(xkey) == dense.get(xkey):
            x = dense[xkey] / (2**20 if xkey == "bytes_tok_i8" else 1)
            ax.axvline(x, color="k", ls=":", label=f"dense {x:.1f}" if xkey == "tok_s" else "dense")
        ax.set_yscale("log")
        ax.set_ylabel("mean KL divergence to dense (nats)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_xlabel("decode tokens/s (sparse FFN, numba CPU)")
    axes[1].set_xlabel("FFN + predictor MiB read per token (int8 model file)" if xb == "bytes_tok_i8"
                       else "FFN density run")
    if xb == "bytes_tok_i8" and dense is not None and dense.get(xb):
        axes[1].set_xscale("log")
    fig.suptitle(title or "quality / speed front")
    _save(fig, path)
    plt.close(fig)


def plot_layer_density(rows: list, path: str, title: str = "") -> None:
    """Per-layer density (share of neurons computed, on the calibration rows) of each table row."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ld = r.get("layer_density")
        if not ld:
            continue
        ax.plot(range(len(ld)), ld, marker=MARKERS.get(r["kind"], "o"), ms=4, lw=1, label=f"{r['kind']} {r['setting']}")
    ax.set(xlabel="layer", ylabel="density (share of FFN neurons computed)", title=title or "density per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    _save(fig, path)
    plt.close(fig)
