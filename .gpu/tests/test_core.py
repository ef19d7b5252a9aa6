"""Core runtime: loading errors, sequence == step, State round trips, sampling."""
import os

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge import ModelLoadError, State, load_model
from rwkv_edge.sampling import Sampler, SamplingParams, sample


@pytest.mark.parametrize("version", ["x052", "x060", "x070"])
def test_sequence_equals_steps(tiny_ckpt, version):
    m = load_model(tiny_ckpt(version), backend="reference")
    toks = [1, 7, 42, 3, 99, 5]
    seq, st_seq = m.forward(toks, full_output=True)
    st, steps = None, []
    for t in toks:
        lo, st = m.step(t, st)
        steps.append(lo)
    np.testing.assert_allclose(np.stack(steps), seq, atol=1e-4, rtol=0)
    for a, b in [(st.att_x, st_seq.att_x), (st.wkv, st_seq.wkv), (st.ffn_x, st_seq.ffn_x)]:
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert seq.std() > 0.05  # the random model is not trivial


def test_forward_does_not_mutate_state(tiny_ckpt):
    m = load_model(tiny_ckpt("x070"), backend="reference")
    _, st = m.forward([1, 2, 3])
    snap = st.copy()
    m.forward([4, 5], st)
    np.testing.assert_array_equal(st.wkv, snap.wkv)
    np.testing.assert_array_equal(st.att_x, snap.att_x)


def test_state_save_load_same_continuation(tiny_ckpt, tmp_path):
    m = load_model(tiny_ckpt("x070"), backend="reference")
    _, st = m.forward([3, 1, 4, 1, 5])
    p = tmp_path / "s.npz"
    st.save(p, fingerprint=m.fingerprint)
    st2 = State.load(p, m.config, fingerprint=m.fingerprint)

    def greedy(state, n=8):
        out, tok = [], 9
        for _ in range(n):
            lo, state = m.step(tok, state)
            tok = int(np.argmax(lo))
            out.append(tok)
        return out

    assert greedy(st) == greedy(st2)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    with pytest.raises(ValueError, match="another model"):
        State.load(p, m.config, fingerprint="0000")


def test_config_inferred(tiny_ckpt):
    m = load_model(tiny_ckpt("x070", n_layer=3, n_embd=64, head_size=16), backend="reference")
    c = m.config
    assert (c.version, c.n_layer, c.n_embd, c.head_size, c.n_head, c.ffn_dim) == ("x070", 3, 64, 16, 4, 256)


def test_load_errors(tmp_path, tiny_ckpt):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "missing.pth", backend="reference")
    txt = tmp_path / "notes.pth"
    txt.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a PyTorch checkpoint"):
        load_model(txt, backend="reference")
    good = open(tiny_ckpt("x070"), "rb").read()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(cut, backend="reference")
    import torch
    odd = tmp_path / "odd.pth"
    torch.save({"foo": torch.zeros(3)}, odd)
    with pytest.raises(ModelLoadError, match="unknown layout"):
        load_model(odd, backend="reference")
    for e in [ModelLoadError]:
        try:
            load_model(cut, backend="reference")
        except e as err:
            assert "\n" not in str(err) and str(cut) in str(err)


def test_token_range_checked(tiny_ckpt):
    m = load_model(tiny_ckpt("x070"), backend="reference")
    with pytest.raises(ValueError, match="out of range"):
        m.forward([m.config.vocab_size])


def test_greedy_and_filters():
    rng = np.random.default_rng(0)
    logits = np.array([0.0, 5.0, 1.0, 4.9, -3.0])
    assert sample(logits, 0, 1.0, 0, rng) == 1
    draws = {sample(logits, 1.0, 1.0, 2, rng) for _ in range(200)}
    assert draws == {1, 3}  # top-k 2 keeps exactly the two best
    draws = {sample(logits, 1.0, 0.3, 0, rng) for _ in range(100)}
    assert draws == {1}     # top-p 0.3 keeps only the best (its mass is > 0.3)
    with pytest.raises(ValueError):
        Sampler(SamplingParams(top_p=0.0))


def test_sampler_seeded_and_penalties():
    logits = np.zeros(50)
    a = [Sampler(SamplingParams(1.0, 1.0), seed=3)(logits) for _ in range(1)]
    b = [Sampler(SamplingParams(1.0, 1.0), seed=3)(logits) for _ in range(1)]
    assert a == b
    s = Sampler(SamplingParams(temperature=0, presence_penalty=10.0), seed=0)
    lg = np.zeros(5)
    lg[2] = 1.0
    assert s(lg) == 2
    assert s(lg) != 2  # penalised after its first use


def test_public_api():
    assert callable(rwkv_edge.load_model)
    assert rwkv_edge.__version__
