"""Check an ONNX export against the Python runtime, and convert it to the ORT mobile format.

`verify` / `compare` run onnxruntime and `model.forward` token by token on the same tokens with
the state carried on both sides, then continue greedily from both and count identical tokens.
A sparse graph is compared with the Python runtime running the same sparse FFN: the predictor is
read back from the graph's initializers and the same static top-k is applied per token.
`to_ort` converts the graphs with onnxruntime's converter and checks the `.ort` files give the
logits of the `.onnx` ones.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .export import read_sidecar
from .run_ort import OrtModel


def _relu_sq(x):
    x = np.maximum(x, 0.0)
    return x * x


def sparse_reference(model, predictors: Sequence[np.ndarray], topk: Sequence[int]):
    """`model` with its FFN replaced by the sparse FFN the exported sparse graph computes:
    scores = xk @ P_i.T (P_i a dequantized (F, D) predictor), keep the top-k neurons per token,
    relu(W_k[S] xk)^2 then W_v[:, S]."""
    def ffn(i, xk):
        b, k = model.blocks[i], int(topk[i])
        scores = xk @ np.asarray(predictors[i], np.float32).T                    # (T, F)
        out = np.empty_like(xk)
        for t in range(xk.shape[0]):
            idx = np.argpartition(-scores[t], k - 1)[:k] if k < scores.shape[1] else slice(None)
            out[t] = b.ffn_value[:, idx] @ _relu_sq(b.ffn_key[idx] @ xk[t])
        return out
    return model.with_ffn(ffn)


def predictors_from_graph(onnx_path, n_layer: int) -> list[np.ndarray]:
    """The dequantized (F, D) predictor matrix of each layer, read from a sparse graph's
    initializers (`b{i}.ffn.predictor` and its `.scale`/`.zero`/`.zp` companions)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(onnx_path))
    inits = {t.name: t for t in m.graph.initializer}
    arr = lambda n: numpy_helper.to_array(inits[n])
    out = []
    for i in range(n_layer):
        n = f"b{i}.ffn.predictor"
        if n not in inits:
            raise ValueError(f"{onnx_path}: no initializer {n}; not a sparse graph")
        q = arr(n)                                                   # stored transposed: (D, F)
        if n + ".zero" in inits:                                     # low-bit: zero + scale * q
            s, z = arr(n + ".scale"), arr(n + ".zero")               # (G, F)
            gs = q.shape[0] // s.shape[0]
            w = np.repeat(z, gs, 0) + np.repeat(s, gs, 0) * q.astype(np.float32)
        elif n + ".scale" in inits:                                  # int8, one scale per column
            w = q.astype(np.float32) * arr(n + ".scale")[None, :]
        else:
            w = q.astype(np.float32)
        out.append(np.ascontiguousarray(w.T))
    return out


def reference_model(onnx_dir, model, variant: str = "dense"):
    """The Python model the `variant` graph of `onnx_dir` should reproduce."""
    if variant in ("dense", "exact"):   # the exact graph skips only zero terms: the plain model
        return model
    meta = read_sidecar(onnx_dir)
    if not meta.get("sparsity"):
        raise ValueError(f"{onnx_dir}: no sparse graph")
    path = Path(onnx_dir) / meta["graphs"]["sparse_step"]["file"]
    return sparse_reference(model, predictors_from_graph(path, model.config.n_layer), meta["sparsity"]["topk"])


def _greedy(step, logits, state, n):
    ids = []
    for _ in range(n):
        t = int(np.argmax(logits))
        ids.append(t)
        logits, state = step(t, state)
    return ids


def compare(onnx_dir, model, tokens: Sequence[int], variant: str = "dense", greedy_tokens: int = 32,
            exact: bool = True, file_suffix: str = ".onnx", reference=None) -> dict:
    """Run the export and the Python runtime on `tokens`, one step at a time with state carried.

    Returns {"max_abs_diff": max |logits_ort - logits_py| over all steps, "per_step": [...],
    "state_max_abs_diff", "greedy_same": length of the identical prefix of the two greedy
    continuations of `greedy_tokens` tokens, "greedy_ort"/"greedy_py": the two, and, when the
    export has a prefill graph and variant is dense, "prefill_max_abs_diff"}.
    reference: the Python model to compare with (default: `reference_model(onnx_dir, model, variant)`).
    """
    meta = read_sidecar(onnx_dir)
    if meta.get("fingerprint") and meta["fingerprint"] != model.fingerprint:
        raise ValueError(f"{onnx_dir} was exported from another model "
                         f"(fingerprint {meta['fingerprint']} != {model.fingerprint})")
    tokens = [int(t) for t in tokens]
    if not tokens:
        raise ValueError("compare needs at least one token")
    ref = reference if reference is not None else reference_model(onnx_dir, model, variant)
    om = OrtModel(str(onnx_dir), variant, exact=exact, file_suffix=file_suffix)
    st_o, st_p, per_step = om.zero_state(), None, []
    for t in tokens:
        lo, st_o = om.step(t, st_o)
        lp, st_p = ref.step(t, st_p)
        per_step.append(float(np.abs(lo - lp).max()))
    res = {"variant": variant, "dtype": meta["dtype"], "tokens": len(tokens), "max_abs_diff": max(per_step),
           "per_step": per_step, "logit_scale": float(np.abs(lp).max())}
    res["state_max_abs_diff"] = max(float(np.abs(st_o[f"{f}_{i}"] - getattr(st_p, f)[i]).max())
                                    for i in range(model.config.n_layer) for f in ("att_x", "wkv", "ffn_x"))
    if greedy_tokens > 0:
        g_o = _greedy(om.step, lo, st_o, greedy_tokens)
        g_p = _greedy(ref.step, lp, st_p, greedy_tokens)
        same = next((j for j, (a, b) in enumerate(zip(g_o, g_p)) if a != b), len(g_o))
        res.update(greedy_same=same, greedy_ort=g_o, greedy_py=g_p)
    if variant == "dense" and om.prefill_session is not None and len(tokens) > 1:
        lo, _ = om.prefill(tokens, om.zero_state())
        lp, _ = ref.forward(tokens)
        res["prefill_max_abs_diff"] = float(np.abs(lo - lp).max())
    return res


