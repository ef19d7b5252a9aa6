"""Fit a PredictorBundle for every layer of a model from a collect directory.

Per layer the stored rows are split in order: the last `heldout_frac` (at most `max_heldout`)
rows calibrate the thresholds; earlier rows (a seeded sample of at most `max_train`) train the
MLP and choose the quantized predictor's clipping. The held-out rows come after the training
rows in the text, so calibration sees inputs the training never saw.
A collection of "early" rows (`collect --input early`) gives an early bundle (kind quantized only):
per layer the same quantized W_k plus the least-squares map of early.EarlyPredictor from the
training rows (early_map "full": A (D, D); "diag": A = diag(d), stored as d, element-wise on a GPU),
calibrated on the held-out rows' early inputs.
"""
from __future__ import annotations

import time

import numpy as np

from .bundle import PredictorBundle
from .calibrate import check_target
from .collect import check_model, labels, load_layer, read_manifest, split_rows
from .early import EarlyMoments, EarlyPredictor, add_shift_rows
from .ensemble import UnionPredictor
from .mlp import MLPPredictor
from .pq import PQPredictor
from .quantized import QuantizedPredictor

KINDS = ("quantized", "mlp", "pq")
EARLY_MAPS = ("full", "diag")


def parse_kind(kind: str) -> list[str]:
    """'quantized' -> ['quantized']; a union is written 'quantized+mlp' (or 'union:quantized,mlp')."""
    k = kind.strip().lower()
    if k.startswith("union:"):
        k = k[len("union:"):].replace(",", "+")
    members = [m.strip() for m in k.split("+") if m.strip()]
    bad = [m for m in members if m not in KINDS]
    if not members or bad:
        raise ValueError(f"unknown predictor kind {kind!r}: use {', '.join(KINDS)} or a union like quantized+mlp")
    if len(set(members)) != len(members):
        raise ValueError(f"predictor kind {kind!r} names a member twice")
    return members


def fit(model, data_dir: str, kind: str = "quantized", bits: int = 2, group_size: int | None = 64,
        clip="auto", target: float = 0.99, metric: str = "mass", margin: float = 0.0,
        heldout_frac: float = 0.1, max_heldout: int = 16384, max_train: int = 65536,
        hidden: int = 64, epochs: int = 4, batch_size: int = 512, lr: float = 2e-3, threads: int | None = None,
        pq_m: int | None = None, pq_nbits: int = 6,
        seed: int = 0, device: str = "cpu", progress: bool = True, log=None,
        early_map: str = "diag") -> PredictorBundle:
    """Fit and calibrate predictors of `kind` for all layers of `model` from `data_dir`.

    kind: "quantized" | "mlp" | "pq" | a union such as "quantized+mlp".
    quantized: bits (1/2/4/8), group_size (None = per row), clip ("auto", None or a std multiple).
    mlp: hidden, epochs, batch_size, lr, threads (torch CPU threads), device ("cpu"/"cuda"), seed.
    pq: pq_m sub-vectors, pq_nbits.
    target/metric/margin: per-layer calibration goal (metric "mass" or "active").
    log: optional callable(str) for one line per layer.
    early_map (early rows only): "diag" (EarlyPredictor, A = diag(d): the default, docs/quality/early-predictors.md
    gives the figures) or "full" A (D, D).
    """
    members = parse_kind(kind)
    if early_map not in EARLY_MAPS:
        raise ValueError(f"unknown early map {early_map!r}: use one of {', '.join(EARLY_MAPS)}")
    check_target(target, metric)
    if not 0.0 < heldout_frac < 1.0:
        raise ValueError(f"heldout fraction must be in (0, 1), got {heldout_frac}")
    man = read_manifest(data_dir)
    check_model(man, model, data_dir)
    early = man["input"] == "early"
    if early and members != ["quantized"]:
        raise ValueError(f"{data_dir} holds early rows: only --kind quantized is fitted on them")
    cfg = model.config
    rng = np.random.default_rng(seed)
    preds, per_layer = [], []
    t_start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.n_layer, desc=f"fit {kind}", unit="layer", dynamic_ncols=True)
    for layer in range(cfg.n_layer):
        t0 = time.perf_counter()
        n = int(man["layers"][layer]["count"])
        n_held = min(max(1, int(n * heldout_frac)), max_heldout)
        if n - n_held < 1:
            raise ValueError(f"{data_dir}: layer {layer} has only {n} rows; collect more tokens")
        x_all = load_layer(data_dir, layer)                                  # (n, dim) float32
        x_held, xk_held = split_rows(man, x_all[n - n_held:])
        n_train = n - n_held
        pick = np.sort(rng.choice(n_train, size=min(n_train, max_train), replace=False))
        x_train, xk_train = split_rows(man, x_all[pick])
        del x_all
        _, act_held = labels(model, layer, xk_held)                          # (n_held, F)
        w_key = model.blocks[layer].ffn_key                                  # (F, D)

        built = []
        for m in members:
            if m == "quantized":
                if clip == "auto":
                    xs = xk_train[:4096]
                    p = QuantizedPredictor.fit_auto_clip(w_key, bits, group_size, xs, labels(model, layer, xs)[1],
                                                         target, metric)
                else:
                    p = QuantizedPredictor.fit(w_key, bits, group_size, clip)
            elif m == "mlp":
                p = MLPPredictor.fit(x_train, w_key, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                                     seed=seed + layer, device=device, progress=progress, desc=f"mlp L{layer}",
                                     threads=threads)
            else:
                p = PQPredictor.fit(w_key, m=pq_m, nbits=pq_nbits, seed=seed + layer)
            built.append(p)
        if early:        # the same quantized W_k, scored on ln1(x_L) A + c + mix prev
            mom, D, mix = EarlyMoments(cfg, "ln1", target="y"), cfg.n_embd, np.asarray(model.blocks[layer].ffn_xk)
            add_shift_rows(mom, layer, x_train[:, :D], x_train[:, D:], xk_train, mix)
            dg = early_map == "diag"
            built = [EarlyPredictor.fit(mom, layer, mix, built[0].qm, built[0].clip, rank=0 if dg else None, diag=dg)]
        pred = built[0] if len(built) == 1 else UnionPredictor(built)
        c = pred.calibrate(x_held, act_held, target, metric, margin)
        preds.append(pred)
        info = {"layer": layer, "rows": n, "train": int(len(pick)), "heldout": n_held,
                "threshold": c.threshold, "k": c.k, "percentile": round(c.percentile, 4),
                "recall": round(c.recall, 4), "bytes": pred.nbytes, "seconds": round(time.perf_counter() - t0, 2),
                "predictor": pred.describe()}
        per_layer.append(info)
        if log is not None:
            log(f"layer {layer:2d}: {info['predictor']}, held-out {metric} recall {c.recall:.4f} at "
                f"sparsity {c.percentile:.3f} ({info['seconds']:.1f} s)")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    meta = {"data_dir_tokens": int(man["tokens"]), "heldout_frac": heldout_frac, "seed": seed,
            "group_size": group_size, "clip": clip, "hidden": hidden, "epochs": epochs,
            "batch_size": batch_size, "lr": lr, "pq_m": pq_m,
            "pq_nbits": pq_nbits, "margin": margin, **({"early_map": early_map} if early else {}),
            "fit_seconds": round(time.perf_counter() - t_start, 2),
            "layers": per_layer}
    return PredictorBundle(preds, model.fingerprint, cfg, "+".join(members),
                           bits if "quantized" in members else None, target, metric, meta, man["input"])


