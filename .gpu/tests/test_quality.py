"""rwkv_edge.quality: KL divergence / same-top-1 against the dense base, and stored base files.

Honesty checks: the base against itself gives KLD 0 and same-top-1 1.0; the exact sparse set gives
KLD ~0 at density < 1; a crippled predictor (5% of the neurons) gives a KLD orders larger; a stored
base reproduces the in-memory comparison.
"""
from __future__ import annotations

import numpy as np
import pytest

import rwkv_edge
from rwkv_edge import quality as Q
from rwkv_edge.sparse import SparseFFN, exact_active_indices

CTX = 48


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return rwkv_edge.load_model(tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(1, 256, 3 * CTX + 7).tolist()


def keep_top(model, share):
    """A bad predictor: only the `share` highest-scoring neurons of the true keys (thresholds raised)."""
    Ks = [np.asarray(b.ffn_key, np.float32) for b in model.blocks]

    def predict(layer, x):
        s = Ks[layer] @ x
        k = max(1, int(share * s.size))
        return np.sort(np.argpartition(-s, k)[:k]).astype(np.int32)
    return predict


def test_windows_start_with_bos_and_drop_the_tail():
    segs = Q.window_segments(list(range(1, 12)), 5)
    assert segs == [([0, 1, 2, 3, 4], [1, 2, 3, 4, 5]), ([0, 6, 7, 8, 9], [6, 7, 8, 9, 10])]
    with pytest.raises(ValueError, match="shorter than one context"):
        Q.window_segments([1, 2, 3], 5)


def test_base_against_itself_is_zero(model, tokens):
    r = Q.compare(model, model, tokens, ctx=CTX, progress=False)
    assert r["n_tokens"] == 3 * CTX
    assert r["kld_mean"] <= 1e-12 and r["kld_max"] <= 1e-12
    assert r["same_top1"] == 1.0 and r["dp_rms"] == 0.0 and r["ln_ppl_ratio"] == 0.0
    assert r["ppl"] == r["ppl_base"] and r["density"] is None
    # the ppl is the windowed ppl computed independently here
    nll = [-Q.segment_logprobs(model, i)[np.arange(len(t)), t].sum() for i, t in Q.window_segments(tokens, CTX)]
    assert r["ppl_base"] == pytest.approx(np.exp(np.sum(nll) / (3 * CTX)), rel=1e-6)


def test_exact_sparse_is_near_zero_and_bad_predictor_is_large(model, tokens):
    exact = model.with_ffn(SparseFFN(model, exact_active_indices(model)))
    r0 = Q.compare(model, exact, tokens, ctx=CTX, progress=False)
    assert r0["kld_mean"] < 1e-6 and r0["same_top1"] == 1.0
    assert 0.2 < r0["density"] < 0.8                      # it really ran sparse, and says how sparse
    bad = model.with_ffn(SparseFFN(model, keep_top(model, 0.05)))
    r1 = Q.compare(model, bad, tokens, ctx=CTX, progress=False)
    assert r1["density"] == pytest.approx(0.05, abs=0.01)
    assert r1["kld_mean"] > 1e-2 and r1["kld_mean"] > 1e3 * max(r0["kld_mean"], 1e-12)
    assert r1["kld_p99"] >= r1["kld_median"] and r1["same_top1"] < 0.9


def test_kl_matches_a_direct_computation(model, tokens):
    bad = model.with_ffn(SparseFFN(model, keep_top(model, 0.2)))
    arr = Q.run_segments(model, bad, Q.window_segments(tokens, CTX)[:1], progress=False)
    inp = Q.window_segments(tokens, CTX)[0][0]
    lb, _ = model.forward(inp, full_output=True)
    lc, _ = bad.forward(inp, full_output=True)
    pb, pc = (np.exp(z - z.max(1, keepdims=True)) for z in (lb.astype(np.float64), lc.astype(np.float64)))
    pb, pc = pb / pb.sum(1, keepdims=True), pc / pc.sum(1, keepdims=True)
    want = (pb * np.log(pb / pc)).sum(1)
    assert np.allclose(arr["kld"], want, rtol=1e-3, atol=2e-6)          # float32 log-softmax


@pytest.mark.parametrize("top_k", [0, 32, 256])
def test_saved_base_reproduces_in_memory(model, tokens, tmp_path, top_k):
    bad = model.with_ffn(SparseFFN(model, keep_top(model, 0.1)))
    want = Q.compare(model, bad, tokens, ctx=CTX, progress=False)
    segs = Q.window_segments(tokens, CTX)
    base = Q.compute_base(model, segs, CTX, top_k=top_k, tokenizer="tok-a", progress=False)
    Q.save_base(tmp_path / "b.npz", base)
    got_base = Q.load_base(tmp_path / "b.npz", model=model, tokenizer="tok-a")
    assert got_base.n_tokens == 3 * CTX and got_base.top_k == top_k
    got = Q.compare(None, bad, tokens, ctx=CTX, base=got_base, progress=False)
    assert got["ppl_base"] == pytest.approx(want["ppl_base"], rel=1e-6)
    assert got["same_top1"] == want["same_top1"] and got["dp_mean"] == pytest.approx(want["dp_mean"], abs=1e-7)
    # float16 full rows, or a top-k holding the whole vocab: KL to 1e-3 relative; top-32 of 256 + tail
    # bucket: a lower bound (this random model's flat distributions put much of the KL in the tail)
    if top_k in (0, 256):
        assert got["kld_mean"] == pytest.approx(want["kld_mean"], rel=1e-3)
    else:
        assert 0.2 * want["kld_mean"] <= got["kld_mean"] <= want["kld_mean"] * (1 + 1e-5)
        in_memory = Q.compare(None, bad, tokens, ctx=CTX, base=base, progress=False)
        assert got["kld_mean"] == pytest.approx(in_memory["kld_mean"], rel=1e-9)
    self_cmp = Q.compare(None, model, tokens, ctx=CTX, base=got_base, progress=False)
    assert self_cmp["kld_mean"] < 1e-6 and self_cmp["same_top1"] == 1.0


def test_base_file_refuses_other_model_tokenizer_and_tokens(model, tiny_ckpt, tokens, tmp_path):
    segs = Q.window_segments(tokens, CTX)
    Q.save_base(tmp_path / "b.npz", Q.compute_base(model, segs, CTX, top_k=8, tokenizer="tok-a", progress=False))
    other = rwkv_edge.load_model(tiny_ckpt("x070", n_layer=2, n_embd=64, head_size=16, vocab_size=256, seed=1))
    with pytest.raises(ValueError, match="another model"):
        Q.load_base(tmp_path / "b.npz", model=other)
    with pytest.raises(ValueError, match="another tokenizer"):
        Q.load_base(tmp_path / "b.npz", tokenizer="tok-b")
    base = Q.load_base(tmp_path / "b.npz")
    with pytest.raises(ValueError, match="other tokens"):
        Q.compare(None, model, tokens[1:], ctx=CTX, base=base, progress=False)
    with pytest.raises(ValueError, match="ctx"):
        Q.compare(None, model, tokens, ctx=CTX // 2, base=base, progress=False)
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable base file"):
        Q.load_base(tmp_path / "x.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.npz", "x.npz"]     # no temp files left


class _ByteTok:
    def encode(self, s):
        return [1 + b % 255 for b in s.encode()]


def test_lambada_scoring_runs_the_head_on_targets_only_and_matches_the_full_forward(model):
    """score_lambada runs the context (but its last token) first and the head only on the scored
    positions; acc / ppl must be those of one full-output forward over context + target."""
    from rwkv_edge.evaluate import log_softmax, score_lambada

    tok = _ByteTok()
    items = [("the cat sat on the", " mat"), ("a", " b"), ("once upon a time there was", " somebody")]
    correct, nll = 0, 0.0
    for ctx, target in items:
        src, dst = [0] + tok.encode(ctx), tok.encode(target)
        lp = log_softmax(model.forward(src + dst[:-1], full_output=True)[0])[len(src) - 1:]
        nll -= sum(lp[j, t] for j, t in enumerate(dst))
        correct += all(int(np.argmax(lp[j])) == t for j, t in enumerate(dst))
    r = score_lambada(model, tok, items, progress=False)
    assert r.n == 3 and r.accuracy == correct / 3
    assert r.perplexity == pytest.approx(np.exp(nll / 3), rel=1e-5)
    sparse = model.with_ffn(SparseFFN(model, keep_top(model, 0.05)))          # a candidate differs
    assert score_lambada(sparse, tok, items, progress=False).perplexity != pytest.approx(r.perplexity, rel=1e-5)
