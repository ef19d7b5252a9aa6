"""CUDA backend: reference.py's function set with torch on an NVIDIA GPU, Triton for the wkv scans.

Precision (choose with `set_dtype` before the model is built; weights are converted at load):
  - "fp32" (default): everything float32 (IEEE matmuls unless the caller enabled TF32 globally).
  - "fp16" / "bf16": 2-D weight matrices (more than HALF_MIN_SIZE elements, the embedding and the
    head included) are stored in that dtype: half the bytes held and read per token. Activations,
    the residual stream, 1-D parameters, the small per-head tables, elementwise math, the wkv state
    and the predictor scores stay float32. Two ways to multiply float32 activations by half weights:
      * accurate (the default, `set_dtype(d)` = `set_dtype(d, split_inputs=True)`): the product
        is computed as if the weights were float32. Up to MV_MAX_ROWS rows (batch-1 decode, the
        sparse FFN's gathered rows) run a Triton kernel that reads the half weights and the float32
        activations and multiplies and accumulates in float32 (one launch per matmul). More rows
        (prefill) split x = hi + lo, both in the weight dtype (hi = x rounded, lo = the rounding
        error rounded: ~22 mantissa bits of x for fp16, ~16 for bf16), and run one tensor-core GEMM
        on the stacked (2T, K) rows with a float32 result: hi W + lo W. The weights are read once;
        prefill does twice the tensor-core work. The only error left is the weights' own rounding:
        none when the checkpoint is stored in that dtype, 2^-9 relative per weight for bf16 of a
        float16 checkpoint. Measured on an H200, rwkv7-ref-58m (a float16 checkpoint; numpy
        reference; tools/gpu_compare.py): fp16 dense 6.9e-5 / sparse 7.6e-4; bf16 dense 6.0e-2 /
        sparse 2.1e-1, all of it the bf16 rounding of the weights (the runtime adds 6e-5 to a
        reference holding the same bf16-rounded weights). Prefer fp16 for float16 checkpoints.
      * fast (`set_dtype(d, split_inputs=False)`, or `set_split_inputs(False)` at any time): the
        activations are rounded to the weight dtype and one GEMM multiplies (float32 accumulate
        and result). The rounding (2^-11 relative for fp16, 2^-8 for bf16) adds logit error and
        flips sparse-predictor threshold decisions near the threshold: rwkv7-ref-58m fp16 dense
        7.8e-3, sparse 1.3e-2 (over the 1e-2 requirement); bf16 dense 7.9e-2.
      Trade-off (H200, rwkv7-ref-58m, tools/bench.py): batch-1 decode (captured graph) is faster
      in the accurate mode (568 vs 511 tok/s fp16: one launch per matmul instead of cast + GEMM);
      prefill of 4096 tokens is ~25% slower (90k vs 115k tok/s fp16; fp32 100k).
    fp16 activations beyond +-65504 overflow in the split GEMM and in the fast mode (as in any fp16
    runtime); the Triton kernel of the accurate mode keeps them float32.
The wkv state is always float32. Shapes follow reference.py: activations (T, D), `linear(x, W)`
is x @ W.T with W (out, in), the wkv state (H, N, N) is indexed [head, value i, key j].

Extra ops for the sparse FFN and predictors (reference versions: see the module docstrings of
those modules): `transpose_weight`, `sparse_ffn`, `predictor_scores`, `topk_mask`, `topk_indices`,
`threshold_mask`, `mask_to_indices`. `CudaGraphStep` (cuda_graph.py) replays a captured one-token
decode step. The Triton kernels and the torch-loop wkv fallbacks are in cuda_kernels.py.

Importing this module needs torch but not CUDA or Triton; the first op that needs the GPU raises
RuntimeError("CUDA is not available: ...") on a machine without one.
"""
from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from .cuda_kernels import _triton, _wkv6_torch, _wkv7_torch  # noqa: F401  (_triton: tests and tools)
from .cuda_kernels import kernels as _kernels

name = "cuda"

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_cfg = {"dtype": "fp32", "device": "cuda", "split": True}
_checked: dict = {}          # device string -> torch.device, once CUDA was found usable
_emb_cache: dict = {}        # id(host emb) -> (weakref to it, device tensor)
_mm_out_dtype = {"ok": None}  # whether torch.mm(..., out_dtype=float32) works for half inputs

