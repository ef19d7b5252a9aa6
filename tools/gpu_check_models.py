"""tools/gpu_check.py's model checks and our benchmarks: the models it builds, GPU vs numpy logits
(dense, half modes, sparse), FFN sparsity, eager launch overhead and decode/prefill tokens/s."""
from __future__ import annotations

import os
import time

import numpy as np

from gpu_check_common import _median_time, _sync, emit, unpack_ref


def build_models(work: str, data: str) -> dict:
    from checkpoints import make_checkpoint

    models = {}
    t = time.time()
    # stored fp16 like rwkv7-ref-58m, so the fp16 runtime holds the same weights as numpy
    models["rand12"] = str(make_checkpoint("x070", os.path.join(work, "rand12.pth"), n_layer=12, n_embd=512,
                                           head_size=64, ffn_mult=4, vocab_size=16384, seed=0, dtype="float16"))
    print(f"   built rand12 in {time.time() - t:.1f}s", flush=True)
    pack = os.path.join(data, "ref58m_int8.npz")
    if os.path.exists(pack):
        models["ref58m-int8"] = unpack_ref(pack, os.path.join(work, "ref58m_int8.pth"))
    else:
        print(f"   {pack} missing: the reference model is skipped", flush=True)
    return models


class LowRankTopK:
    """Bench-only sparse FFN (stands in for a fitted PredictorBundle): score = x @ A @ B with a
    rank-r SVD of W_k, keep the top k per token, then `sparse_ffn` on those neurons.
    Graph-capturable (fixed shapes, no host sync)."""

    def __init__(self, model, rank=128, k=512):
        import torch

        from rwkv_edge.backends import cuda as C

        self.C, self.model, self.k = C, model, k
        self.A, self.B, self.vt = [], [], []
        for b in model.blocks:
            W = b.ffn_key.float()
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            self.A.append(C.weight((Vh[:rank].T * S[:rank]).contiguous().cpu().numpy()))   # (D, r)
            self.B.append(C.weight(U[:, :rank].T.contiguous().cpu().numpy()))              # (r, F)
            self.vt.append(C.transpose_weight(b.ffn_value))
        self.recall = []

    def scores(self, i, xk):
        return self.C.matmul(self.C.matmul(xk, self.A[i]), self.B[i])

    def __call__(self, i, xk):
        b = self.model.blocks[i]
        idx = self.C.topk_indices(self.scores(i, xk), self.k)             # (T, k)
        return self.C.sparse_ffn(xk, idx, b.ffn_key, self.vt[i])


class ExactSparse:
    """The exact active set (computed with the full W_k): checks the gather path, saves nothing."""

    def __init__(self, model):
        from rwkv_edge.backends import cuda as C

        self.C, self.model = C, model
        self.vt = [C.transpose_weight(b.ffn_value) for b in model.blocks]

    def __call__(self, i, xk):
        C, b = self.C, self.model.blocks[i]
        idx = C.mask_to_indices(C.predictor_scores(xk, b.ffn_key) > 0)
        return C.sparse_ffn(xk, idx, b.ffn_key, self.vt[i])


def _logits_run(model, prompt, steps):
    logits, st = model.forward(prompt)
    out = [logits]
    for t in steps:
        lg, st = model.forward([t], st)
        out.append(lg)
    return np.stack(out)


def logits_checks(models: dict, ids: np.ndarray) -> dict:
    import rwkv_edge
    from rwkv_edge.backends import cuda as C

    prompt, steps = [int(t) for t in ids[:32]], [int(t) for t in ids[32:35]]
    refs = {}
    for mname, path in models.items():
        t = time.time()
        ref = _logits_run(rwkv_edge.load_model(path), prompt, steps)
        refs[mname] = ref
        print(f"   numpy reference {mname}: {time.time() - t:.1f}s", flush=True)
        # fp16/bf16: the default accurate mode (float32 activations); "-fast": activations in half
        for cfg, dt, split, sparse in (("fp32", "fp32", True, None), ("fp16", "fp16", True, None),
                                       ("fp16-fast", "fp16", False, None),
                                       ("bf16", "bf16", True, None), ("bf16-fast", "bf16", False, None),
                                       ("fp32 sparse-exact", "fp32", True, "exact"),
                                       ("fp16 sparse-exact", "fp16", True, "exact"),
                                       ("fp16 sparse-lowrank-top512", "fp16", True, "lowrank")):
            C.set_dtype(dt, split_inputs=split)
            m = rwkv_edge.load_model(path, backend="cuda")
            if sparse == "exact":
                m = m.with_ffn(ExactSparse(m))
            elif sparse == "lowrank":
                m = m.with_ffn(LowRankTopK(m))
            got = _logits_run(m, prompt, steps)
            d = np.abs(got - ref)
            emit(check="logits GPU vs numpy", model=mname, config=cfg, max_abs=float(d.max()),
                 rel_max=float(d.max() / np.abs(ref).max()), logit_absmax=float(np.abs(ref).max()),
                 argmax_agree=float(np.mean(got.argmax(-1) == ref.argmax(-1))),
                 tokens=f"{len(prompt)} prompt + {len(steps)} steps")
            del m
    C.set_dtype("fp32")
    return refs


