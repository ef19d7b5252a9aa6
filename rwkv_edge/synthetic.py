"""Random-weight RWKV models in the official key layout: tiny ones for tests, official RWKV-7 shapes
(0.1B / 0.4B / 1.5B) for benchmarks, written straight to the mmap-able model file.

    path = write_synthetic("m-1.5b-int8.rwkve", "1.5b", dtype="int8")   # streams, ~1.5 GB, modest RAM
    sd = state_dict("x070", n_layer=2, n_embd=64, lora=...)             # tests: {name: float32}

Magnitudes: matrices ~N(0, s^2) with s = 0.1 by default; on layer-normed inputs of size D that gives
pre-activations of std 0.1 sqrt(D) (~1 at D = 64, the test models). Official shapes take
s = 0.8 / sqrt(fan_in) so activations stay ~1 at D = 2048. Decays spread over (0.07, 1), layer-norm
weights ~1. relu(W_k x)^2 of random weights is ~50% non-zero, far denser than a trained model's:
benchmarks replay active sets recorded from a real model (rwkv_edge.replay).

Streaming (`write_synthetic`): every tensor is drawn in row chunks, chunk c of tensor `name` from its
own generator seeded with (seed, crc32(name), c), so any chunk is reproducible on its own and the
whole fp32 model is never in memory (peak: one chunk per tensor plus one layer's FFN scales). The
FFN value matrix W_v (D, F) is drawn as its transpose, neuron by neuron, like the bundled layout.
`synthetic_weights` materialises the very same values (tests check the streamed file against
`modelfile.convert` of them).
"""
from __future__ import annotations

import zlib

import numpy as np

from .config import ModelConfig, fingerprint_arrays

# official RWKV-7 shapes: name -> (n_layer, n_embd); vocab 65536, FFN 4 D, head size 64
SHAPES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048)}
VOCAB, HEAD_SIZE, FFN_MULT = 65536, 64, 4
# LoRA dims (w decay, a in-context rate, v value residual, g gate) of the released x070 models
OFFICIAL_LORA = {512: dict(w=64, a=64, v=32, g=128), 768: dict(w=64, a=64, v=32, g=128),
                 1024: dict(w=64, a=64, v=32, g=128), 2048: dict(w=96, a=96, v=64, g=256)}
CHUNK_ELEMS = 1 << 21       # elements per generated chunk (8 MiB of float32)


def lora_dims(n_embd: int) -> dict:
    """x070 LoRA dims: the released models' for their widths, else BlinkDL's sizing rule."""
    if n_embd in OFFICIAL_LORA:
        return dict(OFFICIAL_LORA[n_embd])
    r = lambda f: max(32, int(round(f / 32)) * 32)  # noqa: E731
    return dict(w=r(1.8 * n_embd ** 0.5), a=r(1.8 * n_embd ** 0.5), v=r(1.3 * n_embd ** 0.5), g=r(0.6 * n_embd ** 0.8))