# wkv launch shape: one program per (head, block of WKV_ROWS value rows). Each value row of the
# state evolves independently, so the split is exact. Tuned on an H100 with tools/gpu_check.py
# (T=4096, H=8, N=64): rows 8 / 2 warps / prefetch 1.97 ms; without prefetch 3.2 ms; the "fused"
# variant (y from the old state) 2.0-3.0 ms, so it is off by default. A torch loop takes 700 ms.
WKV_ROWS = 8
WKV_WARPS = 2
WKV_FUSED = False
# Arrays up to this many elements stay float32 in fp16/bf16 mode: the (H, N) per-head tables
# (H*N = n_embd <= 8192) are elementwise factors where bf16 rounding would hurt (decays near 1).
HALF_MIN_SIZE = 8192
# Accurate half mode: products of at most this many rows run the float32-math Triton kernel
# (weights read once per row block; decode and small sparse sets), more rows the split GEMM.
MV_MAX_ROWS = 8


# --- configuration ----------------------------------------------------------------------
def set_dtype(dtype: str, split_inputs: bool = True) -> None:
    """Storage dtype of weight matrices: "fp32" (default), "fp16" or "bf16". Affects weights
    adopted after the call (build the model after setting it).

    split_inputs (fp16/bf16 only): True (default), the accurate mode: activations stay float32
    into every product (a float32-math kernel for few rows, x = hi + lo split halves in one
    tensor-core GEMM for many), so only the weight rounding counts. False, the fast mode: the
    activations are rounded to the weight dtype before each GEMM (see the module docstring)."""
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}, choose one of {', '.join(_DTYPES)}")
    _cfg["dtype"] = dtype
    _cfg["split"] = bool(split_inputs)
    _emb_cache.clear()


def set_split_inputs(on: bool) -> None:
    """Switch between the accurate (True) and fast (False) half-weight products without rebuilding
    the model (weights are unchanged; takes effect at the next op, not inside a captured graph)."""
    _cfg["split"] = bool(on)


def get_split_inputs() -> bool:
    return _cfg["split"]


def get_dtype() -> str:
    return _cfg["dtype"]


def set_device(device: str) -> None:
    """Which CUDA device to use, e.g. "cuda" or "cuda:1"."""
    if not str(device).startswith("cuda"):
        raise ValueError(f"the CUDA backend needs a cuda device, got {device!r}")
    _cfg["device"] = str(device)
    _emb_cache.clear()


def device() -> torch.device:
    """The torch device of this backend; raises RuntimeError when CUDA is not usable."""
    dev = _cfg["device"]
    hit = _checked.get(dev)
    if hit is not None:
        return hit
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (CPU-only build)"
        raise RuntimeError(
            f"CUDA is not available: torch {torch.__version__} (CUDA build: {built}) finds no usable "
            "NVIDIA GPU/driver. Use device='cpu', or install a CUDA build of torch on a machine with a GPU.")
    d = torch.device(dev)
    if (d.index or 0) >= torch.cuda.device_count():
        raise RuntimeError(f"CUDA is not available: device {dev} requested, "
                           f"{torch.cuda.device_count()} visible")
    _checked[dev] = d
    return d


def synchronize() -> None:
    torch.cuda.synchronize(device())


def _wdtype() -> torch.dtype:
    return _DTYPES[_cfg["dtype"]]


# --- placement ----------------------------------------------------------------------------
def _dev_f32(a) -> torch.Tensor:
    """Any array/tensor -> contiguous float32 tensor on the device (no copy when already there)."""
    if isinstance(a, torch.Tensor):
        if a.is_cuda and a.dtype == torch.float32 and a.is_contiguous():
            return a                                   # the common case, kept cheap for decode
        t = a
    else:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return t.to(device=device(), dtype=torch.float32).contiguous()


def weight(a) -> torch.Tensor:
    """Move a weight array to the GPU: matrices (ndim >= 2, more than HALF_MIN_SIZE elements) in
    the `set_dtype` dtype; vectors and small per-head tables (r_k, u, decay: (H, N)) in float32."""
    if isinstance(a, torch.Tensor) and a.device.type == "cuda":
        return a
    t = torch.from_numpy(np.ascontiguousarray(a)) if not isinstance(a, torch.Tensor) else a
    dt = _wdtype() if (t.ndim >= 2 and t.numel() > HALF_MIN_SIZE) else torch.float32
    return t.to(device=device(), dtype=dt).contiguous()


