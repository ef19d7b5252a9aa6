"""The reference `rwkv` pip package behind our model interface, for evaluation and benchmarks only.

The package picks RWKV-7 at import time from the environment variable RWKV_V7_ON, so this module
must be imported in a process that runs only that package's models of one family.
"""
from __future__ import annotations

import os
from types import SimpleNamespace



class RwkvPackageModel:
    """forward(tokens, state=None, full_output=False) -> (logits numpy, state), like rwkv_edge models."""

    def __init__(self, path: str, strategy: str = "cpu fp32"):
        import torch

        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        is_v7 = "blocks.0.att.r_k" in sd
        vocab = sd["emb.weight"].shape[0]
        del sd
        os.environ["RWKV_V7_ON"] = "1" if is_v7 else "0"
        os.environ.setdefault("RWKV_JIT_ON", "1")
        os.environ.setdefault("RWKV_CUDA_ON", "0")
        from rwkv.model import RWKV

        self.model = RWKV(model=path[:-4] if path.endswith(".pth") else path, strategy=strategy)
        self.config = SimpleNamespace(vocab_size=vocab, version="x070" if is_v7 else "x0x0")
        self.fingerprint = "rwkv-package"

    def forward(self, tokens, state=None, full_output=False):
        import torch

        if state is not None:
            state = [s.clone() for s in state]
        with torch.no_grad():
            out, state = self.model.forward(list(tokens), state, full_output=full_output)
        return out.float().cpu().numpy(), state

    def step(self, token, state=None):
        return self.forward([token], state)
