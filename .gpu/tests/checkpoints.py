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

from rwkv_edge.synthetic import state_dict

# LoRA / extra dims; the official models use 32/64 (x060) and 64/64/32/128 (x070 at D=512)
X060_MIX_DIM, X060_DECAY_DIM = 32, 64
X070_LORA = {"w": 16, "a": 16, "v": 8, "g": 32}


def make_state_dict(version: str, n_layer=2, n_embd=64, head_size=16, ffn_mult=4, vocab_size=256, seed=0) -> dict:
    """{official name: float32 numpy array} of a random model (see module docstring; the tensor
    layout and magnitudes live in rwkv_edge.synthetic)."""
    return state_dict(version, n_layer, n_embd, head_size, ffn_mult, vocab_size, seed, lora=X070_LORA,
                      mix_dim=X060_MIX_DIM, decay_dim=X060_DECAY_DIM)


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