def to_host(x) -> np.ndarray:
    """A device tensor (any float dtype) -> numpy float32."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def adopt_state(state):
    """The State with float32 tensors on the GPU (the wkv state is always float32)."""
    from ..state import State

    return State(_dev_f32(state.att_x), _dev_f32(state.wkv), _dev_f32(state.ffn_x))


def _device_emb(emb) -> torch.Tensor:
    if isinstance(emb, torch.Tensor) and emb.device.type == "cuda":
        return emb
    hit = _emb_cache.get(id(emb))
    if hit is not None and hit[0]() is emb:
        return hit[1]
    t = weight(emb)                                    # (V, D) once on the device
    try:
        _emb_cache[id(emb)] = (weakref.ref(emb), t)
    except TypeError:  # objects without weak references are converted every call
        pass
    return t


def embed(emb, tokens) -> torch.Tensor:
    """Rows of the embedding (V, D) for token ids (list or device tensor) -> (T, D) float32.
    The table is copied to the GPU once per array (cached)."""
    table = _device_emb(emb)
    if isinstance(tokens, torch.Tensor):
        idx = tokens.to(device=table.device, dtype=torch.long).reshape(-1)
    else:
        idx = torch.as_tensor(np.asarray(tokens, dtype=np.int64).reshape(-1)).to(table.device)
    return table.index_select(0, idx).to(torch.float32)


# --- elementwise and small ops -------------------------------------------------------------
def sigmoid(x):
    return torch.sigmoid(x)


def tanh(x):
    return torch.tanh(x)


def exp(x):
    return torch.exp(x)


def relu_sq(x):
    return torch.relu(x).square()


def token_shift(x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """(T, D) previous-token vectors from x (T, D) and prev (D,); a new tensor."""
    if x.shape[0] == 1:
        return prev.reshape(1, -1).clone()
    return torch.cat([prev.reshape(1, -1), x[:-1]], dim=0)


def l2_normalize(x: torch.Tensor, n_groups: int) -> torch.Tensor:
    T, D = x.shape
    return F.normalize(x.reshape(T, n_groups, D // n_groups), p=2.0, dim=-1, eps=1e-12).reshape(T, D)


def _mm(x2: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x2 (M, K) @ m (K, N) -> float32. Half weights: see the module docstring (accurate / fast)."""
    if m.dtype == torch.float32:
        return x2.to(torch.float32) @ m
    if not _cfg["split"]:                                      # fast: activations rounded to half
        xh = x2.to(m.dtype)
        out = _mm_f32out(xh, m)
        # without a float32-result GEMM: upcast (a half result would round every output, which
        # the decay and normalisation paths amplify badly)
        return out if out is not None else xh.to(torch.float32) @ m.to(torch.float32)
    if x2.shape[0] <= MV_MAX_ROWS and m.is_cuda:
        out = _mm_rows(x2, m)
        if out is not None:
            return out
    n = x2.shape[0]
    xh = x2.to(m.dtype)
    lo = (x2.to(torch.float32) - xh.to(torch.float32)).to(m.dtype)
    out = _mm_f32out(torch.cat([xh, lo], dim=0), m)
    if out is None:                                            # no float32-result half GEMM here
        return x2.to(torch.float32) @ m.to(torch.float32)
    return out[:n] + out[n:]


