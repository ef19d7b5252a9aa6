"""Streaming text generation on top of a model, a tokenizer and a sampler."""
from __future__ import annotations

import warnings
from typing import Iterator, Sequence

from .sampling import Sampler
from .tokenizer import StreamDecoder


# Which batch-1 decode step a `Generation` replays on the cuda backend:
#
#     dec, path = batch1_step(model)      # path: "fused-dense", "fused-predicted", "cuda-graph" or "eager"
#     dec.reset(state); logits = dec.step(token); st = dec.state()     # (None for "eager")
#
#   fused-dense      an RWKV-7 model with the dense FFN and no hooks: `cuda_decode.FusedDecode` mode
#                    "dense" (seven Triton launches a layer, one CUDA graph a step).
#   fused-predicted  an RWKV-7 model from `runtime.run_sparse(model, bundle, "cuda")` (its FFN a
#                    `sparse.DeviceSparseFFN`, which keeps the bundle; only that FFN's own hooks set):
#                    FusedDecode mode "predicted" on the same bundle (n-bit W_k threshold predictors, or
#                    an early bundle with a diagonal map), the same sets as the eager path up to scores
#                    within rounding of a threshold.
#   cuda-graph       the rest of the dense models (v5/v6, hooks set): the generic captured step
#                    `cuda_graph.CudaGraphStep` (hooks must be capturable).
#   eager            everything else (a sparse FFN FusedDecode refuses, another FFN replacement, the
#                    CPU backends): model.forward per token.
#
# Building FusedDecode rebinds the model's weights to stacked views (a transform: the model's other
# paths, e.g. prefill, compute the same numbers). Where it refuses a model (its ValueError: e.g. a head
# size or a predictor group size that is not a power of two, a full early map) the step falls back with
# a one-line RuntimeWarning, so a supported combination never silently loses its fast path unnoticed.


def _foreign_hooks(model) -> bool:
    """True when the model has a hook that its FFN did not add itself (FusedDecode runs no hooks)."""
    own = getattr(model.ffn, "own_hooks", ()) if model.ffn is not None else ()
    h = model.hooks
    return any(f not in own for k in vars(h) for f in getattr(h, k))


def fused_mode(model):
    """(mode, bundle) FusedDecode would run for `model` (on the cuda backend), or None where it does not apply."""
    if model.config.version != "x070" or _foreign_hooks(model):
        return None
    if model.ffn is None:
        return "dense", None
    bundle = getattr(model.ffn, "bundle", None)
    return ("predicted", bundle) if bundle is not None and hasattr(model.ffn, "share_value_t") else None


def batch1_step(model, fused: bool = True, tune: dict | None = None):
    """(step object or None, path name) for one-token decode of `model`; fused=False skips
    FusedDecode (the fallbacks, e.g. to measure what it gains). tune: FusedDecode launch knobs."""
    ops = getattr(model, "ops", None)       # (a stand-in model may have none: eager)
    if getattr(ops, "name", "") != "cuda":
        return None, "eager"
    fm = fused_mode(model) if fused else None
    if fm is not None:
        try:
            from .backends.cuda_decode import FusedDecode

            dec = FusedDecode(model, fm[0], bundle=fm[1], tune=tune)
        except (ValueError, ImportError) as e:
            from .errors import one_line

            warnings.warn(f"fused CUDA decode not used ({one_line(e)}); decoding on the generic path",
                          RuntimeWarning, stacklevel=2)
        else:
            if model.ffn is not None:
                model.ffn.share_value_t(model)    # W_v^T held once (FusedDecode stored it transposed)
            return dec, "fused-" + fm[0]
    if model.ffn is None and hasattr(ops, "CudaGraphStep"):
        return ops.CudaGraphStep(model), "cuda-graph"
    return None, "eager"