def sparsity_stats(path: str, ids: np.ndarray) -> None:
    """Activation sparsity of this model on real text, and the low-rank predictor's recall."""
    import torch

    import rwkv_edge
    from rwkv_edge.backends import cuda as C

    C.set_dtype("fp32")
    m = rwkv_edge.load_model(path, backend="cuda")
    pred = LowRankTopK(m)
    zero, rec_mass, rec_act = [], [], []

    def hook(i, xk):
        act = C.relu_sq(C.linear(xk, m.blocks[i].ffn_key))
        sel = C.topk_mask(pred.scores(i, xk), pred.k)
        zero.append(float((act == 0).float().mean()))
        rec_mass.append(float((act * sel).sum() / act.sum()))
        rec_act.append(float(((act > 0) & sel).sum() / (act > 0).sum()))
    m.hooks.ffn_input.append(hook)
    m.forward([int(t) for t in ids[:512]])
    emit(check="ffn sparsity (512 tokens)", model=os.path.basename(path), zero_frac=float(np.mean(zero)),
         zero_by_layer=[round(z, 3) for z in zero], lowrank_top512_mass_recall=float(np.mean(rec_mass)),
         lowrank_top512_active_recall=float(np.mean(rec_act)))
    del m
    torch.cuda.empty_cache()


def eager_overhead(path: str, ids: np.ndarray, out: str) -> None:
    """Where eager decode time goes: per-op launch cost and op/kernel counts per token."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import rwkv_edge
    from rwkv_edge.backends import cuda as C

    C.set_dtype("fp32")
    m = rwkv_edge.load_model(path, backend="cuda")
    _, st = m.forward([int(t) for t in ids[:16]])
    x, y = torch.randn(1, 512, device="cuda"), torch.randn(1, 512, device="cuda")
    n = 2000
    add_s = _median_time(lambda: [x + y for _ in range(n)], reps=3) / n
    H, N = m.config.n_head, m.config.head_size
    a = [torch.rand(1, H * N, device="cuda") for _ in range(6)]
    s0 = st.wkv[0]
    wkv_s = _median_time(lambda: [C.wkv7(s0, *a) for _ in range(200)], reps=3) / 200
    for _ in range(3):
        m.forward([5], st)
    _sync()
    t = time.perf_counter()
    for _ in range(10):
        m.forward([5], st)
    ms_tok = (time.perf_counter() - t) / 10 * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            m.forward([5], st)
        _sync()
    ka = prof.key_averages()
    kernels = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                   "cuLaunchKernelEx")) / 3
    ops = sum(e.count for e in ka if e.key.startswith("aten::")) / 3
    with open(os.path.join(out, "profile_eager_decode.txt"), "w") as f:
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40))
    emit(check="eager overhead", add_us=add_s * 1e6, wkv7_t1_us=wkv_s * 1e6, eager_ms_per_token=ms_tok,
         kernels_per_token=kernels, ops_per_token=ops)
    del m


def bench_ours(mname: str, path: str, ids: np.ndarray, n_dec: int, prefill_lens) -> None:
    import torch

    import rwkv_edge
    from rwkv_edge.backends import cuda as C

    prompt = [int(t) for t in ids[:16]]
    for dt in ("fp32", "fp16"):
        C.set_dtype(dt)
        base = rwkv_edge.load_model(path, backend="cuda")
        for ffn in ("dense", "sparse-lowrank-top512", "sparse-exact"):
            m = base if ffn == "dense" else base.with_ffn(
                LowRankTopK(base) if ffn == "sparse-lowrank-top512" else ExactSparse(base))
            # eager decode: the public API, greedy, logits to the host each token
            _, st0 = m.forward(prompt)

            def decode_eager(n):
                st, tok = st0, prompt[-1]
                for _ in range(n):
                    lg, st = m.forward([tok], st)
                    tok = int(np.argmax(lg))
            decode_eager(4)
            _sync()
            t = time.perf_counter()
            decode_eager(n_dec)
            eager = n_dec / (time.perf_counter() - t)
            graph = None
            if ffn != "sparse-exact":                     # the exact set needs a host sync: not capturable
                g = C.CudaGraphStep(m)

                def decode_graph(n):
                    g.reset(st0)
                    tok = prompt[-1]
                    for _ in range(n):
                        tok = int(g.step(tok).argmax())
                decode_graph(4)
                t = time.perf_counter()
                decode_graph(n_dec)
                graph = n_dec / (time.perf_counter() - t)
                del g
            emit(check="decode", impl="rwkv-edge cuda", model=mname, dtype=dt, ffn=ffn,
                 eager_tok_s=eager, graph_tok_s=graph, tokens=n_dec)
            for L in prefill_lens:
                toks = [int(t) for t in ids[:L]]
                try:
                    sec = _median_time(lambda: m.forward(toks), reps=3, warm=1)
                    emit(check="prefill", impl="rwkv-edge cuda", model=mname, dtype=dt, ffn=ffn, tokens=L,
                         tok_s=L / sec, ms=sec * 1e3)
                except torch.cuda.OutOfMemoryError as e:
                    emit(check="prefill", impl="rwkv-edge cuda", model=mname, dtype=dt, ffn=ffn, tokens=L,
                         error=str(e)[:100])
                torch.cuda.empty_cache()
        del base
        torch.cuda.empty_cache()
    C.set_dtype("fp32")
