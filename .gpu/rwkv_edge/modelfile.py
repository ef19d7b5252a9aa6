"""The project's own mmap-able model file (.rwkve): convert a checkpoint once, open it instantly.

Layout (little-endian):
    b"RWKVEDGE" | u32 format version | u32 0 | u64 header length | header (UTF-8 JSON) | pad to 64 |
    tensor data, every tensor 64-byte aligned.
The JSON header holds the config, the fingerprint of the source model (so predictor bundles fitted
on the .pth still match), the storage dtype, the data start, the file size, and the tensor table
[{name, dtype, shape, offset (from the data start), nbytes}].

Storage by role (dtype = "fp32" | "fp16" | "int8" | "int4"):
- FFN key/value of each layer: one neuron-bundled tensor `blocks.{i}.ffn.kv` (F, 2, D) =
  (key row, value column) per neuron; int8 adds `blocks.{i}.ffn.kv_scale` (F, 2) per-neuron scales.
- Linear matrices (`*.weight`, 2-D: att r/k/v/o/g, ffn receptance, head): the file dtype; int8 is
  `{name}.q` int8 (out, in) + `{name}.scale` float32 (out,) per output row.
- emb: float32 in fp32 files, float16 otherwise. LoRA-style matrices (w1, w2, a1, ...): float32 /
  float16 / int8 (`{name}.qc` int8 (in, out) + `{name}.cscale` float32 (out,) per output column).
- Everything else (vectors, mixing coefficients, r_k, ...): float32.

int4 (quant/q4.py, symmetric, groups of GROUP = 32 consecutive values along a row, like llama.cpp's Q4_0
with the scales in a table of their own; D, I must be multiples of 32):
- codes: uint8, two per byte. In each group of 32 values (16 bytes) byte i holds value i in its low nibble
  and value 16 + i in its high nibble, each as q + 8 in 0..15 (q in -8..7); w_hat = d * q.
- group table: float16 d per group (d = m / -8, m the group's value of largest magnitude).
- FFN: `blocks.{i}.ffn.kv4` uint8 (F, 2, D/2): per neuron j its key row W_k[j, :] (row 0) then its value
  column W_v[:, j] (row 1), groups along D; `blocks.{i}.ffn.kv4_scale` float16 (F, 2, D/32). A neuron is one
  contiguous read of D bytes plus one of D/8 bytes of scales (576 bytes, 9 cache lines at D = 512).
- Linear matrices (att r/k/v/o, head, ...) (out, in): `{name}.q4` uint8 (out, in/2), groups along `in`,
  and `{name}.s4` float16 (out, in/32).
- LoRA matrices stay int8 (`.qc`/`.cscale`), emb float16, everything else float32 (as in int8 files).
- The header says `"int4": {"group": 32, "scale": "float16", "nibbles": "lo=i,hi=i+16"}` when any tensor
  is int4; the loader checks it, every table's shape against its codes and that every scale is finite
  (a corrupt group table is a ModelLoadError, not wrong numbers).
`convert(..., head_dtype="int4")` stores the head alone in int4 (header "head_dtype"); the int4 tensors
have names of their own, so a reader that predates them fails on a missing tensor, never misreads one
(the format version stays 1).
Loading maps the file (mmap); nothing is read until a kernel touches it (int4 group tables excepted:
the finiteness check reads them, 1/9 of the int4 bytes).
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct

import numpy as np

from .config import ModelConfig, ModelLoadError
from .fileio import atomic_write

MAGIC = b"RWKVEDGE"
FORMAT_VERSION = 1
ALIGN = 64
DTYPES = ("fp32", "fp16", "int8", "int4")
GROUP = 32                                    # int4 group size (quant/q4.py)
_INT4_INFO = {"group": GROUP, "scale": "float16", "nibbles": "lo=i,hi=i+16"}
_PREFIX = struct.Struct("<8sIIQ")             # magic, version, reserved, header length
_LORA = re.compile(r"\.(w1|w2|a1|a2|v1|v2|g1|g2|time_maa_w1|time_maa_w2|time_decay_w1|time_decay_w2)$")
_FFN = re.compile(r"^blocks\.(\d+)\.ffn\.(key|value)\.weight$")


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _role(name: str, shape) -> str:
    if _FFN.match(name):
        return "ffn"
    if name == "emb.weight" or _LORA.search(name):
        return "half"                 # float16 unless the file is fp32
    if name.endswith(".weight") and len(shape) == 2 and min(shape) >= 16 and not name.endswith("ln_x.weight"):
        return "linear"
    return "fp32"


def _plan(config: ModelConfig, shapes: dict, dtype: str, head_dtype: str | None = None):
    """[(tensor name, numpy dtype, shape, producer key)] in file order; producers are resolved in _write.
    head_dtype: storage of head.weight alone (None: dtype)."""
    f16 = np.float32 if dtype == "fp32" else np.float16
    plan = []
    for name, shape in shapes.items():
        role = _role(name, shape)
        ldt = head_dtype if (name == "head.weight" and head_dtype) else dtype
        if role == "ffn":
            m = _FFN.match(name)
            if m.group(2) == "value":
                continue
            i = int(m.group(1))
            F, D = shape
            if dtype == "int4":
                plan.append((f"blocks.{i}.ffn.kv4", np.uint8, (F, 2, D // 2), ("kv", i)))
                plan.append((f"blocks.{i}.ffn.kv4_scale", np.float16, (F, 2, D // GROUP), ("kv_scale", i)))
                continue
            kvt = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[dtype]
            plan.append((f"blocks.{i}.ffn.kv", kvt, (F, 2, D), ("kv", i)))
            if dtype == "int8":
                plan.append((f"blocks.{i}.ffn.kv_scale", np.float32, (F, 2), ("kv_scale", i)))
        elif role == "linear" and ldt == "int4":
            plan.append((name + ".q4", np.uint8, (shape[0], shape[1] // 2), ("q4", name)))
            plan.append((name + ".s4", np.float16, (shape[0], shape[1] // GROUP), ("s4", name)))
        elif role == "linear" and ldt in ("fp16", "fp32") and ldt != dtype:
            plan.append((name, np.float16 if ldt == "fp16" else np.float32, tuple(shape), ("cast", name)))
        elif role == "linear" and ldt == "int8":
            plan.append((name + ".q", np.int8, tuple(shape), ("q", name)))
            plan.append((name + ".scale", np.float32, (shape[0],), ("scale", name)))
        elif role == "linear":
            plan.append((name, f16, tuple(shape), ("cast", name)))
        elif role == "half" and dtype in ("int8", "int4") and len(shape) == 2 and name != "emb.weight":
            plan.append((name + ".qc", np.int8, tuple(shape), ("qc", name)))
            plan.append((name + ".cscale", np.float32, (shape[1],), ("cscale", name)))
        elif role == "half":
            plan.append((name, f16, tuple(shape), ("cast", name)))
        else:
            plan.append((name, np.float32, tuple(shape), ("cast", name)))
    return plan


def _source(model_or_path):
    """(config, weights {official name: float32 array}, fingerprint, source name)."""
    from .models import model_class
    from .weights import load_checkpoint

    if isinstance(model_or_path, (str, os.PathLike)):
        config, weights = load_checkpoint(os.fspath(model_or_path))
        src = os.path.basename(os.fspath(model_or_path))
    elif isinstance(model_or_path, tuple) and len(model_or_path) == 2:
        from .weights import check_finite

        config, weights = model_or_path
        src = "weights"
        check_finite(weights, src)     # a .pth path is checked when loaded
    elif isinstance(getattr(model_or_path, "weights", None), dict):
        m = model_or_path
        return m.config, m.weights, m.fingerprint, type(m).__name__
    else:
        raise TypeError("convert needs a checkpoint path, a (config, weights) pair or a model with .weights")
    fp = model_class(config.version)(config, weights).fingerprint
    return config, weights, fp, src


def convert(model_or_path, out_path, dtype: str = "fp16", head_dtype: str | None = None,
            importance: dict | None = None, source_name: str | None = None) -> str:
    """Write `model_or_path` (a .pth path, (config, weights) or a model keeping `.weights`) to the
    model file `out_path` with storage `dtype` ("fp32", "fp16", "int8", "int4"; head.weight in
    `head_dtype` if given); atomic (temp + rename). Returns out_path.
    int4 scales come from quant.q4's least-squares search, weighted per input column by
    importance[name] (imatrix.input_moments) where given."""
    from rwkv_edge.quant import quantize_int8_rows, quantize_q4
    from .backends.numba_common import bundle_arrays

    for d in (dtype, head_dtype or dtype):
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}, choose one of {', '.join(DTYPES)}")
    config, weights, fingerprint, src = _source(model_or_path)
    src = source_name or src
    importance = importance or {}
    bundles: dict = {}

    def produce(key):
        kind, ref = key
        if kind in ("kv", "kv_scale"):
            if ref not in bundles:
                bundles.clear()  # one layer at a time keeps peak memory low
                name = f"blocks.{ref}.ffn.key.weight"
                bundles[ref] = bundle_arrays(weights[name], weights[f"blocks.{ref}.ffn.value.weight"], dtype,
                                             importance.get(name))
            kv, sc = bundles[ref]
            return kv if kind == "kv" else sc
        w = np.asarray(weights[ref], np.float32)
        if kind == "cast":
            return w
        if kind in ("q4", "s4"):
            q, s = quantize_q4(w, search=True, importance=importance.get(ref))
            return q if kind == "q4" else s
        if kind in ("qc", "cscale"):  # per-column scales: quantize the transpose by rows
            q, s = quantize_int8_rows(w.T)
            return q.T if kind == "qc" else s
        q, s = quantize_int8_rows(w)
        return q if kind == "q" else s

    shapes = {k: tuple(np.shape(v)) for k, v in weights.items()}
    return write_model(out_path, config, shapes, dtype, fingerprint, src, produce, head_dtype=head_dtype)


def write_model(out_path, config: ModelConfig, shapes: dict, dtype: str, fingerprint: str, src: str, produce,
                progress=None, head_dtype: str | None = None) -> str:
    """Write a model file from official tensor `shapes` {name: shape}: `produce((kind, ref))` returns
    each planned tensor (see _plan) as one array, or as an iterator of chunks along axis 0 (so a model
    larger than memory streams through). progress: optional fn(bytes written). Atomic; returns out_path."""
    for d in (dtype, head_dtype or dtype):
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}, choose one of {', '.join(DTYPES)}")
    if "int4" in (dtype, head_dtype):
        def groups_along(n, shp):      # the length int4 groups run along (D for both FFN tensors)
            m = _FFN.match(n)
            return (shp[1] if m.group(2) == "key" else shp[0]) if m else shp[1]
        bad = [n for n, shp in shapes.items() if len(shp) == 2 and groups_along(n, shp) % GROUP and (
               (_role(n, shp) == "ffn" and dtype == "int4")
               or (_role(n, shp) == "linear" and (head_dtype if n == "head.weight" and head_dtype else dtype) == "int4"))]
        if bad:
            raise ValueError(f"int4 needs input sizes that are multiples of {GROUP}: {bad[0]} {tuple(shapes[bad[0]])}")
    plan = _plan(config, shapes, dtype, head_dtype)
    table, off = [], 0
    for name, dt, shape, _ in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        table.append({"name": name, "dtype": np.dtype(dt).name, "shape": list(shape), "offset": off, "nbytes": nbytes})
        off = _align(off + nbytes)
    header = {"format": "rwkv-edge-model", "version": FORMAT_VERSION, "config": config.to_dict(),
              "fingerprint": fingerprint, "dtype": dtype, "source": src, "tensors": table}
    if head_dtype and head_dtype != dtype:
        header["head_dtype"] = head_dtype
    if "int4" in (dtype, head_dtype):
        header["int4"] = dict(_INT4_INFO)
    # data_start and file_size depend on the header length, which depends on them: iterate once
    for _ in range(3):
        hb = json.dumps(header, separators=(",", ":")).encode()
        data_start = _align(_PREFIX.size + len(hb))
        header.update(data_start=data_start, file_size=data_start + off)
    hb = json.dumps(header, separators=(",", ":")).encode()
    if _align(_PREFIX.size + len(hb)) != data_start:
        raise RuntimeError("header layout did not converge")

    out_path = os.fspath(out_path)
    with atomic_write(out_path, prefix=".rwkve-") as f:
        f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(hb)))
        f.write(hb)
        f.write(b"\0" * (data_start - _PREFIX.size - len(hb)))
        for (name, dt, shape, key), rec in zip(plan, table):
            out = produce(key)
            chunks = (out,) if isinstance(out, np.ndarray) else out
            f.seek(data_start + rec["offset"])
            n = 0
            for c in chunks:
                a = np.ascontiguousarray(c, dtype=dt)
                if a.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"tensor {name}: chunk shape {a.shape} does not fit planned {tuple(shape)}")
                f.write(memoryview(a.reshape(-1)).cast("B"))
                n += a.shape[0] if a.ndim else 1
                if progress is not None:
                    progress(a.nbytes)
            if n != (shape[0] if shape else 1):
                raise ValueError(f"tensor {name}: {n} rows written, planned {tuple(shape)}")
        f.truncate(data_start + off)
    return out_path


def is_modelfile(path) -> bool:
    """True if `path` starts with the model-file magic."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def read_header(path) -> dict:
    """The JSON header of a model file (checks magic, version and that no tensor lies past the end)."""
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            pre = f.read(_PREFIX.size)
            if len(pre) < _PREFIX.size or pre[:8] != MAGIC:
                raise ModelLoadError(f"{path}: not an rwkv-edge model file (bad magic)")
            _, version, _, hlen = _PREFIX.unpack(pre)
            if version != FORMAT_VERSION:
                raise ModelLoadError(f"{path}: model file format version {version}, this runtime reads {FORMAT_VERSION}")
            hb = f.read(hlen)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(hb) < hlen:
        raise ModelLoadError(f"{path}: truncated model file (header cut off)")
    try:
        header = json.loads(hb.decode())
        ModelConfig.from_dict(header["config"])
        end = max((t["offset"] + t["nbytes"] for t in header["tensors"]), default=0)
        file_size, data_start = int(header["file_size"]), int(header["data_start"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{path}: corrupt model file header") from None
    if size < file_size:
        raise ModelLoadError(f"{path}: truncated model file ({size} of {file_size} bytes)")
    if size < data_start + end:
        raise ModelLoadError(f"{path}: truncated model file (tensor data past the end)")
    return header


def open_tensors(path, header: dict | None = None) -> dict:
    """{tensor name: read-only ndarray view on the mapped file} (no data is read)."""
    path = os.fspath(path)
    header = header or read_header(path)
    with open(path, "rb") as f:
        # copy-on-write private mapping: pages are shared with the page cache and read lazily; the
        # arrays are writable (one numba specialisation for mapped and in-memory weights) but a
        # write would never reach the file
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base, out = header["data_start"], {}
    for t in header["tensors"]:
        dt = np.dtype(t["dtype"])
        n = t["nbytes"] // dt.itemsize
        out[t["name"]] = np.frombuffer(mm, dt, n, base + t["offset"]).reshape(t["shape"])
    return out


def _float_weights(tensors: dict) -> dict:
    """Official-name float32 weights (materialised in memory) for backends other than numba, with
    numpy alone (numba need not import): the same values as the numba weight types' dequantize()."""
    w = {}
    for name, a in tensors.items():
        m = re.match(r"^blocks\.(\d+)\.ffn\.kv$", name)
        if m:
            kv = a.astype(np.float32)
            if name + "_scale" in tensors:
                kv *= tensors[name + "_scale"][:, :, None]
            w[f"blocks.{m.group(1)}.ffn.key.weight"] = np.ascontiguousarray(kv[:, 0])
            w[f"blocks.{m.group(1)}.ffn.value.weight"] = np.ascontiguousarray(kv[:, 1].T)
        elif _KV4.match(name):
            from rwkv_edge.quant.q4 import dequantize_q4
            F, _, H = a.shape
            kv = dequantize_q4(a.reshape(2 * F, H), tensors[name + "_scale"].reshape(2 * F, -1)).reshape(F, 2, 2 * H)
            i = _KV4.match(name).group(1)
            w[f"blocks.{i}.ffn.key.weight"] = np.ascontiguousarray(kv[:, 0])
            w[f"blocks.{i}.ffn.value.weight"] = np.ascontiguousarray(kv[:, 1].T)
        elif name.endswith(".q4") and name[:-3] + ".s4" in tensors:
            from rwkv_edge.quant.q4 import dequantize_q4
            w[name[:-3]] = dequantize_q4(a, tensors[name[:-3] + ".s4"])
        elif name.endswith(".q") and name[:-2] + ".scale" in tensors:
            w[name[:-2]] = a.astype(np.float32) * tensors[name[:-2] + ".scale"][:, None]
        elif name.endswith(".qc") and name[:-3] + ".cscale" in tensors:
            w[name[:-3]] = a.astype(np.float32) * tensors[name[:-3] + ".cscale"][None, :]
        elif not _is_table(name, tensors):
            w[name] = np.ascontiguousarray(np.asarray(a, np.float32))
    return w


_KV4 = re.compile(r"^blocks\.(\d+)\.ffn\.kv4$")


def _is_table(name: str, tensors: dict) -> bool:
    """True for the scale tables that travel with another tensor (read together with it)."""
    return (name.endswith(".scale") and name[:-6] + ".q" in tensors or name.endswith((".ffn.kv_scale", ".ffn.kv4_scale"))
            or name.endswith(".cscale") or name.endswith(".s4") and name[:-3] + ".q4" in tensors)


def check_int4(tensors: dict, header: dict, path="") -> None:
    """ModelLoadError unless every int4 tensor has its group table, of the right shape and finite, and the
    header describes the layout this runtime reads (see the module docstring)."""
    pairs = [(n, n + "_scale") for n in tensors if _KV4.match(n)] + \
            [(n, n[:-3] + ".s4") for n in tensors if n.endswith(".q4")]
    if not pairs:
        return
    if header.get("int4") != _INT4_INFO:
        raise ModelLoadError(f"{path}: corrupt int4 group table (header says {header.get('int4')!r}, "
                             f"this runtime reads {_INT4_INFO!r})")
    for qn, sn in pairs:
        q, s = tensors[qn], tensors.get(sn)
        if (s is None or q.dtype != np.uint8 or s.dtype != np.float16
                or s.shape != q.shape[:-1] + (2 * q.shape[-1] // GROUP,) or (2 * q.shape[-1]) % GROUP):
            raise ModelLoadError(f"{path}: corrupt int4 group table for {qn} (codes {q.dtype} {q.shape}, "
                                 f"scales {None if s is None else (s.dtype.name, s.shape)})")
        if not np.isfinite(s).all():
            raise ModelLoadError(f"{path}: corrupt int4 group table for {qn} (non-finite scales)")


def model_weights(tensors: dict, header: dict, backend_name: str) -> dict:
    """Official-name weights for a model class: numba weight objects, or float32 for other backends."""
    if backend_name != "numba":
        return _float_weights(tensors)
    from .backends.numba_cpu import Int4Weight, Int8Cols, Int8Weight, NeuronBundledFFN

    w = {}
    for name, a in tensors.items():
        m = re.match(r"^blocks\.(\d+)\.ffn\.kv4?$", name)
        if m:
            b = NeuronBundledFFN(a, tensors.get(name + "_scale"))
            w[f"blocks.{m.group(1)}.ffn.key.weight"], w[f"blocks.{m.group(1)}.ffn.value.weight"] = b.key, b.value
        elif name.endswith(".q4") and name[:-3] + ".s4" in tensors:
            w[name[:-3]] = Int4Weight(a, tensors[name[:-3] + ".s4"])
        elif name.endswith(".q") and name[:-2] + ".scale" in tensors:
            w[name[:-2]] = Int8Weight(a, tensors[name[:-2] + ".scale"])
        elif name.endswith(".qc") and name[:-3] + ".cscale" in tensors:
            w[name[:-3]] = Int8Cols(a, tensors[name[:-3] + ".cscale"])
        elif _is_table(name, tensors):
            continue
        else:
            w[name] = a
    return w


def load_modelfile(path, backend="numba"):
    """Open a model file written by `convert` and return the model object (weights memory-mapped)."""
    from .backends import get_backend
    from .models import model_class

    if backend == "native":
        from .backends.native import NativeRWKV7
        return NativeRWKV7.open(path)
    header = read_header(path)
    config = ModelConfig.from_dict(header["config"])
    ops = get_backend(backend)
    tensors = open_tensors(path, header)
    check_int4(tensors, header, path)
    if "emb.weight" in tensors:         # one row per token: no read-around / fault-around on the mapping
        from .residency import advise_random
        advise_random([tensors["emb.weight"]])
    weights = model_weights(tensors, header, getattr(ops, "name", ""))
    model = model_class(config.version)(config, weights, backend=ops, fingerprint=header["fingerprint"])
    model.modelfile_dtype = header["dtype"]
    return model


# --- CLI: rwkv-edge convert --model M --out FILE [--dtype fp16|int8|fp32] ------------------------
def add_convert_parser(sub) -> None:
    """Register the `convert` subcommand (called by rwkv_edge.cli)."""
    p = sub.add_parser("convert", help="write the mmap-able model file (neuron-bundled FFN, fp16/int8 weights)")
    p.add_argument("--model", required=True, help="official .pth checkpoint")
    p.add_argument("--out", required=True, help="model file to write (atomically)")
    p.add_argument("--dtype", choices=DTYPES, default="fp16",
                   help="weight storage (default: fp16); int4: groups of 32 with float16 scales, LoRAs int8")
    p.add_argument("--head-dtype", choices=DTYPES, default=None,
                   help="storage of the head (vocab x D) alone, e.g. --dtype int8 --head-dtype int4")
    p.add_argument("--calib", metavar="TEXT", help="int4: weight each group's scale search by the mean square of "
                   "the inputs seen on this UTF-8 text (an importance matrix)")
    p.add_argument("--calib-tokens", type=int, default=4096, help="tokens of --calib to run (default: 4096)")
    p.set_defaults(func=_run_convert)


def _run_convert(args, parser) -> int:
    """Bad input (a damaged or non-finite checkpoint, an unwritable --out) raises; rwkv_edge.cli turns
    it into one line and exit 2. A killed run leaves no temp file behind after the next one."""
    import time

    if not os.path.isfile(args.model):
        parser.error(f"--model {args.model}: no such file")
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        parser.error(f"--out {args.out}: directory {out_dir} does not exist")
    if os.path.isdir(args.out):
        parser.error(f"--out {args.out}: is a directory, expected a file name")
    if args.calib and "int4" not in (args.dtype, args.head_dtype):
        parser.error("--calib applies to int4 weights (--dtype int4 or --head-dtype int4)")
    if args.calib and not os.path.isfile(args.calib):
        parser.error(f"--calib {args.calib}: no such file")
    if args.calib_tokens <= 0:
        parser.error("--calib-tokens must be > 0")
    t0 = time.perf_counter()
    if args.calib:
        from .imatrix import text_moments
        config, weights, mom = text_moments(args.model, args.calib, args.calib_tokens)
        convert((config, weights), args.out, args.dtype, head_dtype=args.head_dtype, importance=mom,
                source_name=os.path.basename(args.model))
    else:
        convert(args.model, args.out, args.dtype, head_dtype=args.head_dtype)
    h = read_header(args.out)
    # the tokenizer travels with the model: generate/chat find a tokenizer.json next to the model
    # file, so it is copied beside --out (never into the current directory)
    src_tok = os.path.join(os.path.dirname(os.path.abspath(args.model)), "tokenizer.json")
    dst_tok = os.path.join(out_dir, "tokenizer.json")
    if os.path.exists(src_tok) and not os.path.exists(dst_tok):
        import shutil

        with atomic_write(dst_tok, prefix=".tokenizer-") as f, open(src_tok, "rb") as g:
            shutil.copyfileobj(g, f)
        print(f"copied {src_tok} -> {dst_tok}")
    c = h["config"]
    head = f" (head {h['head_dtype']})" if h.get("head_dtype") else ""
    print(f"wrote {args.out}: {h['file_size'] / 2**20:.1f} MiB, dtype {h['dtype']}{head}, {c['version']} "
          f"L{c['n_layer']} D{c['n_embd']} F{c['ffn_dim']} V{c['vocab_size']}, fingerprint {h['fingerprint']}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
