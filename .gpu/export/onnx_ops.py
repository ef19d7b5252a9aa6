"""A small ONNX graph builder and the weight-storage schemes of the exported graphs.

`GraphBuilder` wraps `onnx.helper`: `op()` adds a node and returns its output name(s), `const()`
adds an initializer. The storage scheme of a big matrix is chosen once per graph by `dtype`:

- fp32: float32 initializer, MatMul.
- fp16: float16 initializer, Cast to float32 in-graph, MatMul (activations and state stay fp32).
  onnxruntime's CPU provider constant-folds the Cast at session start, so the file is half the size
  but the resident weights are fp32 there; providers with fp16 kernels keep them fp16.
- int8: symmetric int8 codes with one fp32 scale per output channel, multiplied either
  "dynamic": `DynamicQuantizeLinear` (activations to uint8, one scale per call) + `MatMulInteger`
  (weights as 7-bit codes: u8 x s8 kernels without VNNI saturate on full-range int8)
  + rescale, which onnxruntime fuses into `DynamicQuantizeMatMul` (int8 GEMM kernels, the fast
  path on x86 and ARM CPUs); or "dequant": `DequantizeLinear` (axis=1) + fp32 MatMul (weight-only,
  closer to fp32), which onnxruntime fuses into its 8-bit `MatMulNBits`, slow on CPU at batch 1.
  Either way the weights stay int8 in memory.

Low-bit predictor matrices (2/4-bit codes) are stored as ONNX `uint4` (2-bit codes in a 4-bit
container: ONNX has a uint2 type but onnxruntime's DequantizeLinear does not accept it) with a
blocked `DequantizeLinear` (opset 21), which onnxruntime fuses into a 4-bit `MatMulNBits`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = ("fp32", "fp16", "int8")
INT8_MATMUL = ("dynamic", "dequant")
INT64_MAX = np.iinfo(np.int64).max


def quantize_int8_cols(m: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per column of m (in, out): (codes int8 (in, out), scale fp32 (out,)),
    codes in [-qmax, qmax]."""
    m = np.asarray(m, np.float32)
    scale = np.abs(m).max(axis=0) / np.float32(qmax)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(m / safe), -qmax, qmax).astype(np.int8)
    return q, scale.astype(np.float32)


