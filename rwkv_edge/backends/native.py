"""Native CPU backend: RWKV-7 int8 and int4 model files run by C kernels (csrc/), one call per forward.

    model = NativeRWKV7.open("m-int8.rwkve")            # or open_model(path, backend="native")
    sparse = model.with_predictors(PredictorBundle.load("q2.npz", model=model))
    logits, state = sparse.forward(tokens)                 # all layers + head in one C call

The library is the optional extension `rwkv_edge.backends._nk` (setup.py), loaded with ctypes; no
numba anywhere on this path. The weights stay in the mmap of the model file: the C side gets
pointers into the numpy views of the mapping (zero copies, but for the LoRAs: at the VNNI level the C
side reads a packed copy of them and their file pages are given back), so the process holds the Python
runtime, the mapped pages it touches and a few hundred KiB of scratch.

Math: models/v7.py, with every int8 mat-vec as integer dot products on the activation rounded to
int8 per 32 values (as backends/numba_i8dot.py); int4 matrices (att r/k/v/o, head, the bundled FFN
`ffn.kv4` of `convert --dtype int4 [--head-dtype int8]`, quant/q4.py groups of 32) as integer dots of
their 4-bit codes with the same rounded activation (as backends/numba_i4dot.py, csrc/nk_q4.c); any
mix of int8 and int4 matrices in one file runs (e.g. int4 body + int8 head). Sparse: the n-bit W_k predictor of each layer
(a `PredictorBundle` of quantized threshold predictors) scores all neurons from its packed codes,
with the activation rounded to int8 per predictor group (as numba_simd), and the neurons with
score >= the layer's threshold run. `forward(..., record=)` returns the predicted sets, so tests
compare with the reference run on the very same sets (tests/test_native.py).
FFN without predictor: `ffn="exact"` (default, lossless) or "dense" (every row, csrc/nk_dense.c): see the class.
"""
from __future__ import annotations

import ctypes

import numpy as np

from ..config import ModelConfig, ModelLoadError
from ..state import State
# the C library, its kernel sets and single-kernel entry points for the tests (native_lib.py)
from .native_lib import (_LEVELS, _level_index, _load, _ptr, available, bind_library, kernel_axpy4,  # noqa: F401
                         kernel_dots, kernel_dots4, kernel_lora, kernel_pred, kernel_pred_prep, kernel_pred_select,
                         level, levels, set_level)

name = "native"
_THREADS = {"n": 1}
N_PTR = 58          # pointers per layer: the nk_layer struct of csrc/nk_model.h


def set_num_threads(n: int) -> None:
    """Threads for models opened afterwards (and for `NativeRWKV7.set_threads`); default 1."""
    _THREADS["n"] = max(1, int(n))