def _mm_rows(x2: torch.Tensor, m: torch.Tensor):
    """x2 (M, K) float32 @ m (K, N) half with float32 products and sums, in one Triton launch
    (program (column block, row)); None when Triton is unusable (the caller falls back)."""
    kern = _kernels()
    if kern is None or "rows" not in kern:
        return None
    M, K = x2.shape
    N = m.shape[1]
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), device=m.device, dtype=torch.float32)
    x = x2.to(torch.float32).contiguous()
    y = torch.empty((M, N), device=x.device, dtype=torch.float32)
    bn = 16 if N <= 1024 else (32 if N <= 4096 else 64)
    try:
        kern["rows"][(_cdiv(N, bn), M)](x, m, y, K, N, x.stride(0), m.stride(1), m.stride(0),
                                              BN=bn, BK=128, num_warps=4)
    except Exception as e:
        if torch.cuda.is_current_stream_capturing():
            raise
        import warnings
        warnings.warn(f"Triton half-weight kernel unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the split GEMM")
        kern.pop("rows", None)
        return None
    return y


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _mm_f32out(xh: torch.Tensor, m: torch.Tensor):
    """Half (M, K) @ half (K, N) -> float32 result (cuBLAS accumulates in float32, no rounding of
    the result to half); None where torch lacks `torch.mm(..., out_dtype=)`."""
    if _mm_out_dtype["ok"] is False:
        return None
    try:
        out = torch.mm(xh, m, out_dtype=torch.float32)
    except (TypeError, RuntimeError):
        if xh.is_cuda and torch.cuda.is_current_stream_capturing():
            raise
        _mm_out_dtype["ok"] = False
        return None
    _mm_out_dtype["ok"] = True
    return out


