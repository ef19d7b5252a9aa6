"""Streaming text generation on top of a model, a tokenizer and a sampler."""
from __future__ import annotations

from typing import Iterator, Sequence

from .sampling import Sampler
from .tokenizer import StreamDecoder


class Generation:
    """Holds the model state between calls so chat turns continue one conversation."""

    def __init__(self, model, tokenizer, sampler: Sampler, state=None):
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.state = state
        self.logits = None  # logits after the last token fed
        self.stop_hit: str | None = None  # the stop string that ended the last stream, if any
        self._graph = None

    def _graph_ok(self) -> bool:
        ops = self.model.ops
        if getattr(ops, "name", "") != "cuda" or self.model.ffn is not None or not hasattr(ops, "CudaGraphStep"):
            return False
        if self._graph is None:
            self._graph = ops.CudaGraphStep(self.model)
        return True

    def feed(self, tokens: Sequence[int], chunk: int = 256) -> None:
        """Prefill: run tokens through the model (in chunks, to bound memory)."""
        if len(tokens) == 1 and self.state is not None and self._graph_ok():
            self._graph.reset(self.state)                 # batch-1 decode on CUDA: replay a captured graph
            self.logits = self.model.ops.to_host(self._graph.step(int(tokens[0])))
            self.state = self._graph.state()
            return
        for s in range(0, len(tokens), chunk):
            self.logits, self.state = self.model.forward(tokens[s:s + chunk], self.state)

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