def recalibrate(bundle: PredictorBundle, model, data_dir: str, target: float | None = None,
                percentiles: list[float] | None = None, metric: str = "mass", margin: float = 0.0,
                heldout_frac: float = 0.1, max_heldout: int = 16384) -> PredictorBundle:
    """Re-set every layer's threshold of a fitted bundle, without refitting, on the held-out rows
    `fit` calibrated on (same split): either for a recall `target` (+ margin), or at a per-layer
    score `percentiles` list (predicted sparsity per layer, e.g. `calibrate.seed_schedule`).
    Cheap next to fitting, so a grid fits each kind once. The bundle is changed and returned."""
    from .calibrate import threshold_for_percentile, topk_for_percentile

    if (target is None) == (percentiles is None):
        raise ValueError("give either a recall target or per-layer percentiles")
    L = model.config.n_layer
    if percentiles is not None:
        percentiles = [float(p) for p in percentiles]
        if len(percentiles) != L:
            raise ValueError(f"need {L} per-layer percentiles, got {len(percentiles)}")
    else:
        check_target(target, metric)
    bundle.check_model(model)
    man = read_manifest(data_dir)
    check_model(man, model, data_dir)
    if man["input"] != bundle.input:
        raise ValueError(f"{data_dir} holds {man['input']} rows, the bundle scores {bundle.input} inputs")
    for layer, p in enumerate(bundle.predictors):
        n = int(man["layers"][layer]["count"])
        n_held = min(max(1, int(n * heldout_frac)), max_heldout)
        x_held, xk_held = split_rows(man, load_layer(data_dir, layer, start=n - n_held))
        _, act = labels(model, layer, xk_held)
        if percentiles is None:
            p.calibrate(x_held, act, target, metric, margin)
        elif getattr(p, "mode", "") not in ("threshold", "topk"):
            raise ValueError(f"layer {layer}: percentile settings need a threshold or top-k predictor, not {p.kind}")
        else:
            fn = topk_for_percentile if p.mode == "topk" else threshold_for_percentile
            p.calib = fn(p.score(x_held), act, percentiles[layer], metric)
    bundle.target = target
    bundle.metric = metric
    bundle.meta["calibration"] = {"target": target, "percentiles": percentiles, "metric": metric, "margin": margin}
    return bundle
