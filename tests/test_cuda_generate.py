"""`generate.Generation` on the cuda backend decodes through `cuda_decode.FusedDecode` (generate.batch1_step):
dense models greedy-decode the same tokens as the numpy reference, sparse models from
`runtime.run_sparse(..., "cuda")` (an n-bit W_k bundle, an early bundle with a diagonal map) give the
reference's logits restricted to the sets the GPU used; the state the Generation exposes (copied out
lazily) equals the reference's, and a state assigned back is replayed exactly. Every test skips
without a CUDA device (CI) or without Triton."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoints import make_checkpoint  # noqa: E402
from test_cuda_decode import HAS_TRITON  # noqa: E402

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                                reason="needs a CUDA device and Triton (run on a GPU machine)")
PROMPT = [5, 61, 200, 17, 3]
N = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(make_checkpoint("x070", tmp_path_factory.mktemp("gen") / "m.pth", n_layer=3, n_embd=128,
                               head_size=32, vocab_size=300, dtype="float16"))


def _gen(model, fused=True):
    from rwkv_edge.generate import Generation
    from rwkv_edge.sampling import Sampler, SamplingParams
    return Generation(model, None, Sampler(SamplingParams(0.0, 1.0, 0), seed=0), fused=fused)


def _host(st):
    from rwkv_edge.state import State
    f = lambda a: a.detach().float().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)  # noqa: E731
    return State(f(st.att_x), f(st.wkv), f(st.ffn_x))


def _close_state(a, b, tol=1e-4):
    a, b = _host(a), _host(b)
    for k in ("att_x", "wkv", "ffn_x"):
        x, y = getattr(a, k), getattr(b, k)
        assert np.abs(x - y).max() < tol * max(1.0, np.abs(y).max()), k


def _greedy(g, n=N):
    out = []
    g.feed(PROMPT)
    for _ in range(n):
        t = int(np.argmax(g.logits))
        out.append(t)
        g.feed([t])
    return out


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_dense_generation_takes_the_fused_step_and_matches_the_reference(tmp_path, dtype):
    """Greedy tokens, logits and state after N tokens as the numpy reference (fp32: 1e-4; fp16 weights
    in the file on both sides: 1e-3, the generic prefill's rounding); fused=False keeps the generic
    CUDA graph with the same tokens; reading the state mid-stream and assigning it back replays."""
    from rwkv_edge.backends.cuda_decode import FusedDecode
    from test_cuda_decode import _models
    path = str(make_checkpoint("x070", tmp_path / "m.pth", n_layer=3, n_embd=128, head_size=32, vocab_size=300,
                               dtype={"fp32": "float32", "fp16": "float16"}[dtype]))
    tol = 1e-4 if dtype == "fp32" else 1e-3
    ref, gpu = _models(path, dtype)
    g = _gen(gpu)
    toks = _greedy(g)
    assert g.decode_path == "fused-dense" and isinstance(g._dec, FusedDecode) and g._dec.n_steps == N
    lg, st = ref.forward(PROMPT)
    want = []
    for _ in range(N):
        want.append(int(np.argmax(lg)))
        lg, st = ref.forward([want[-1]], st)
    assert toks == want
    assert np.abs(g.logits - lg).max() < tol * max(1.0, np.abs(lg).max())
    _close_state(g.state, st, 10 * tol)           # as tests/test_cuda.py allows the generic path
    _, gpu2 = _models(path, dtype)
    g2 = _gen(gpu2, fused=False)
    assert _greedy(g2) == want and g2.decode_path == "cuda-graph"
    # the state read mid-stream (lazily copied out), then assigned back: the same logits again
    saved, before = g.state.copy(), g.logits.copy()
    g.feed([7])
    after = g.logits.copy()
    g.state, g.logits = saved, before
    g.feed([7])
    assert np.abs(g.logits - after).max() < 1e-5 * max(1.0, np.abs(after).max())
    with pytest.raises(ValueError, match="out of range"):
        g.feed([300])


def _restricted_decode(g, ref, n=N):
    """Greedy fused decode from the GPU's post-prefill state; the reference steps the same tokens with
    its FFN kept to the neurons the GPU kept (kbuf > 0). Returns the worst relative logit error."""
    g.feed(PROMPT)
    st, worst = _host(g.state), 0.0
    for _ in range(n):
        t = int(np.argmax(g.logits))
        g.feed([t])
        kb = g._dec.kbuf.cpu().numpy()
        ref.hooks.ffn_activation[:] = [lambda i, k, kb=kb: k * (kb[i] > 0)]
        r, st = ref.forward([t], st)
        worst = max(worst, float(np.abs(g.logits - r).max() / max(1.0, np.abs(r).max())))
    ref.hooks.ffn_activation[:] = []
    _close_state(g.state, st)
    return worst


def test_predicted_generation_takes_the_fused_step(ckpt):
    """run_sparse(..., "cuda") with an n-bit W_k bundle: decode through FusedDecode "predicted" on the
    DeviceSparseFFN's bundle, logits within 1e-4 of the reference restricted to the GPU's sets, W_v^T
    held once; fused=False decodes eagerly through the DeviceSparseFFN with the same tokens."""
    from rwkv_edge.runtime import run_sparse
    from test_cuda_decode import _bundle, _models
    ref, gpu = _models(ckpt, "fp16")
    bundle = _bundle(ref)
    sp = run_sparse(gpu, bundle, "cuda")
    g = _gen(sp)
    assert _restricted_decode(g, ref) < 1e-4
    assert g.decode_path == "fused-predicted" and g._dec.mode == "predicted"
    assert g._dec.stats()["read_density"] < 1.0
    vt = sp.ffn.value_t[0]
    assert vt.data_ptr() == sp.blocks[0].ffn_value.data_ptr()      # the FFN's copy dropped
    _, gpu2 = _models(ckpt, "fp16")
    e = _gen(run_sparse(gpu2, bundle, "cuda"), fused=False)
    g.state, g.logits = None, None
    a, b = _greedy(g), _greedy(e)
    assert e.decode_path == "eager" and np.mean(np.array(a) == np.array(b)) >= 0.75, (a, b)


def test_early_diag_bundle_generation_on_cuda(ckpt):
    """An early bundle with a diagonal map: run_sparse accepts it on cuda (prefill: EarlySets hooks and
    the DeviceSparseFFN), decode through FusedDecode's early scores, logits within 1e-4 of the
    reference restricted to the GPU's sets; a full (D, D) map decodes eagerly with a warning."""
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.early import EarlyPredictor
    from rwkv_edge.runtime import run_sparse
    from test_cuda_decode import _models
    from test_cuda_decode_early import _early_diag_bundle
    ref, gpu = _models(ckpt, "fp16")
    ns = _early_diag_bundle(ref)
    bundle = PredictorBundle(ns.predictors, ref.fingerprint, ref.config, "quantized", input="early")
    sp = run_sparse(gpu, bundle, "cuda")
    assert sp.ffn.own_hooks and sp.hooks.any()
    g = _gen(sp)
    assert _restricted_decode(g, ref) < 1e-4
    assert g.decode_path == "fused-predicted" and g._dec.early > 0 and g._dec.ez is not None
    assert 0.0 < sp.ffn.density < 1.0                   # the prefill ran sparse on the early sets
    full = [EarlyPredictor(np.diag(p.d), p.c, p.mix, p.qm) for p in ns.predictors]
    for f, p in zip(full, ns.predictors):
        f.calib = p.calib
    fb = PredictorBundle(full, ref.fingerprint, ref.config, "quantized", input="early")
    _, gpu2 = _models(ckpt, "fp16")
    e = _gen(run_sparse(gpu2, fb, "cuda"))
    with pytest.warns(RuntimeWarning, match="fused CUDA decode not used"):
        toks = _greedy(e, 4)
    assert e.decode_path == "eager" and len(toks) == 4 and np.isfinite(e.logits).all()


def test_generation_with_foreign_hooks_keeps_the_generic_path(ckpt):
    """A dense model with a hook set: FusedDecode (which runs no hooks) is not taken."""
    from test_cuda_decode import _models
    _, gpu = _models(ckpt, "fp16")
    seen = []
    gpu.hooks.ffn_input.append(lambda i, xk: seen.append(i))
    g = _gen(gpu)
    g.feed([1])
    assert g.decode_path == "cuda-graph"