def linear(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ W (out, in).T -> (..., out) float32."""
    if W.dtype == torch.float32 and x.dtype == torch.float32:
        return F.linear(x, W)                          # one op: decode is bound by per-op overhead
    lead = x.shape[:-1]
    return _mm(x.reshape(-1, x.shape[-1]), W.t()).reshape(*lead, W.shape[0])


def matmul(x: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ M (in, out) -> (..., out) float32 (the small LoRA-style matrices)."""
    if M.dtype == torch.float32 and x.dtype == torch.float32:
        return x @ M
    lead = x.shape[:-1]
    return _mm(x.reshape(-1, x.shape[-1]), M).reshape(*lead, M.shape[-1])


def layer_norm(x, w, b, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def group_norm(x, n_groups: int, w, b, eps: float):
    """Group norm over the last dim split into n_groups groups; x (T, D)."""
    return F.group_norm(x, n_groups, w, b, eps)


# --- wkv scans ------------------------------------------------------------------------------
def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _scan(state, r, w, k, v, a, b, u, v7: bool, rows=None, warps=None, prefetch=True, fused=None):
    H, N, _ = state.shape
    T, C = r.shape
    s_in = _dev_f32(state)
    r, w, k, v = (_dev_f32(t) for t in (r, w, k, v))
    if v7:
        a, b = _dev_f32(a), _dev_f32(b)
    else:
        u = _dev_f32(u).reshape(H * N)
    kern = _kernels()
    bi = min(rows or WKV_ROWS, N)
    if kern is None or not _pow2(N) or not _pow2(bi) or C != H * N:
        return (_wkv7_torch if v7 else _wkv6_torch)(s_in, r, w, k, v, a if v7 else u, b if v7 else None)
    y = torch.empty((T, C), device=r.device, dtype=torch.float32)
    s_out = torch.empty_like(s_in)
    dummy = r  # unused pointer slots
    try:
        kern["scan"][(H, N // bi)](s_in, r, w, k, v, a if v7 else dummy, b if v7 else dummy,
                                   dummy if v7 else u, y, s_out, T, C=C, N=N, BI=bi, V7=v7,
                                   PREFETCH=bool(prefetch), FUSED=bool(WKV_FUSED if fused is None else fused),
                                   num_warps=warps or WKV_WARPS)
    except Exception as e:  # Triton cannot compile/launch here: use the torch loop from now on
        if r.is_cuda and torch.cuda.is_current_stream_capturing():
            raise
        import warnings
        warnings.warn(f"Triton wkv kernel unavailable ({type(e).__name__}: {str(e)[:200]}); "
                      "using the slow torch loop")
        _triton.update(ok=False, kernels=None)
        return (_wkv7_torch if v7 else _wkv6_torch)(s_in, r, w, k, v, a if v7 else u, b if v7 else None)
    return y, s_out


def wkv7(state, r, w, k, v, a, b):
    """RWKV-7 state update over T tokens in one Triton launch (see reference.wkv7).

    state: (H, N, N) [head, value i, key j]; r, w, k, v, a, b: (T, H*N). Returns (y (T, H*N) fp32,
    new state (H, N, N) fp32); the input state is not modified."""
    return _scan(state, r, w, k, v, a, b, None, v7=True)


def wkv6(state, r, k, v, w, u):
    """RWKV-6 update (see reference.wkv6): w (T, H*N) per-token decays, u (H, N) bonus."""
    return _scan(state, r, w, k, v, None, None, u, v7=False)


def wkv5(state, r, k, v, w, u):
    """RWKV-5.2 update (see reference.wkv5): w (H, N) fixed decays, u (H, N) bonus."""
    T = r.shape[0]
    w = _dev_f32(w).reshape(1, -1).expand(T, -1).contiguous()
    return _scan(state, r, w, k, v, None, None, u, v7=False)


# --- sparse FFN and predictor helpers -----------------------------------------------------
def _index(idx) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        return idx.to(device=device(), dtype=torch.long)
    return torch.as_tensor(np.asarray(idx, dtype=np.int64)).to(device())


def transpose_weight(W) -> torch.Tensor:
    """W (D, F) -> contiguous (F, D) copy on the device, e.g. value_t = transpose_weight(ffn_value)
    so that each neuron's value column is one contiguous row."""
    t = W if isinstance(W, torch.Tensor) else weight(np.asarray(W))
    return t.t().contiguous()


def sparse_ffn(xk: torch.Tensor, idx, key: torch.Tensor, value_t: torch.Tensor) -> torch.Tensor:
    """relu(xk @ key[idx].T)^2 @ value_t[idx]: the FFN computed on the neurons `idx` only.

    xk (T, D) float32; key (F, D) = ffn.key.weight and value_t (F, D) = ffn.value.weight.T, both
    device weights. idx: 1-D ints (a set shared by all T rows, e.g. the union of their predicted
    sets) or 2-D (T, k) ints (one set per token). Rows outside the set count as zero activations,
    so with idx a superset of the truly active neurons the result equals the dense FFN."""
    idx = _index(idx)
    if idx.ndim == 1:
        h = relu_sq(linear(xk, key.index_select(0, idx)))              # (T, S)
        return matmul(h, value_t.index_select(0, idx))                  # (T, D)
    T, kk = idx.shape
    kw = key.index_select(0, idx.reshape(-1)).reshape(T, kk, -1)       # (T, k, D)
    vw = value_t.index_select(0, idx.reshape(-1)).reshape(T, kk, -1)   # (T, k, D)
    if kw.dtype != torch.float32 and _cfg["split"]:                     # accurate: float32 math
        kw, vw = kw.to(torch.float32), vw.to(torch.float32)
    x = xk.to(kw.dtype)[:, :, None]                                     # (T, D, 1)
    h = relu_sq(torch.bmm(kw, x).to(torch.float32))                    # (T, k, 1)
    return torch.bmm(h.transpose(1, 2).to(vw.dtype), vw).to(torch.float32).reshape(T, -1)


def predictor_weight(a) -> torch.Tensor:
    """A predictor matrix on the device in float32 whatever set_dtype says: threshold decisions near
    the boundary then match the CPU runtime's."""
    return _dev_f32(a)


def predictor_scores(x, Wq) -> torch.Tensor:
    """Scores (T, F) = x (T, D) @ Wq.T for a predictor matrix Wq (F, D), e.g. a dequantized n-bit
    W_k adopted once with `weight(qm.dequantize())` (fp16/bf16 storage via set_dtype)."""
    if not isinstance(Wq, torch.Tensor):
        Wq = weight(np.asarray(Wq, dtype=np.float32))
    return linear(_dev_f32(x), Wq)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(T, k) long indices of the k highest scores of each row, sorted ascending per row."""
    T, Fn = scores.shape
    k = max(0, min(int(k), Fn))
    return torch.topk(scores, k, dim=1, sorted=False).indices.sort(dim=1).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool (T, F): the k highest scores of each row (as predictors.calibrate.topk_mask)."""
    T, Fn = scores.shape
    m = torch.zeros((T, Fn), dtype=torch.bool, device=scores.device)
    if k <= 0:
        return m
    if k >= Fn:
        return m.fill_(True)
    return m.scatter_(1, torch.topk(scores, int(k), dim=1, sorted=False).indices, True)


def threshold_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    return scores >= float(threshold)


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """Bool (T, F) or (F,) -> 1-D long indices of neurons active for any row (host sync)."""
    m = mask if mask.ndim == 1 else mask.any(dim=0)
    return torch.nonzero(m, as_tuple=False).reshape(-1)


from .cuda_graph import CudaGraphStep  # noqa: E402,F401  (needs the ops above)
