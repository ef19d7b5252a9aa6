"""`generate.Generation`'s batch-1 step bookkeeping (no GPU needed): on a backend named "cuda" the
step from generate.batch1_step keeps the state between tokens, is reset only when the state was
assigned or left by a prefill, and copies the state out only when it is read; the numbers equal
model.forward's. The step here is a stand-in over the numpy reference (the GPU tests,
tests/test_cuda_generate.py, run the real FusedDecode)."""
from __future__ import annotations

import types

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge.generate import Generation
from rwkv_edge.sampling import Sampler, SamplingParams


class _Step:
    """A FusedDecode stand-in: reset / step / state over model.forward, counting calls."""

    def __init__(self, model):
        self.model, self.st, self.resets, self.reads, self.steps = model, None, 0, 0, 0

    def reset(self, state=None):
        self.resets += 1
        self.st = None if state is None else state.copy()

    def step(self, token):
        self.steps += 1
        lg, self.st = self.model.forward([token], self.st)
        return lg

    def state(self):
        self.reads += 1
        return self.st.copy()


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    from checkpoints import make_checkpoint

    ref = rwkv_edge.load_model(str(make_checkpoint("x070", tmp_path / "m.pth")), backend="reference")
    fake = types.SimpleNamespace(config=ref.config, forward=ref.forward,
                                 ops=types.SimpleNamespace(name="cuda", to_host=np.asarray))
    steps = []

    def batch1_step(model, fused=True):
        steps.append(_Step(ref))
        return steps[-1], "fused-dense" if fused else "cuda-graph"
    monkeypatch.setattr("rwkv_edge.generate.batch1_step", batch1_step)
    return ref, fake, steps


def test_state_is_kept_by_the_step_and_copied_out_lazily(setup):
    ref, fake, steps = setup
    g = Generation(fake, None, Sampler(SamplingParams(0.0, 1.0, 0), seed=0))
    assert g.decode_path is None
    g.feed([1, 2, 3])                          # prefill: model.forward, no step yet
    assert g.decode_path is None
    for t in (4, 5, 6):
        g.feed([t])
    s = steps[0]
    assert g.decode_path == "fused-dense" and (s.resets, s.steps, s.reads) == (1, 3, 0)
    want, st = ref.forward([1, 2, 3, 4, 5, 6])
    assert np.abs(g.logits - want).max() < 1e-5
    a, b = g.state, g.state                    # one copy out, cached until the next token
    assert s.reads == 1 and a is b and np.abs(a.wkv - st.wkv).max() < 1e-5
    saved, lg = g.state.copy(), g.logits.copy()
    g.feed([7])
    after = g.logits.copy()
    g.state, g.logits = saved, lg              # assigned: copied in at the next token
    g.feed([7])
    assert s.resets == 2 and np.abs(g.logits - after).max() < 1e-6
    g.feed([8, 9])                             # a prefill from the step's state (read out first)
    full, _ = ref.forward([1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert np.abs(g.logits - full).max() < 1e-5 and s.reads == 2
    g.feed([10])
    assert s.resets == 3
    with pytest.raises(ValueError, match="out of range"):
        g.feed([ref.config.vocab_size])


def test_first_token_without_state_and_fused_off(setup):
    ref, fake, steps = setup
    g = Generation(fake, None, Sampler(SamplingParams(0.0, 1.0, 0), seed=0), fused=False)
    g.feed([0])                                # no state yet: the step starts from zeros
    want, _ = ref.forward([0])
    assert g.decode_path == "cuda-graph" and np.abs(g.logits - want).max() < 1e-6