def shape_config(shape: str) -> ModelConfig:
    """ModelConfig of an official shape name ("0.1b", "0.4b", "1.5b")."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}, choose one of {', '.join(SHAPES)}")
    L, D = SHAPES[shape]
    return ModelConfig("x070", L, D, HEAD_SIZE, FFN_MULT * D, VOCAB)


# --- tensor specs: (name, shape, init); init ("n", scale, shift) = N(0,1) scale + shift, ("u", lo, hi) -------
def _block_specs(version, i, D, H, N, F, lora, mix_dim, decay_dim, ms):
    """(name, shape, init) of block i in the trainer's module order; ms: matrix std (None: 0.1)."""
    n = lambda *s, scale=0.1, shift=0.0: (s, ("n", scale, shift))         # noqa: E731
    m = lambda *s: (s, ("n", 0.1 if ms is None else ms / np.sqrt(s[-1]), 0.0))   # noqa: E731  (out, in)
    u = lambda lo, hi, *s: (s, ("u", lo, hi))                              # noqa: E731
    ln_w = n(D, shift=1.0)
    p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
    yield (p + "ln1.weight", *ln_w)
    yield (p + "ln1.bias", *n(D))
    yield (p + "ln2.weight", *ln_w)
    yield (p + "ln2.bias", *n(D))
    if i == 0:
        yield (p + "ln0.weight", *ln_w)
        yield (p + "ln0.bias", *n(D))
    if version == "x052":
        for c in "kvrg":
            yield (a + f"time_mix_{c}", *u(0, 1, 1, 1, D))
        yield (a + "time_decay", *u(-6, 1, H, N))                     # exp(-exp(.)) in (0.07, 1)
        yield (a + "time_faaaa", *n(H, N, scale=0.5))
        for mm in ("receptance", "key", "value", "output", "gate"):
            yield (a + f"{mm}.weight", *m(D, D))
        yield (a + "ln_x.weight", *ln_w)
        yield (a + "ln_x.bias", *n(D))
        yield (f + "time_mix_k", *u(0, 1, 1, 1, D))
        yield (f + "time_mix_r", *u(0, 1, 1, 1, D))
    elif version == "x060":
        for c in "xwkvrg":
            yield (a + f"time_maa_{c}", *u(0, 1, 1, 1, D))
        yield (a + "time_maa_w1", *n(D, 5 * mix_dim))
        yield (a + "time_maa_w2", *n(5, mix_dim, D))
        yield (a + "time_decay", *u(-6, 1, 1, 1, D))
        yield (a + "time_decay_w1", *n(D, decay_dim))
        yield (a + "time_decay_w2", *n(decay_dim, D))
        yield (a + "time_faaaa", *n(H, N, scale=0.5))
        for mm in ("receptance", "key", "value", "output", "gate"):
            yield (a + f"{mm}.weight", *m(D, D))
        yield (a + "ln_x.weight", *ln_w)
        yield (a + "ln_x.bias", *n(D))
        yield (f + "time_maa_k", *u(0, 1, 1, 1, D))
        yield (f + "time_maa_r", *u(0, 1, 1, 1, D))
    elif version == "x070":
        for c in "rwkvag":
            yield (a + f"x_{c}", *u(0, 1, 1, 1, D))
        yield (a + "w0", *n(1, 1, D, scale=2.0, shift=-2.5))
        yield (a + "w1", *n(D, lora["w"]))
        yield (a + "w2", *n(lora["w"], D))
        yield (a + "a0", *n(1, 1, D, scale=0.3, shift=-0.2))
        yield (a + "a1", *n(D, lora["a"]))
        yield (a + "a2", *n(lora["a"], D))
        if i > 0:  # layer 0 has no value residual
            yield (a + "v0", *n(1, 1, D, scale=0.3, shift=0.5))
            yield (a + "v1", *n(D, lora["v"]))
            yield (a + "v2", *n(lora["v"], D))
        yield (a + "g1", *n(D, lora["g"]))
        yield (a + "g2", *n(lora["g"], D))
        yield (a + "k_k", *u(0.5, 1, 1, 1, D))
        yield (a + "k_a", *n(1, 1, D, shift=1.0))
        yield (a + "r_k", *n(H, N, scale=0.3))
        for mm in ("receptance", "key", "value", "output"):
            yield (a + f"{mm}.weight", *m(D, D))
        yield (a + "ln_x.weight", *ln_w)
        yield (a + "ln_x.bias", *n(D))
        yield (f + "x_k", *u(0, 1, 1, 1, D))
    else:
        raise ValueError(f"unknown version {version!r}")
    yield (f + "key.weight", *m(F, D))
    if version != "x070":
        yield (f + "receptance.weight", *m(D, D))
    yield (f + "value.weight", *m(D, F))


