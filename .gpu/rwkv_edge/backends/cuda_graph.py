"""`CudaGraphStep`: batch-1 decode of a CUDA-backend model captured once as a CUDA graph (re-exported
by cuda.py, whose ops it calls: cuda.py imports this module, so it is imported here at first use)."""
from __future__ import annotations

import torch


class CudaGraphStep:
    """One-token decode of a model built on this backend, captured once as a CUDA graph and
    replayed per token (removes the per-op launch cost that dominates batch-1 decode).

        g = CudaGraphStep(model)        # captures; the model must use the cuda backend
        g.reset(state)                  # copy a State (host or device) into the graph's buffers
        logits = g.step(token)          # (V,) float32 device tensor, state advanced in place
        st = g.state()                  # a copy of the current State (device tensors)

    The forward replicates RWKVModel.forward for T=1 on static buffers; FFN input/activation hooks
    and FFN replacements must be capturable (no host syncs, fixed shapes, e.g. top-k sparse sets).
    """

    def __init__(self, model, warmup: int = 2):
        ops = model.ops
        if getattr(ops, "name", "") != "cuda":
            raise ValueError("CudaGraphStep needs a model built with the cuda backend")
        from . import cuda as C
        self.C = C
        self.model = model
        self.emb = C._device_emb(model.emb)
        self.tok = torch.zeros(1, dtype=torch.long, device=C.device())
        self.st = C.adopt_state(model.zero_state())
        s = torch.cuda.Stream(device=C.device())
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):    # compile Triton kernels, warm cuBLAS outside the capture
                self._forward()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        self.reset(None)

    def _forward(self) -> torch.Tensor:
        C, m, st = self.C, self.model, self.st
        x = C.layer_norm(self.emb.index_select(0, self.tok).to(torch.float32), *m.ln0)
        ctx: dict = {}
        for i, b in enumerate(m.blocks):
            x = x + m.time_mix(i, C.layer_norm(x, b.ln1_w, b.ln1_b), st, ctx)
            x = x + m.channel_mix(i, C.layer_norm(x, b.ln2_w, b.ln2_b), st)
        return C.linear(C.layer_norm(x, *m.ln_out), m.head)[0]

    def reset(self, state=None) -> None:
        src = self.C.adopt_state(self.model.zero_state() if state is None else state)
        for f in ("att_x", "wkv", "ffn_x"):
            getattr(self.st, f).copy_(getattr(src, f))

    def step(self, token) -> torch.Tensor:
        if isinstance(token, torch.Tensor):
            self.tok.copy_(token.reshape(1))
        else:
            self.tok.fill_(int(token))
        self.graph.replay()
        return self.logits

    def state(self):
        return self.st.copy()