class Generation:
    """Holds the model state between calls so chat turns continue one conversation.

    Single-token feeds on the cuda backend replay a captured step (batch1_step: the fused
    RWKV-7 decode, dense or on the sparse model's bundle, else the generic CUDA graph); `decode_path`
    names the one taken (None before the first single-token feed). That step keeps the state in its
    own buffers between tokens: `state` is copied out only when read (then cached until the next
    token), and a state assigned (or left by a prefill) is copied in at the next token.
    fused=False: no FusedDecode (the generic CUDA graph for dense models, eager for sparse ones)."""

    def __init__(self, model, tokenizer, sampler: Sampler, state=None, fused: bool = True):
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.fused = fused
        self._state = state
        self._live = False   # the step's buffers hold the current state
        self._stale = False  # ... and self._state is behind them (copied out when `state` is read)
        self.logits = None  # logits after the last token fed
        self.stop_hit: str | None = None  # the stop string that ended the last stream, if any
        self._dec = None
        self.decode_path: str | None = None

    @property
    def state(self):
        if self._stale:
            self._state, self._stale = self._dec.state(), False
        return self._state

    @state.setter
    def state(self, state) -> None:
        self._state, self._live, self._stale = state, False, False

    def _step(self):
        """The batch-1 step object (None: eager), built at the first single-token feed."""
        if self.decode_path is None:
            self._dec, self.decode_path = batch1_step(self.model, fused=self.fused)
        return self._dec

    def feed(self, tokens: Sequence[int], chunk: int = 256) -> None:
        """Prefill: run tokens through the model (in chunks, to bound memory)."""
        if len(tokens) == 1 and self._step() is not None:
            if not 0 <= int(tokens[0]) < self.model.config.vocab_size:   # as model.forward checks
                raise ValueError(f"token id out of range [0, {self.model.config.vocab_size})")
            if not self._live:                            # batch-1 decode on CUDA: replay a captured step
                self._dec.reset(self._state)
                self._live = True
            self.logits = self.model.ops.to_host(self._dec.step(int(tokens[0])))
            self._stale = True
            return
        state = self.state
        for s in range(0, len(tokens), chunk):
            self.logits, state = self.model.forward(tokens[s:s + chunk], state)
        self.state = state

    def stream(self, max_tokens: int, stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield decoded text pieces as tokens are sampled; ends at max_tokens, the end-of-text
        token, or when the output ends with one of the `stop` strings (which is not yielded)."""
        if self.logits is None:
            self.feed([0])
        self.stop_hit = None
        dec = StreamDecoder(self.tokenizer)
        text, emitted = "", 0
        hold = max((len(s) for s in stop), default=0)
        eos = getattr(self.tokenizer, "eos_id", 0)
        # a model may have more logits than its tokenizer has ids (padded vocabularies): never sample those
        n_ids = getattr(self.tokenizer, "vocab_size", None)
        for _ in range(max_tokens):
            logits = self.logits if not n_ids or n_ids >= len(self.logits) else self.logits[:n_ids]
            tok = self.sampler(logits)
            self.feed([tok])
            if tok == eos:
                break
            text += dec.push(tok)
            # a stop string cannot start before `emitted`: the last `hold` characters are held back
            hits = sorted((j, s) for s in stop if s for j in [text.find(s, emitted)] if j >= 0)
            if hits:
                j, self.stop_hit = hits[0]
                if j > emitted:
                    yield text[emitted:j]
                return
            if len(text) - hold > emitted:  # hold back what could be the start of a stop string
                yield text[emitted:len(text) - hold]
                emitted = len(text) - hold
        text += dec.flush()
        if len(text) > emitted:
            yield text[emitted:]


def generate(model, tokenizer, prompt: str, max_tokens: int, sampler: Sampler) -> Iterator[str]:
    """Stream the continuation of `prompt` (prefixed by token 0, the document separator)."""
    g = Generation(model, tokenizer, sampler)
    g.feed([0] + tokenizer.encode(prompt))
    yield from g.stream(max_tokens)
