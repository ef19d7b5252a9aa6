"""Turning logits into a token: temperature, top-k, top-p, presence/frequency penalties."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0 = greedy (deterministic)
    top_p: float = 0.85        # nucleus mass kept, in (0, 1]
    top_k: int = 0             # 0 = no top-k cut
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 0.996  # old occurrences fade, as in RWKV's reference chat

    def validate(self) -> None:
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0, got {self.top_k}")


@dataclass
class Sampler:
    params: SamplingParams
    seed: int | None = None
    counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self.params.validate()
        self.rng = np.random.default_rng(self.seed)

    def reset(self) -> None:
        self.counts.clear()

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        logits = np.asarray(logits, dtype=np.float64)
        if self.counts and (p.presence_penalty or p.frequency_penalty):
            logits = logits.copy()
            ids = np.fromiter(self.counts.keys(), dtype=np.int64)
            c = np.fromiter(self.counts.values(), dtype=np.float64)
            logits[ids] -= p.presence_penalty + c * p.frequency_penalty
        tok = sample(logits, p.temperature, p.top_p, p.top_k, self.rng)
        if p.presence_penalty or p.frequency_penalty:
            for k in list(self.counts):
                self.counts[k] *= p.penalty_decay
            self.counts[tok] = self.counts.get(tok, 0.0) + 1.0
        return tok


def sample(logits: np.ndarray, temperature: float, top_p: float, top_k: int, rng: np.random.Generator) -> int:
    """Draw one token id from logits (V,)."""
    if temperature == 0:
        return int(np.argmax(logits))
    z = np.asarray(logits, dtype=np.float64) / temperature
    order = np.argsort(-z)
    if top_k > 0:
        order = order[:top_k]
    z = z[order]
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p < 1:
        cum = np.cumsum(probs)
        keep = int(np.searchsorted(cum, top_p) + 1)   # smallest prefix with mass >= top_p
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    return int(order[rng.choice(len(probs), p=probs)])