def quantize_int8_rows(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row of m (R, C): (codes int8 (R, C), scale fp32 (R,))."""
    q, s = quantize_int8_cols(np.asarray(m, np.float32).T)
    return np.ascontiguousarray(q.T), s


def uint4_tensor(name: str, codes: np.ndarray) -> onnx.TensorProto:
    """An ONNX uint4 initializer from codes (values 0..15), packed two per byte, low nibble first."""
    codes = np.asarray(codes, np.uint8)
    if codes.size and codes.max() > 15:
        raise ValueError("uint4 codes must lie in [0, 15]")
    flat = codes.reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
    return helper.make_tensor(name, TensorProto.UINT4, list(codes.shape), raw, raw=True)


class GraphBuilder:
    """Accumulates nodes, initializers, inputs and outputs of one ONNX graph.

    dtype: storage scheme of big matrices ("fp32", "fp16", "int8"); see the module docstring.
    prefix: prepended to generated names (for subgraphs, whose names must not shadow the outer ones).
    int8_matmul: "dynamic" or "dequant", how int8 matrices are multiplied (see the module docstring).
    """

    def __init__(self, dtype: str = "fp32", prefix: str = "", int8_matmul: str = "dynamic"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if int8_matmul not in INT8_MATMUL:
            raise ValueError(f"int8_matmul must be one of {INT8_MATMUL}, got {int8_matmul!r}")
        self.dtype = dtype
        self.int8_matmul = int8_matmul
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self.min_opset = 17
        self._count = 0
        self._prefix = prefix      # keeps a subgraph's (Scan body's) names apart from the outer graph
        self._consts: dict = {}

    # --- plumbing -------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{self._prefix}{base}_{self._count}"

    def op(self, op_type: str, *inputs: str, out: Optional[str] = None, n_out: int = 1,
           domain: str = "", **attrs):
        """Add a node; returns its output name (or a list of names when n_out > 1)."""
        if out is not None and n_out != 1:
            raise ValueError("out= names a single output")
        outs = [out] if out is not None else [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh("n_" + op_type),
                                           domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def init(self, arr: np.ndarray, name: str) -> str:
        """Add `arr` as an initializer named `name` (kept at its own dtype)."""
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        """A small constant (shape, axis list, scalar); identical constants are shared."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(arr, self.fresh("c"))
        return self._consts[key]

    def ints(self, values: Sequence[int]) -> str:
        return self.const(list(values), np.int64)

    def add_input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    # --- small ops ------------------------------------------------------------------------
    def reshape(self, x: str, shape: Sequence[int], out: Optional[str] = None) -> str:
        return self.op("Reshape", x, self.ints(shape), out=out)

    def add(self, a, b, out=None):
        return self.op("Add", a, b, out=out)

    def sub(self, a, b, out=None):
        return self.op("Sub", a, b, out=out)

    def mul(self, a, b, out=None):
        return self.op("Mul", a, b, out=out)

    def vec(self, arr: np.ndarray, name: str) -> str:
        """A float32 vector/small tensor parameter (mix coefficients, norms, biases)."""
        return self.init(np.asarray(arr, np.float32), name)

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, name: str, eps: float = 1e-5) -> str:
        return self.op("LayerNormalization", x, self.vec(w, name + ".w"), self.vec(b, name + ".b"),
                       axis=-1, epsilon=float(eps))

    def reduce_sum(self, x: str, axis: int = -1) -> str:
        return self.op("ReduceSum", x, self.ints([axis]), keepdims=1)

    # --- weights --------------------------------------------------------------------------
    def matmul(self, x: str, m: np.ndarray, name: str) -> str:
        """x (..., in) @ m (in, out) with m stored in this graph's dtype."""
        m = np.asarray(m, np.float32)
        if self.dtype == "fp32":
            return self.op("MatMul", x, self.init(m, name))
        if self.dtype == "fp16":
            w = self.op("Cast", self.init(m.astype(np.float16), name), to=TensorProto.FLOAT)
            return self.op("MatMul", x, w)
        dynamic = self.int8_matmul == "dynamic"
        # u8 x s8 kernels without VNNI (AVX2, many ARM cores) add pairs of products in int16
        # and saturate; 7-bit weight codes keep every pair in range (onnxruntime's reduce_range)
        q, s = quantize_int8_cols(m, 63 if dynamic else 127)
        if dynamic:
            # uint8 activations (per-tensor scale, computed per call) x int8 weights -> int32
            xq, xs, xz = self.op("DynamicQuantizeLinear", x, n_out=3)
            y = self.op("Cast", self.op("MatMulInteger", xq, self.init(q, name), xz), to=TensorProto.FLOAT)
            return self.mul(y, self.mul(xs, self.init(s, name + ".scale")))
        w = self.op("DequantizeLinear", self.init(q, name), self.init(s, name + ".scale"),
                    self.init(np.zeros(s.shape, np.int8), name + ".zp"), axis=1)
        return self.op("MatMul", x, w)

    def matmul_rows(self, x: str, m: np.ndarray, idx: str, name: str) -> str:
        """x (1, n) @ m[idx] (n, out) for m (in, out) stored exactly as `matmul` stores it (the same
        codes and per-output-column scales), reading only the rows idx (n,) (int8 rows stay int8:
        MatMulInteger on the gathered codes). With idx = the non-zero entries of a non-negative
        input (plus zeros), this equals `matmul` of the full input: in the int8 dynamic scheme the
        activation range, hence its uint8 codes, is the same, so the integer sums are identical."""
        m = np.asarray(m, np.float32)
        if self.dtype == "fp32":
            return self.op("MatMul", x, self.op("Gather", self.init(m, name), idx, axis=0))
        if self.dtype == "fp16":
            w = self.op("Gather", self.init(m.astype(np.float16), name), idx, axis=0)
            return self.op("MatMul", x, self.op("Cast", w, to=TensorProto.FLOAT))
        dynamic = self.int8_matmul == "dynamic"
        q, s = quantize_int8_cols(m, 63 if dynamic else 127)
        rows = self.op("Gather", self.init(q, name), idx, axis=0)                       # (n, out) int8
        if dynamic:
            xq, xs, xz = self.op("DynamicQuantizeLinear", x, n_out=3)
            y = self.op("Cast", self.op("MatMulInteger", xq, rows, xz), to=TensorProto.FLOAT)
            return self.mul(y, self.mul(xs, self.init(s, name + ".scale")))
        w = self.op("DequantizeLinear", rows, self.init(s, name + ".scale"),
                    self.init(np.zeros(s.shape, np.int8), name + ".zp"), axis=1)
        return self.op("MatMul", x, w)

    def rows_dot(self, x: str, m: np.ndarray, idx: str, name: str) -> str:
        """x (1, C) . m[j] for the rows j in idx (n,) of m (R, C) -> (1, n), only those rows read.
        int8 "dynamic": the codes `linear(x, m)` stores (one scale per row of m) and MatMulInteger
        on the gathered codes, so each output is bit-identical to that neuron's dense output."""
        if self.dtype != "int8" or self.int8_matmul != "dynamic":
            rows = self.gather_rows(m, idx, name)                                         # (n, C)
            return self.op("MatMul", x, self.op("Transpose", rows, perm=[1, 0]))
        q, s = quantize_int8_cols(np.asarray(m, np.float32).T, 63)                        # (C, R), (R,)
        rows = self.op("Gather", self.init(np.ascontiguousarray(q.T), name), idx, axis=0)   # (n, C) int8
        xq, xs, xz = self.op("DynamicQuantizeLinear", x, n_out=3)
        y = self.op("Cast", self.op("MatMulInteger", xq, self.op("Transpose", rows, perm=[1, 0]), xz),
                    to=TensorProto.FLOAT)
        return self.mul(y, self.mul(xs, self.op("Gather", self.init(s, name + ".scale"), idx, axis=0)))

    def linear(self, x: str, w: np.ndarray, name: str) -> str:
        """x (..., in) @ w.T for a weight w (out, in) in the official layout."""
        return self.matmul(x, np.asarray(w).T, name)

    def gather_rows(self, table: np.ndarray, idx: str, name: str) -> str:
        """Rows `idx` of table (R, C) as float32 (idx shape + (C,)), stored in this graph's dtype
        (int8: one scale per row, gathered alongside)."""
        table = np.asarray(table, np.float32)
        if self.dtype == "fp32":
            return self.op("Gather", self.init(table, name), idx, axis=0)
        if self.dtype == "fp16":
            g = self.op("Gather", self.init(table.astype(np.float16), name), idx, axis=0)
            return self.op("Cast", g, to=TensorProto.FLOAT)
        q, s = quantize_int8_rows(table)
        g = self.op("Cast", self.op("Gather", self.init(q, name), idx, axis=0), to=TensorProto.FLOAT)
        sg = self.op("Gather", self.init(s.reshape(-1, 1), name + ".scale"), idx, axis=0)
        return self.mul(g, sg)

    def lowbit_scores(self, x: str, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                      bits: int, name: str) -> str:
        """x (T, C) @ W_hat.T for W_hat = zero + scale * codes, per group of C // G columns.

        codes: uint8 (R, C) of `bits` bits; scale, zero: (R, G). Computed as
        DQ(codes, scale) matmul + zero @ (group sums of x), so the zero point need not be an
        integer (it is a float `lo` in this project's format). Returns (T, R).
        """
        R, C = codes.shape
        G = scale.shape[1]
        gs = C // G
        self.min_opset = max(self.min_opset, 21)   # blocked DequantizeLinear, uint4
        qT = np.ascontiguousarray(codes.T)                       # (C, R)
        if bits <= 4:
            q_name = name
            self.inits.append(uint4_tensor(q_name, qT))
        else:
            q_name = self.init(qT.astype(np.uint8), name)
        sT = self.init(np.ascontiguousarray(np.asarray(scale, np.float32).T), name + ".scale")  # (G, R)
        w = self.op("DequantizeLinear", q_name, sT, axis=0, block_size=gs)      # (C, R)
        y = self.op("MatMul", x, w)
        zT = self.init(np.ascontiguousarray(np.asarray(zero, np.float32).T), name + ".zero")    # (G, R)
        xs = self.op("ReduceSum", self.reshape(x, [-1, G, gs]), self.ints([2]), keepdims=0)  # (T, G)
        return self.add(y, self.op("MatMul", xs, zT))

    # --- finish ---------------------------------------------------------------------------
    def model(self, name: str, opset: Optional[int] = None, doc: str = "") -> onnx.ModelProto:
        """The finished ModelProto (opset: at least what the ops used need, default the minimum)."""
        opset = max(opset or 0, self.min_opset)
        graph = helper.make_graph(self.nodes, name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="rwkv-edge", doc_string=doc)
        m.ir_version = min(m.ir_version, 10)   # readable by onnxruntime releases of 2024+
        return m