def _c_f32(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ModelLoadError(f"native backend: expected a contiguous float32 tensor, got {a.dtype} {a.shape}")
    return a


def _f16_bits(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float16 or not a.flags.c_contiguous:
        raise ModelLoadError(f"native backend: expected a contiguous float16 group table, got {a.dtype} {a.shape}")
    return a.view(np.uint16)


def _matrix(t: dict, name: str) -> list:
    """[int8 rows, float32 row scales, int4 codes, float16-bits group scales] of the linear matrix `name`
    of a model file, two of them None: the C side runs the int8 pair when present, else the int4 one."""
    if name + ".q" in t:
        return [t[name + ".q"], _c_f32(t[name + ".scale"]), None, None]
    if name + ".q4" in t:
        return [None, None, t[name + ".q4"], _f16_bits(t[name + ".s4"])]
    raise ModelLoadError(f"native backend: {name} must be int8 or int4 in the model file")


class NativeFFNStats:
    """What `model.ffn` reports for bench/CLI: density = predicted neurons / (tokens * layers * F) over
    the decode steps (one-token forwards)."""

    def __init__(self, F: int):
        self.F, self.n_tokens, self.n_active, self.n_values = F, 0, 0, 0

    @property
    def density(self) -> float:
        return self.n_active / (self.n_tokens * self.F) if self.n_tokens else 0.0


FFN_MODES = ("exact", "dense")


class NativeRWKV7:
    """An RWKV-7 int8 or int4 model file on the native backend: `forward(tokens, state, full_output)` and
    `step(token, state)` as RWKVModel's (the input state is never modified), plus `with_predictors`.
    Hooks (collect, ffn_activation) need the numba or reference backend.

    ffn (the FFN without predictor or given sets): "exact" (default) every key row, then the value columns
    where relu(k)^2 > 0 (lossless); "dense" every key and value row as a dense runtime (csrc/nk_dense.c:
    int8-activation dots over a transposed value copy, F * D more bytes of memory per layer at int8)."""

    version = "x070"

    def __init__(self, config: ModelConfig, tensors: dict, fingerprint: str, bundle=None, threads: int | None = None,
                 sets=None, dtype: str = "int8", ffn: str = "exact", head_rescore: int = 0):
        lib, why = _load()
        if lib is None:
            raise RuntimeError(why)
        if ffn not in FFN_MODES:
            raise ValueError(f"ffn must be one of {', '.join(FFN_MODES)}, not {ffn!r}")
        self.ffn_mode = ffn
        self.config, self.fingerprint, self.modelfile_dtype = config, fingerprint, dtype
        self.ops = _Ops
        self.hooks = _NoHooks()
        self._t, self._bundle, self._lib = tensors, bundle, lib
        self._sets = sets            # an object with predict_indices(layer, x): sets given per token and layer
        self.ffn = NativeFFNStats(config.ffn_dim) if bundle is not None or sets is not None else None
        self.tokens_run, self.bytes_read = 0, 0      # weight bytes the kernels read (tools/bench.py)
        self.threads = int(threads or _THREADS["n"])
        self.head_rescore = int(head_rescore)     # > 0: the rescored head (native_head.py)
        if self.head_rescore:
            from .native_head import with_q4_head
            self._t = with_q4_head(tensors, self.head_rescore)
        self._build()

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, threads: int | None = None, ffn: str = "exact", head_rescore: int = 0) -> "NativeRWKV7":
        from ..modelfile import open_tensors, read_header
        header = read_header(path)
        config = ModelConfig.from_dict(header["config"])
        if config.version != "x070":
            raise ModelLoadError(f"{path}: the native backend runs RWKV-7 (x070) models, this is {config.version}")
        head = header.get("head_dtype") or header["dtype"]
        if header["dtype"] not in ("int8", "int4") or head not in ("int8", "int4"):
            raise ModelLoadError(f"{path}: the native backend runs int8 and int4 model files, this one is "
                                 f"{header['dtype']} (head {head}) (rwkv-edge convert --dtype int8|int4, or --backend numba)")
        if config.n_embd % 32 or config.head_size % 8:
            raise ModelLoadError(f"{path}: the native backend needs n_embd % 32 == 0 and head_size % 8 == 0")
        tensors = open_tensors(path, header)
        bad = [n for n, a in tensors.items() if n.endswith(".qc") and (a.shape[0] % 4 or a.shape[1] % 8)]
        if bad:           # the LoRA kernels take four input rows per pass and eight outputs per vector
            raise ModelLoadError(f"{path}: the native backend needs LoRA sizes divisible by 8 ({bad[0]} is "
                                 f"{tuple(tensors[bad[0]].shape)}); use --backend numba")
        from ..residency import advise_random
        advise_random([tensors["emb.weight"]])      # one row per token: no read-around on its pages
        return cls(config, tensors, header["fingerprint"], threads=threads, dtype=header["dtype"], ffn=ffn,
                   head_rescore=head_rescore)

    def with_predictors(self, bundle) -> "NativeRWKV7":
        """A model sharing these weights whose FFN runs sparse on `bundle`'s predicted sets (a
        PredictorBundle of quantized W_k threshold predictors, one bit width and group layout). The ffn mode
        only concerns the FFN without predictor: the sparse model has none to keep."""
        layers = getattr(bundle, "predictors", None)
        ok = layers is not None and len(layers) == self.config.n_layer and all(
            getattr(p, "kind", "") == "quantized" and getattr(p, "mode", "") == "threshold" for p in layers)
        if not ok:
            raise ValueError("the native backend runs bundles of quantized W_k threshold predictors "
                             "(fit-predictors --kind quantized); use --backend numba for other kinds")
        q0 = layers[0].qm
        if any(p.qm.bits != q0.bits or p.qm.n_groups != q0.n_groups or p.qm.shape != q0.shape for p in layers):
            raise ValueError("the native backend needs one bit width and group layout in all layers of a bundle")
        if q0.shape != (self.config.ffn_dim, self.config.n_embd):
            raise ValueError(f"predictor shape {q0.shape} does not fit this model")
        return self._variant(bundle=bundle, sets=None, ffn="exact")

    def with_ffn_mode(self, ffn: str) -> "NativeRWKV7":
        """This model (weights, predictors, sets, threads) with its predictor-less FFN run `ffn` ("exact" or
        "dense", see the class)."""
        return self._variant(ffn=ffn)

    def with_sets(self, sets, all_keys: bool = False) -> "NativeRWKV7":
        """A model sharing these weights whose FFN runs the sets `sets.predict_indices(layer, None)` gives
        (called once per token and layer, in order: e.g. replay.ReplayedSets for tools/bench.py --shape).
        On a model with predictors, the predictor still scores every neuron (its cost is paid, its
        verdict unused): a random-weight model's predictor timed on a trained model's sets.
        all_keys: every key row is read (decode too), then the value rows of the set's neurons with relu(k) > 0:
        the exact FFN's bytes had the model's own active sets been `sets` (tools/bench.py --shape)."""
        m = self._variant(sets=sets)
        if all_keys:
            m._all_keys = True
            m._lib.nk_model_all_keys(m._h, 1)
            m.ffn = None          # its key counts are every row: no sparse density to report
        return m

    def with_head_rescore(self, k: int) -> "NativeRWKV7":
        """A model sharing these weights whose head gives every logit from a 4-bit copy of the int8 head
        and the top k from the int8 rows (backends/native_head.py; 0: the head as stored)."""
        return self._variant(head_rescore=k)

    def _variant(self, **changes) -> "NativeRWKV7":
        """A model on these weights with some of bundle, threads, sets, ffn, head_rescore changed."""
        kw = dict(bundle=self._bundle, threads=self.threads, sets=self._sets, ffn=self.ffn_mode,
                  head_rescore=self.head_rescore)
        kw.update(changes)
        return NativeRWKV7(self.config, self._t, self.fingerprint, dtype=self.modelfile_dtype, **kw)

    def with_library(self, lib) -> "NativeRWKV7":
        """This model (weights, predictors, sets, threads) on another build of the C library (`bind_library`)."""
        m = NativeRWKV7.__new__(NativeRWKV7)
        m.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("_h", "_keep", "_stats")})
        m._lib, m.tokens_run, m.bytes_read, m.hooks = lib, 0, 0, _NoHooks()
        m.ffn = NativeFFNStats(self.config.ffn_dim) if self.ffn is not None else None
        m._build()
        return m

    def set_threads(self, n: int) -> None:
        """Use n threads from now on (rebuilds the C model; weights are not touched)."""
        self.threads = max(1, int(n))
        self._free()
        self._build()

    def _build(self):
        c, t = self.config, self._t
        L, D, H, N, F, V = c.n_layer, c.n_embd, c.n_head, c.head_size, c.ffn_dim, c.vocab_size
        keep, lay = [], np.zeros((L, N_PTR), np.uint64)
        preds = self._bundle.predictors if self._bundle is not None else None
        thr = np.zeros(L, np.float32)
        for i in range(L):
            p, a = f"blocks.{i}.", f"blocks.{i}.att."
            vec = lambda n: _c_f32(t[n].reshape(-1))  # noqa: E731
            row = [vec(p + "ln1.weight"), vec(p + "ln1.bias"), vec(p + "ln2.weight"), vec(p + "ln2.bias")]
            row += [vec(a + n) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")]
            row += [vec(a + "w0"), vec(a + "a0"), vec(a + "v0") if i > 0 else None, vec(a + "k_k"), vec(a + "k_a"),
                    vec(a + "r_k"), vec(a + "ln_x.weight"), vec(a + "ln_x.bias")]
            lora = ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2")
            has = [i > 0 or not n.startswith("v") for n in lora]
            row += [t[a + n + ".qc"] if h else None for n, h in zip(lora, has)]
            row += [vec(a + n + ".cscale") if h else None for n, h in zip(lora, has)]
            lin = [_matrix(t, f"{a}{n}.weight") for n in ("receptance", "key", "value", "output")]
            row += [m[0] for m in lin] + [m[1] for m in lin]
            kv4 = p + "ffn.kv4" in t
            row += [vec(p + "ffn.x_k"), None if kv4 else t[p + "ffn.kv"], None if kv4 else _c_f32(t[p + "ffn.kv_scale"])]
            if preds is not None:
                qm = preds[i].qm
                packed = np.ascontiguousarray(qm.packed)
                sc, ze = (np.ascontiguousarray(x).view(np.uint16) for x in (qm.scale, qm.zero))
                row += [packed, sc, ze]
                thr[i] = np.float32(preds[i].calib.threshold)
            else:
                row += [None, None, None]
            # the int4 twins (NULL where the matrix is int8)
            row += [m[2] for m in lin] + [m[3] for m in lin]
            row += [t[p + "ffn.kv4"], _f16_bits(t[p + "ffn.kv4_scale"])] if kv4 else [None, None]
            assert len(row) == N_PTR
            keep += [r for r in row if r is not None]
            lay[i] = [_ptr(r) for r in row]
        emb = t["emb.weight"]
        if emb.dtype != np.float16:
            raise ModelLoadError("native backend: emb.weight must be float16 in an int8 model file")
        head = _matrix(t, "head.weight")
        if self.head_rescore:             # both: the 4-bit copy for every logit, the int8 rows for the top
            head[2:] = [t["head.weight.q4"], _f16_bits(t["head.weight.s4"])]
        glob = [emb.view(np.uint16), vec("blocks.0.ln0.weight"), vec("blocks.0.ln0.bias"), vec("ln_out.weight"),
                vec("ln_out.bias"), *head]
        keep += glob
        q0 = preds[0].qm if preds is not None else None
        dims = np.array([L, D, H, N, F, V, t["blocks.0.att.w1.qc"].shape[1], t["blocks.0.att.a1.qc"].shape[1],
                         t["blocks.0.att.g1.qc"].shape[1], t["blocks.1.att.v1.qc"].shape[1] if L > 1 else 0,
                         q0.bits if q0 is not None else 0, q0.n_groups if q0 is not None else 0,
                         self.threads, _level_index(self._lib), self.head_rescore], np.int64)
        gp = np.array([_ptr(g) for g in glob], np.uint64)
        self._keep = (keep, lay, gp, dims, thr)
        h = self._lib.nk_model_new(dims.ctypes.data, gp.ctypes.data, lay.ctypes.data, thr.ctypes.data)
        if not h:
            raise RuntimeError("native backend: could not create the model (out of memory?)")
        self._h = h
        if hasattr(self._lib, "nk_model_lora_packed"):
            # LoRAs the C side reads from its packed copy alone (csrc/nk_lora.c, decode and prefill): the
            # file's pages go back to the kernel (3.5 MiB resident at 58M)
            from ..residency import drop_pages
            drop_pages([t[f"blocks.{i}.att.{n}.qc"] for i in range(L) for j, n in enumerate(lora)
                        if (i > 0 or j < 6) and self._lib.nk_model_lora_packed(h, i, j)])
        if self.ffn_mode == "dense" and self._bundle is None and self._sets is None and (
                not hasattr(self._lib, "nk_model_dense") or self._lib.nk_model_dense(h, 1) != 0):
            raise RuntimeError("native backend: no dense FFN (a build without it, no memory, or ffn_dim % 32)")
        if getattr(self, "_all_keys", False) and self._sets is not None:
            self._lib.nk_model_all_keys(h, 1)        # with_sets(all_keys=True), kept over rebuilds
        self._stats = np.zeros((L, 2), np.int64)
        # what every forward passes, fetched once (forward, step): the C entry, the stats and token buffers
        self._fwd, self._stats_p = self._lib.nk_forward, self._stats.ctypes.data
        self._tok1 = np.zeros(1, np.int32)
        self._tok1_p = self._tok1.ctypes.data
        self._state_shapes = ((L, D), (L, H, N, N), (L, D))
        self._stats_c = (ctypes.c_int64 * (2 * L)).from_buffer(self._stats)
        self._dims = (L, L * D, L * H * N * N, V)          # for _run: L, att_x and wkv sizes, V
        # bytes read per token besides the FFN rows: time-mix weights, LoRAs, predictor, head, emb row
        att = sum(t[f"blocks.{i}.att.{n}"].nbytes for i in range(L) for n in
                  [f"{m}.weight.{x}" for m in ("receptance", "key", "value", "output") for x in ("q", "scale", "q4", "s4")] +
                  [f"{m}.{x}" for m in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2") for x in ("qc", "cscale")]
                  if f"blocks.{i}.att.{n}" in t)
        pred = sum(p.qm.nbytes for p in preds) if preds is not None else 0
        if self.head_rescore:             # the 4-bit copy, and K int8 rows with their scales
            head = t["head.weight.q4"].nbytes + t["head.weight.s4"].nbytes + min(self.head_rescore, V) * (D + 4)
        else:
            head = sum(t[n].nbytes for n in ("head.weight.q", "head.weight.scale", "head.weight.q4", "head.weight.s4")
                       if n in t)
        self._fixed_bytes = int(att + pred + head + 2 * D)
        # bytes of one FFN key row or value column (+ its scales): int8 D + 4, int4 D / 2 + 2 D / 32
        self._row_bytes = D // 2 + D // 16 if "blocks.0.ffn.kv4" in t else D + 4

    def _free(self):
        h, self._h = getattr(self, "_h", None), None
        if h and self._lib is not None:
            self._lib.nk_model_free(h)

    def __del__(self):
        try:
            self._free()
        except Exception:
            pass

    # --- running -------------------------------------------------------------------------------
    def zero_state(self) -> State:
        return State.zeros(self.config)

    def forward(self, tokens, state: State | None = None, full_output: bool = False, record=None):
        """(logits (V,) of the last token, or (T, V) with full_output; the new state). record: None,
        or a zeroed uint8 (T, L, F) array where a sparse model marks each token's predicted neurons
        (with T > 1 only those with relu(k) > 0: the prefill asks the predictor about no others)."""
        if self.hooks.any():
            raise RuntimeError("model hooks need the numba or reference backend (--backend numba)")
        tok = np.ascontiguousarray(np.asarray(tokens, np.int64).reshape(-1).astype(np.int32))
        if tok.size == 0:
            raise ValueError("forward needs at least one token")
        V = self.config.vocab_size
        if tok.min() < 0 or tok.max() >= V:
            raise ValueError(f"token id out of range [0, {V})")
        return self._run(tok, tok.ctypes.data, tok.shape[0], state, full_output, record)

    def step(self, token: int, state: State | None = None):
        """One token: (logits (V,), new_state). The decode loop's path: the token goes through a buffer
        of the model (its pointer taken once), no per-call array conversions (tools/native_phases.py)."""
        if self.hooks.any():
            raise RuntimeError("model hooks need the numba or reference backend (--backend numba)")
        t = int(token)
        if not 0 <= t < self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        self._tok1[0] = t
        return self._run(self._tok1, self._tok1_p, 1, state, False, None)

    def _run(self, tok, tok_p: int, T: int, state, full_output: bool, record):
        """One C forward of the T int32 tokens at tok_p (tok keeps them alive). The new state's three
        arrays are views of one float32 block [att_x (L, D) | wkv (L, H, N, N) | ffn_x (L, D)], so one
        pointer serves all three. Per decode step this Python is ~5% of a 58M forward at one thread
        (tools/native_phases.py), each numpy call several times its warm cost with the interpreter's
        caches cold after the C call: hence pointers of our own fresh arrays through ctypes (0.3 us, not
        `.ctypes.data`'s 1 us), the stats read as a ctypes view, no numpy reduction."""
        L, nx, nw, V = self._dims
        wkv_in = None
        buf = np.empty(2 * nx + nw, np.float32) if state is not None else np.zeros(2 * nx + nw, np.float32)
        ax, fx = buf[:nx].reshape(L, -1), buf[nx + nw:].reshape(L, -1)
        st = State(ax, buf[nx:nx + nw].reshape(self._state_shapes[1]), fx)
        if state is not None:          # a new state; the C side reads the input wkv, writes the new
            if (np.shape(state.att_x), np.shape(state.wkv), np.shape(state.ffn_x)) != self._state_shapes:
                raise ValueError("state shapes do not fit this model")
            wkv_in = np.ascontiguousarray(state.wkv, np.float32)
            np.copyto(ax, state.att_x, casting="unsafe")
            np.copyto(fx, state.ffn_x, casting="unsafe")
        logits = np.empty((T, V) if full_output else V, np.float32)
        ctypes.memset(self._stats_p, 0, 16 * L)
        if record is not None:
            c = self.config
            if not (isinstance(record, np.ndarray) and record.dtype == np.uint8 and record.flags.c_contiguous
                    and record.shape == (T, c.n_layer, c.ffn_dim)):
                raise ValueError(f"record must be a C-contiguous uint8 array of shape {(T, c.n_layer, c.ffn_dim)}")
        gidx = goff = None
        if self._sets is not None:
            F = self.config.ffn_dim
            sets = [np.asarray(self._sets.predict_indices(i, None), np.int32) for _ in range(T) for i in range(L)]
            goff = np.zeros(T * L + 1, np.int64)
            np.cumsum([len(x) for x in sets], out=goff[1:])
            gidx = np.concatenate(sets) if goff[-1] else np.zeros(1, np.int32)
            if gidx.size and (gidx.min() < 0 or gidx.max() >= F):
                raise ValueError(f"given neuron ids out of range [0, {F})")
        p = _addr(buf)
        self._fwd(self._h, tok_p, T, p, p + 4 * nx, p + 4 * (nx + nw), _addr(logits), 1 if full_output else 0,
                  self._stats_p, None if record is None else record.ctypes.data,
                  None if gidx is None else gidx.ctypes.data, None if goff is None else goff.ctypes.data,
                  None if wkv_in is None else wkv_in.ctypes.data)
        v = self._stats_c[:]                  # (L, 2) flat: key rows, value rows of each layer
        n_keys, n_vals = sum(v[0::2]), sum(v[1::2])
        if self.ffn is not None and T == 1:  # decode steps, counted as sparse.SparseFFN does (per token
            # and layer); a prefill scores only the neurons with relu(k) > 0 (see csrc/nk_ffn.c)
            self.ffn.n_tokens += L
            self.ffn.n_active += n_keys
            self.ffn.n_values += n_vals
        self.last_stats = self._stats.copy()
        self.tokens_run += T
        self.bytes_read += self._fixed_bytes * T + (n_keys + n_vals) * self._row_bytes
        return logits, st


def _addr(a: np.ndarray) -> int:
    """The data address of a writable array this module just made (ctypes' buffer view: a third of
    `a.ctypes.data`'s cost)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(a))


class _NoHooks:
    def __init__(self):
        self.att_input, self.ffn_shift, self.ffn_input, self.ffn_activation = [], [], [], []

    def any(self) -> bool:
        return bool(self.att_input or self.ffn_shift or self.ffn_input or self.ffn_activation)


class _Ops:
    """What callers read from `model.ops` (the backend's name)."""
    name = "native"

    @staticmethod
    def to_host(x):
        return np.asarray(x)
