"""Write an exported model directory: ONNX graphs + `model.json` sidecar (+ tokenizer), atomically.

Layout of an export directory:
    model.onnx          one-token step graph, dense FFN
    model.sparse.onnx   one-token step graph, sparse FFN (only when sparse_topk is given)
    model.exact.onnx    one-token step graph, FFN reading only the W_v rows of active neurons
                        (lossless: the dense graph's numbers; only when exact_sparse is set)
    prefill.onnx        T-token prefill graph, dense FFN (optional)
    model.json          sidecar: sizes, graph I/O names, state names/shapes, dtype, sparsity, fingerprint
    tokenizer.json      copied from beside the checkpoint when there is one
Graphs over 2 GB keep their weights in `<graph>.data` (ONNX external data).
`export.verify.to_ort` later adds `model.ort`, ... (ORT mobile format) and records them in model.json.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import onnx

from rwkv_edge.fileio import atomic_write, clean_stale_temps, current_umask, temp_prefix

from .onnx_graph import build_graph, state_specs
from .onnx_ops import DTYPES

FORMAT = "rwkv-edge-onnx"
FORMAT_VERSION = 1
SIDECAR = "model.json"
_EXTERNAL_DATA_LIMIT = 1_800_000_000   # bytes of initializers; protobuf's hard limit is 2 GiB

# onnxruntime session config the sidecar recommends. Its DQ->MatMul fusion (MatMulNBits) defaults
# to accuracy level 4 (activations quantized to int8 inside the kernel); level 1 keeps them fp32.
_EXACT = {"session.qdq_matmulnbits_accuracy_level": "1"}


def _initializer_bytes(m: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in m.graph.initializer)


def _save(m: onnx.ModelProto, path: Path) -> list[str]:
    """Save one graph; returns the file names written (external data beyond 1.8 GB)."""
    if _initializer_bytes(m) <= _EXTERNAL_DATA_LIMIT:
        onnx.save_model(m, str(path))
        return [path.name]
    data = path.name + ".data"
    onnx.save_model(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data, size_threshold=1024)
    return [path.name, data]


def _io(seq: bool, config) -> dict:
    return {"token_input": "tokens" if seq else "token", "token_shape": ["T"] if seq else [1],
            "logits_output": "logits", "state_inputs": [n for n, _ in state_specs(config)],
            "state_outputs": ["new_" + n for n, _ in state_specs(config)]}


def export_onnx(model, out_dir, dtype: str = "fp32", sparse_topk: Optional[Sequence[int]] = None,
                predictor_weights: Optional[Sequence] = None, *, tokenizer: Optional[str] = None,
                prefill: bool = True, sparsity_info: Optional[dict] = None,
                ort_session_config: Optional[dict] = None, overwrite: bool = True,
                int8_matmul: str = "dynamic", exact_sparse: bool = False) -> Path:
    """Export `model` (an RWKV-7 model from `rwkv_edge.load_model`) to the directory `out_dir`.

    dtype: "fp32" | "fp16" | "int8" weight storage (state and activations are always fp32).
    sparse_topk: one static top-k per layer; when given, `model.sparse.onnx` is written too.
    predictor_weights: per layer, what scores the neurons for the top-k (see `build_graph`): a
        quantized W_k (`bits`, `codes()`, `scale`, `zero`), a float (F, D) array, or None (W_k).
    tokenizer: path of a `tokenizer.json` to copy next to the graphs (None: no tokenizer file).
    prefill: also write the T-token `prefill.onnx` graph.
    sparsity_info: extra JSON-able facts for the sidecar's "sparsity" entry (e.g. the bundle's
        target recall, the top-k scale).
    ort_session_config: session config entries the sidecar recommends (default: exact kernels).
    overwrite: replace an existing export directory (one holding a model.json) at out_dir.
    int8_matmul: for dtype int8, "dynamic" (MatMulInteger) or "dequant" (DequantizeLinear + MatMul).
    exact_sparse: also write `model.exact.onnx` (graph "exact_step"): the lossless zero-skipping FFN.
    The directory appears complete or not at all: everything is written to a temporary sibling
    directory that is renamed into place. Returns the directory path.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = model.config
    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir}: exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / SIDECAR).exists():
            raise FileExistsError(f"{out_dir}: not empty and not an rwkv-edge export; refusing to replace it")
        if not overwrite:
            raise FileExistsError(f"{out_dir}: already exists")
    if tokenizer is not None and not Path(tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file {tokenizer} not found")

    # Graphs are built one at a time (a copy of the weights each) and saved straight away.
    build = lambda topk=None, seq=False, exact=False: build_graph(model, dtype, topk, predictor_weights, seq=seq,
                                                                  int8_matmul=int8_matmul, exact_ffn=exact)
    graphs = {"step": ("model.onnx", lambda: build(), False)}
    if exact_sparse:
        graphs["exact_step"] = ("model.exact.onnx", lambda: build(exact=True), False)
    if sparse_topk is not None:
        graphs["sparse_step"] = ("model.sparse.onnx", lambda: build(sparse_topk), False)
    if prefill:
        graphs["prefill"] = ("prefill.onnx", lambda: build(seq=True), True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # temp dirs of killed exports (their process is gone) are removed; ours carries our pid
    clean_stale_temps(out_dir.parent, f".{out_dir.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f".{out_dir.name}."), suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o777 & ~current_umask())      # mkdtemp makes 0700; the export gets the usual mode
    try:
        files: dict = {}
        entries: dict = {}
        for key, (fname, make, seq) in graphs.items():
            m = make()
            written = _save(m, tmp / fname)
            files.update({f: (tmp / f).stat().st_size for f in written})
            entries[key] = {"file": fname, "opset": int(m.opset_import[0].version), **_io(seq, cfg)}
            del m
        tok_name = None
        if tokenizer is not None:
            tok_name = "tokenizer.json"
            shutil.copyfile(tokenizer, tmp / tok_name)
            files[tok_name] = (tmp / tok_name).stat().st_size
        sidecar = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"architecture": "rwkv", **cfg.to_dict(), "n_head": cfg.n_head},
            "fingerprint": model.fingerprint,
            "dtype": dtype,
            "int8_matmul": int8_matmul if dtype == "int8" else None,
            "state_dtype": "float32",
            "state": [{"name": n, "shape": list(s), "output": "new_" + n} for n, s in state_specs(cfg)],
            "graphs": entries,
            "tokenizer": tok_name,
            "sparsity": None if sparse_topk is None else {
                "graph": "sparse_step", "topk": [int(k) for k in sparse_topk],
                "active_fraction": [round(int(k) / cfg.ffn_dim, 6) for k in sparse_topk],
                "predictor": _predictor_desc(predictor_weights), **(sparsity_info or {})},
            "ort_session_config": dict(_EXACT if ort_session_config is None else ort_session_config),
            "files": files,
        }
        from rwkv_edge import __version__
        sidecar["rwkv_edge_version"] = __version__
        write_sidecar(tmp, sidecar)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _predictor_desc(preds) -> dict:
    if preds is None or all(p is None for p in preds):
        return {"kind": "exact W_k"}
    p = next(p for p in preds if p is not None)
    if hasattr(p, "bits"):
        return {"kind": "quantized W_k", "bits": int(p.bits), "group_size": p.group_size,
                "storage": "uint4 codes + fp32 scale/zero, DequantizeLinear (blocked) + MatMul"
                if p.bits <= 4 else "uint8 codes + fp32 scale/zero, DequantizeLinear (blocked) + MatMul"}
    return {"kind": "float matrix (stored in the export dtype)"}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Rename tmp to out_dir; an existing out_dir is moved aside first and removed after."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
        os.rmdir(old)
        os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_sidecar(onnx_dir, meta: dict) -> None:
    """Write `model.json` into `onnx_dir` atomically (temp file + rename)."""
    path = Path(onnx_dir) / SIDECAR
    with atomic_write(path, "w", prefix=".model.json.") as f:
        f.write(json.dumps(meta, indent=1) + "\n")


def read_sidecar(onnx_dir, check_files: bool = True) -> dict:
    """The parsed `model.json` of an export directory, checked for format and version; with
    `check_files`, every graph it names must exist with the size the sidecar records (a deleted
    or truncated graph is a ValueError here, not an onnxruntime error later)."""
    path = Path(onnx_dir) / SIDECAR
    if not path.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no {SIDECAR}; not an rwkv-edge ONNX export")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an rwkv-edge ONNX sidecar")
    if str(meta.get("format_version")) != str(FORMAT_VERSION):
        raise ValueError(f"{path}: sidecar version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    graphs, files = meta.get("graphs"), meta.get("files")
    if (not isinstance(graphs, dict) or "step" not in graphs or not isinstance(files, dict)
            or not all(isinstance(g, dict) and isinstance(g.get("file"), str) for g in graphs.values())
            or not isinstance(meta.get("state"), list) or not isinstance(meta.get("dtype"), str)):
        raise ValueError(f"{path}: damaged sidecar (graphs, files, state or dtype missing)")
    if check_files:
        for name, size in files.items():
            f = Path(onnx_dir) / str(name)
            if not f.is_file():
                raise ValueError(f"{onnx_dir}: {name} is missing (the export is incomplete; export it again)")
            if isinstance(size, int) and f.stat().st_size != size:
                raise ValueError(f"{onnx_dir}: {name} has {f.stat().st_size} bytes, model.json records {size} "
                                 f"(truncated or replaced; export it again)")
    return meta