def verify(onnx_dir, model, tokens: Sequence[int], variant: str = "dense") -> float:
    """Max abs logit difference between onnxruntime on `onnx_dir` and the Python runtime over
    `tokens` decoded one by one (see `compare` for the full report)."""
    return compare(onnx_dir, model, tokens, variant, greedy_tokens=0)["max_abs_diff"]


def to_ort(onnx_dir, tokens: Optional[Sequence[int]] = None, check: bool = True,
           keep_fp16: bool = False) -> dict:
    """Convert every graph of `onnx_dir` to the ORT mobile format (`model.ort`, ... beside the
    `.onnx` files, plus `required_operators.config` for a minimal onnxruntime build), record them
    in model.json, then load each `.ort` and compare its logits with its `.onnx` graph's.

    The conversion is what `python -m onnxruntime.tools.convert_onnx_models_to_ort
    --target_platform arm` does (a session that saves its optimized graph in ORT format, layout
    transforms for x86 left out), plus the sidecar's session config: the converter's Python API
    cannot pass it, and without it the int8 / low-bit MatMulNBits kernels are baked in at
    accuracy level 4 (int8 activations), which moves logits and the sparse top-k.
    keep_fp16: for an fp16 export, keep fp16 weights in the file (basic optimizations, no constant
    folding: onnxruntime then casts the weights every step); by default the Casts are folded and
    the .ort holds fp32 weights, as onnxruntime's CPU provider holds them in memory anyway.
    Returns {graph file: {"ort_file", "ort_bytes", "onnx_bytes", "max_abs_diff"}}.
    """
    import onnxruntime as ort
    from onnxruntime.tools.ort_format_model import create_config_from_models

    from .export import write_sidecar

    onnx_dir = Path(onnx_dir)
    meta = read_sidecar(onnx_dir)
    out, ort_files = {}, {}
    for key, g in meta["graphs"].items():
        ort_file = onnx_dir / (Path(g["file"]).stem + ".ort")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = str(ort_file)
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.add_session_config_entry("session.qdqisint8allowed", "1")       # as the converter for arm
        for k, v in meta.get("ort_session_config", {}).items():
            so.add_session_config_entry(k, str(v))
        disabled = ["NchwcTransformer"]
        if keep_fp16 and meta["dtype"] == "fp16":
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            disabled.append("ConstantFolding")
        ort.InferenceSession(str(onnx_dir / g["file"]), so, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        ort_files[key] = ort_file.name
        out[g["file"]] = {"ort_file": ort_file.name, "ort_bytes": ort_file.stat().st_size,
                          "onnx_bytes": (onnx_dir / g["file"]).stat().st_size}
    create_config_from_models([onnx_dir / f for f in ort_files.values()],
                              onnx_dir / "required_operators.config", False)
    meta["ort"] = {"files": ort_files, "fp16_weights_kept": bool(keep_fp16 and meta["dtype"] == "fp16")}
    write_sidecar(onnx_dir, meta)
    if not check:
        return out
    tokens = list(tokens) if tokens is not None else [0, 1, 2, 3, 4, 5, 6, 7]
    for key, g in meta["graphs"].items():
        variant = {"sparse_step": "sparse", "exact_step": "exact"}.get(key, "dense")
        a = OrtModel(str(onnx_dir), variant)
        b = OrtModel(str(onnx_dir), variant, file_suffix=".ort")
        if key == "prefill":
            la, _ = a.prefill(tokens, a.zero_state())
            lb, _ = b.prefill(tokens, b.zero_state())
            out[g["file"]]["max_abs_diff"] = float(np.abs(la - lb).max())
            continue
        sa, sb, mx = a.zero_state(), b.zero_state(), 0.0
        for t in tokens:
            la, sa = a.step(t, sa)
            lb, sb = b.step(t, sb)
            mx = max(mx, float(np.abs(la - lb).max()))
        out[g["file"]]["max_abs_diff"] = mx
    return out
