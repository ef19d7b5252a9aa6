"""Model configuration inferred from checkpoint tensor names and shapes (never from file names)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, asdict
from typing import Mapping, Sequence

VERSIONS = ("x052", "x060", "x070")


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ModelConfig:
    version: str      # "x052" (RWKV-5.2), "x060" (RWKV-6), "x070" (RWKV-7)
    n_layer: int
    n_embd: int       # D
    head_size: int    # N
    ffn_dim: int      # F
    vocab_size: int   # V

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        return cls(**{k: (str(d[k]) if k == "version" else int(d[k])) for k in cls.__dataclass_fields__})


def infer_config(shapes: Mapping[str, Sequence[int]], source: str = "checkpoint") -> ModelConfig:
    """Infer the config from a {tensor name: shape} mapping in the official BlinkDL key layout."""
    def need(name):
        if name not in shapes:
            raise ModelLoadError(f"{source}: unknown layout, tensor '{name}' is missing")
        return tuple(int(s) for s in shapes[name])

    vocab_size, n_embd = need("emb.weight")
    layers = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.")}
    if not layers:
        raise ModelLoadError(f"{source}: unknown layout, no 'blocks.N.*' tensors")
    n_layer = max(layers) + 1
    if sorted(layers) != list(range(n_layer)):
        raise ModelLoadError(f"{source}: truncated or damaged, layers {sorted(set(range(n_layer)) - layers)} missing")
    ffn_dim = need("blocks.0.ffn.key.weight")[0]

    if "blocks.0.att.r_k" in shapes:
        version = "x070"
        n_head, head_size = need("blocks.0.att.r_k")
    elif "blocks.0.att.time_maa_x" in shapes:
        version = "x060"
        n_head, head_size = need("blocks.0.att.time_faaaa")[:2]
    elif "blocks.0.att.time_mix_g" in shapes and "blocks.0.att.time_faaaa" in shapes:
        version = "x052"
        n_head, head_size = need("blocks.0.att.time_faaaa")[:2]
    else:
        raise ModelLoadError(f"{source}: unknown layout, not RWKV-5.2 (x052), RWKV-6 (x060) or RWKV-7 (x070)")
    if n_head * head_size != n_embd:
        raise ModelLoadError(f"{source}: inconsistent shapes, {n_head} heads x {head_size} != n_embd {n_embd}")
    need("head.weight")
    for i in range(n_layer):
        need(f"blocks.{i}.ffn.value.weight")
    return ModelConfig(version, n_layer, n_embd, head_size, ffn_dim, vocab_size)


def fingerprint_arrays(config: ModelConfig, probes: Sequence) -> str:
    """A short stable id of a model: its config plus a hash of a few weight tensors' bytes."""
    h = hashlib.sha256(repr(sorted(config.to_dict().items())).encode())
    for a in probes:
        h.update(memoryview(a.tobytes()[: 1 << 16]))
    return h.hexdigest()[:16]
