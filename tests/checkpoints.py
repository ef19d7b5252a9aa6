"""Random-initialised RWKV checkpoints in the official BlinkDL key layout, for tests.

    from checkpoints import make_checkpoint
    path = make_checkpoint("x060", tmp_path / "tiny.pth", n_layer=2, n_embd=64)

Magnitudes are chosen so that the models are far from trivial: matrices ~N(0, 0.1^2) on
layer-normed inputs give pre-activations of std ~1, so relu(W_k x)^2 is about half zeros,
decays spread over (0.07, 1), logits have std ~1. Key order: the training code's module order
for x052/x060 (what BlinkDL's trainer saves), sorted names for x070 (like rwkv7-ref-58m.pth).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# LoRA / extra dims; the official models use 32/64 (x060) and 64/64/32/128 (x070 at D=512)
X060_MIX_DIM, X060_DECAY_DIM = 32, 64
X070_LORA = {"w": 16, "a": 16, "v": 8, "g": 32}


def _block_keys(version, i, D, H, N, F, rng):
    """Yield (name, array) of block i in the trainer's module order."""
    nrm = lambda *s, scale=0.1: (rng.standard_normal(s) * scale).astype(np.float32)
    uni = lambda lo, hi, *s: rng.uniform(lo, hi, s).astype(np.float32)
    ln_w = lambda: 1.0 + nrm(D, scale=0.1)
    p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
    yield p + "ln1.weight", ln_w()
    yield p + "ln1.bias", nrm(D)
    yield p + "ln2.weight", ln_w()
    yield p + "ln2.bias", nrm(D)
    if i == 0:
        yield p + "ln0.weight", ln_w()
        yield p + "ln0.bias", nrm(D)
    if version == "x052":
        for c in "kvrg":
            yield a + f"time_mix_{c}", uni(0, 1, 1, 1, D)
        yield a + "time_decay", uni(-6, 1, H, N)                  # exp(-exp(.)) in (0.07, 1)
        yield a + "time_faaaa", nrm(H, N, scale=0.5)
        for m in ("receptance", "key", "value", "output", "gate"):
            yield a + f"{m}.weight", nrm(D, D)
        yield a + "ln_x.weight", ln_w()
        yield a + "ln_x.bias", nrm(D)
        yield f + "time_mix_k", uni(0, 1, 1, 1, D)
        yield f + "time_mix_r", uni(0, 1, 1, 1, D)
    elif version == "x060":
        for c in "xwkvrg":
            yield a + f"time_maa_{c}", uni(0, 1, 1, 1, D)
        yield a + "time_maa_w1", nrm(D, 5 * X060_MIX_DIM)
        yield a + "time_maa_w2", nrm(5, X060_MIX_DIM, D)
        yield a + "time_decay", uni(-6, 1, 1, 1, D)
        yield a + "time_decay_w1", nrm(D, X060_DECAY_DIM)
        yield a + "time_decay_w2", nrm(X060_DECAY_DIM, D)
        yield a + "time_faaaa", nrm(H, N, scale=0.5)
        for m in ("receptance", "key", "value", "output", "gate"):
            yield a + f"{m}.weight", nrm(D, D)
        yield a + "ln_x.weight", ln_w()
        yield a + "ln_x.bias", nrm(D)
        yield f + "time_maa_k", uni(0, 1, 1, 1, D)
        yield f + "time_maa_r", uni(0, 1, 1, 1, D)
    elif version == "x070":
        L = X070_LORA
        for c in "rwkvag":
            yield a + f"x_{c}", uni(0, 1, 1, 1, D)
        yield a + "w0", (rng.standard_normal((1, 1, D)) * 2 - 2.5).astype(np.float32)
        yield a + "w1", nrm(D, L["w"])
        yield a + "w2", nrm(L["w"], D)
        yield a + "a0", nrm(1, 1, D, scale=0.3) - 0.2
        yield a + "a1", nrm(D, L["a"])
        yield a + "a2", nrm(L["a"], D)
        if i > 0:  # layer 0 has no value residual
            yield a + "v0", nrm(1, 1, D, scale=0.3) + 0.5
            yield a + "v1", nrm(D, L["v"])
            yield a + "v2", nrm(L["v"], D)
        yield a + "g1", nrm(D, L["g"])
        yield a + "g2", nrm(L["g"], D)
        yield a + "k_k", uni(0.5, 1, 1, 1, D)
        yield a + "k_a", 1.0 + nrm(1, 1, D, scale=0.1)
        yield a + "r_k", nrm(H, N, scale=0.3)
        for m in ("receptance", "key", "value", "output"):
            yield a + f"{m}.weight", nrm(D, D)
        yield a + "ln_x.weight", ln_w()
        yield a + "ln_x.bias", nrm(D)
        yield f + "x_k", uni(0, 1, 1, 1, D)
    else:
        raise ValueError(f"unknown version {version!r}")
    yield f + "key.weight", nrm(F, D)
    if version != "x070":
        yield f + "receptance.weight", nrm(D, D)
    yield f + "value.weight", nrm(D, F)


def make_state_dict(version: str, n_layer=2, n_embd=64, head_size=16, ffn_mult=4, vocab_size=256, seed=0) -> dict:
    """{official name: float32 numpy array} of a random model (see module docstring)."""
    if n_embd % head_size:
        raise ValueError("n_embd must be a multiple of head_size")
    rng = np.random.default_rng(seed)
    D, N, F, V = n_embd, head_size, ffn_mult * n_embd, vocab_size
    H = D // N
    sd = {"emb.weight": (rng.standard_normal((V, D)) * 0.1).astype(np.float32)}
    for i in range(n_layer):
        sd.update(_block_keys(version, i, D, H, N, F, rng))
    sd["ln_out.weight"] = (1.0 + rng.standard_normal(D) * 0.1).astype(np.float32)
    sd["ln_out.bias"] = (rng.standard_normal(D) * 0.1).astype(np.float32)
    sd["head.weight"] = (rng.standard_normal((V, D)) * 0.1).astype(np.float32)
    if version == "x070":
        sd = dict(sorted(sd.items()))
    return sd


def make_checkpoint(version: str, path, n_layer=2, n_embd=64, head_size=16, ffn_mult=4, vocab_size=256,
                    seed=0, dtype: str = "float32") -> Path:
    """Write a random `.pth` checkpoint of `version` ("x052", "x060", "x070") to `path`; returns it.

    dtype: "float32", "float16" or "bfloat16" (the tensor dtype stored in the file).
    Note: the `rwkv` package detects x052/x060 while scanning keys in file order, so compare
    x052/x060 models against it with n_layer >= 2.
    """
    import torch

    sd = make_state_dict(version, n_layer, n_embd, head_size, ffn_mult, vocab_size, seed)
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: torch.from_numpy(v).to(tdt) for k, v in sd.items()}, tmp)
    os.replace(tmp, path)
    return path