def tensor_specs(version: str, n_layer: int, n_embd: int, head_size: int, ffn_dim: int, vocab_size: int,
                 lora: dict | None = None, mix_dim: int = 32, decay_dim: int = 64, matrix_std: float | None = None):
    """[(name, shape, init)] of a whole model in the trainer's order: emb, the blocks, ln_out, head.
    matrix_std: None -> matrices ~N(0, 0.1^2), else N(0, matrix_std^2 / fan_in)."""
    D, N, F, V = n_embd, head_size, ffn_dim, vocab_size
    if D % N:
        raise ValueError("n_embd must be a multiple of head_size")
    lora = lora or lora_dims(D)
    specs = [("emb.weight", (V, D), ("n", 0.1, 0.0))]
    for i in range(n_layer):
        specs += list(_block_specs(version, i, D, D // N, N, F, lora, mix_dim, decay_dim, matrix_std))
    specs += [("ln_out.weight", (D,), ("n", 0.1, 1.0)), ("ln_out.bias", (D,), ("n", 0.1, 0.0)),
              ("head.weight", (V, D), ("n", 0.1 if matrix_std is None else matrix_std / np.sqrt(D), 0.0))]
    return specs


def file_order(version: str, d: dict) -> dict:
    """x070 checkpoints store tensors sorted by name (like the released .pth files)."""
    return dict(sorted(d.items())) if version == "x070" else d


def _draw(rng, shape, init) -> np.ndarray:
    kind, p0, p1 = init
    if kind == "u":
        return rng.uniform(p0, p1, shape).astype(np.float32)
    x = (rng.standard_normal(shape) * p0).astype(np.float32)
    return x + np.float32(p1) if p1 else x


def state_dict(version: str, n_layer=2, n_embd=64, head_size=16, ffn_mult=4, vocab_size=256, seed=0, **kw) -> dict:
    """{official name: float32 array} of a small random model, every tensor drawn in trainer order
    from one generator (the test checkpoints); kw: tensor_specs options (lora, mix_dim, decay_dim)."""
    rng = np.random.default_rng(seed)
    specs = tensor_specs(version, n_layer, n_embd, head_size, ffn_mult * n_embd, vocab_size, **kw)
    return file_order(version, {name: _draw(rng, shape, init) for name, shape, init in specs})


# --- streaming: row chunks, each from its own seeded generator ---------------------------------------------
def _rows_per_chunk(shape) -> int:
    row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return max(1, CHUNK_ELEMS // max(1, row))


def tensor_chunks(name: str, shape, init, seed: int = 0, transpose: bool = False):
    """Yield float32 row chunks of tensor `name` (transpose=True: of its transpose, for W_v (D, F))."""
    shape = tuple(shape[::-1]) if transpose else tuple(shape)
    rows = _rows_per_chunk(shape)
    key = zlib.crc32(name.encode())
    for c, r0 in enumerate(range(0, shape[0], rows)):
        rng = np.random.default_rng([seed, key, c])
        yield _draw(rng, (min(rows, shape[0] - r0),) + shape[1:], init)


def _is_ffn_value(name: str) -> bool:
    return name.startswith("blocks.") and name.endswith(".ffn.value.weight")


def synthetic_weights(config: ModelConfig, seed: int = 0, **kw) -> dict:
    """The streamed model's tensors materialised in memory (tests; small shapes only)."""
    out = {}
    for name, shape, init in tensor_specs(*_cfg_args(config), **kw):
        t = _is_ffn_value(name)
        a = np.concatenate(list(tensor_chunks(name, shape, init, seed, transpose=t)))
        out[name] = np.ascontiguousarray(a.T) if t else a.reshape(shape)
    return file_order(config.version, out)


def _cfg_args(config: ModelConfig):
    c = config
    return c.version, c.n_layer, c.n_embd, c.head_size, c.ffn_dim, c.vocab_size


def write_synthetic(path, shape, dtype: str = "int8", seed: int = 0, progress=None, **kw) -> str:
    """Write a random x070 model of `shape` (an official name, or a ModelConfig) to the model file
    `path` in `dtype` ("fp32", "fp16", "int8", "int4"), streaming tensor chunks (see module docstring).
    kw: tensor_specs options (default for official shapes: matrix_std 0.8). Returns path."""
    from rwkv_edge.quant import quantize_int8_rows, quantize_q4

    from .backends.numba_common import bundle_arrays
    from .modelfile import write_model

    config = shape_config(shape) if isinstance(shape, str) else shape
    if config.version != "x070":
        raise ValueError("write_synthetic writes RWKV-7 (x070) models")
    if isinstance(shape, str):
        kw.setdefault("matrix_std", 0.8)
    specs = file_order("x070", {name: (shp, init) for name, shp, init in tensor_specs(*_cfg_args(config), **kw)})
    chunks = lambda name, t=False: tensor_chunks(name, *specs[name], seed, transpose=t)  # noqa: E731
    pending: dict = {}      # per-row scales of the tensor just streamed, written right after it

    def kv(i):
        sc = pending.setdefault(("kv", i), [])
        for K, VT in zip(chunks(f"blocks.{i}.ffn.key.weight"), chunks(f"blocks.{i}.ffn.value.weight", True)):
            q, s = bundle_arrays(K, VT.T, dtype)
            if s is not None:
                sc.append(s)
            yield q

    def quantized_rows(kind, name):
        """kind "q" (int8 rows) or "q4" (int4 groups): the codes, chunk by chunk; the scales kept for
        the scale tensor that follows."""
        quantize = quantize_int8_rows if kind == "q" else quantize_q4
        sc = pending.setdefault((kind, name), [])
        for w in chunks(name):
            q, s = quantize(w)
            sc.append(s)
            yield q

    def produce(key):
        kind, ref = key
        if kind == "kv":
            return kv(ref)
        if kind in ("kv_scale", "scale", "s4"):
            return np.concatenate(pending.pop(({"kv_scale": "kv", "scale": "q", "s4": "q4"}[kind], ref)))
        if kind in ("q", "q4"):
            return quantized_rows(kind, ref)
        if kind in ("qc", "cscale"):       # LoRA matrices (D, <=256): small, per-column scales
            w = np.concatenate(list(chunks(ref)))
            q, s = quantize_int8_rows(w.T)
            return q.T if kind == "qc" else s
        return (c.reshape((-1,) + tuple(specs[ref][0][1:])) for c in chunks(ref))

    # the fingerprint probes of RWKVModel: emb[:8], ffn.key of layer 0 [:8], head[-8:]
    probes = [next(chunks("emb.weight"))[:8], next(chunks("blocks.0.ffn.key.weight"))[:8],
              _last_chunk("head.weight", specs["head.weight"], seed)[-8:]]
    fp = fingerprint_arrays(config, probes)
    shapes = {name: shp for name, (shp, _) in specs.items()}
    return write_model(path, config, shapes, dtype, fp, f"synthetic-{shape if isinstance(shape, str) else 'custom'}"
                       f"-seed{seed}", produce, progress)


def _last_chunk(name, spec, seed):
    """The last row chunk of a tensor, drawn without drawing the others."""
    shape, init = spec
    rows = _rows_per_chunk(shape)
    c = (shape[0] - 1) // rows
    rng = np.random.default_rng([seed, zlib.crc32(name.encode()), c])
    return _draw(rng, (shape[0] - c * rows,) + tuple(shape[1:]), init)
