"""Batch-1 GPU decode at one model size: the `rwkv` package (cuda fp16, its CUDA kernels on) against
our fused decode (rwkv_edge/backends/cuda_decode.py) dense, exact-sparse and predicted-sparse, each
with the CUDA graph on and off, and the generic captured step (CudaGraphStep) as today's baseline.

    python3 tools/gpu_decode_bench.py --model M.pth --out DIR [--calib-ids ids.npy] [--tokens 256]
    python3 tools/gpu_decode_bench.py --shape 24,2048,8192,65536 --density 0.13 --out DIR

--shape L,D,F,V builds a random fp16 RWKV-7 checkpoint of those shapes (official LoRA sizes) whose
FFN active density is set near --density (see `make_shaped`). A 2-bit quantized-W_k predictor bundle
(group 64, threshold at 0.99 recall of activation mass) is fitted on the GPU from --calib tokens.
Every row runs in its own process (its own peak RSS and GPU memory) and prints one JSON line: decode
tok/s (median of --rounds runs of --tokens tokens), prefill tok/s (--prefill-tokens), GPU memory
(max allocated), host peak RSS (VmHWM), weight bytes per token, % of the HBM roofs (4.8 TB/s
datasheet and the device-to-device copy bandwidth measured here), measured FFN densities and the
max logit difference of the fused step against the generic (dense) CUDA path on the same token.
Prefill always runs the generic dense path (exact sparsity is lossless; predicted prefill is not
what this measures).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

DATASHEET_BW = 4.8e12


def _lora(D):
    """The official RWKV-7 LoRA widths for n_embd D (w, a, v, g)."""
    r = lambda f, p: max(32, int(round(f * D ** p / 32) * 32))  # noqa: E731
    return r(1.8, 0.5), r(1.8, 0.5), r(1.3, 0.5), r(0.6, 0.8)


def make_shaped(path, L, D, F, V, density, N=64, seed=0, device="cuda"):
    """A random fp16 x070 checkpoint (keys as tests/checkpoints.py) whose FFN density is ~density:
    ln2 of every layer outputs the constant B in dim 0 (weight 0, bias B), and W_k[j, 0] = -c_j with
    c_j B = z ||W_k[j, 1:]|| 0.816 (0.816: the rms of a token-shift mix of two unit-rms inputs), so
    relu(W_k xk) > 0 for about a fraction `density` of the neurons (z = the normal quantile).
    device: where the random tensors are drawn ("cpu" for the ONNX Runtime size runs)."""
    import torch
    from statistics import NormalDist

    g = torch.Generator(device=device).manual_seed(seed)
    nrm = lambda *s, scale=0.1: torch.randn(s, generator=g, device=device) * scale  # noqa: E731
    uni = lambda lo, hi, *s: torch.rand(s, generator=g, device=device) * (hi - lo) + lo  # noqa: E731
    H, (lw, la, lv, lg) = D // N, _lora(D)
    z, B = NormalDist().inv_cdf(1 - density), 4.0
    sd = {"emb.weight": nrm(V, D), "head.weight": nrm(V, D), "ln_out.weight": 1 + nrm(D), "ln_out.bias": nrm(D)}
    for i in range(L):
        p, a, f = f"blocks.{i}.", f"blocks.{i}.att.", f"blocks.{i}.ffn."
        sd.update({p + "ln1.weight": 1 + nrm(D), p + "ln1.bias": nrm(D), p + "ln2.weight": 1 + nrm(D),
                   p + "ln2.bias": nrm(D)})
        sd[p + "ln2.weight"][0], sd[p + "ln2.bias"][0] = 0.0, B
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = 1 + nrm(D), nrm(D)
        for c in "rwkvag":
            sd[a + f"x_{c}"] = uni(0, 1, 1, 1, D)
        sd.update({a + "w0": nrm(1, 1, D, scale=2.0) - 2.5, a + "w1": nrm(D, lw), a + "w2": nrm(lw, D),
                   a + "a0": nrm(1, 1, D, scale=0.3) - 0.2, a + "a1": nrm(D, la), a + "a2": nrm(la, D),
                   a + "g1": nrm(D, lg), a + "g2": nrm(lg, D), a + "k_k": uni(0.5, 1, 1, 1, D),
                   a + "k_a": 1 + nrm(1, 1, D), a + "r_k": nrm(H, N, scale=0.3),
                   a + "ln_x.weight": 1 + nrm(D), a + "ln_x.bias": nrm(D), f + "x_k": uni(0, 1, 1, 1, D)})
        if i > 0:
            sd.update({a + "v0": nrm(1, 1, D, scale=0.3) + 0.5, a + "v1": nrm(D, lv), a + "v2": nrm(lv, D)})
        for m in ("receptance", "key", "value", "output"):
            sd[a + f"{m}.weight"] = nrm(D, D)
        k = nrm(F, D)
        k[:, 0] = -z * 0.816 * k[:, 1:].norm(dim=1) / B
        sd[f + "key.weight"], sd[f + "value.weight"] = k, nrm(D, F)
    sd = {n: t.to(torch.float16).cpu() for n, t in sorted(sd.items())}
    torch.save(sd, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def fit_bundle(model_path, out, tokens, bits=2, target=0.99):
    """A quantized-W_k threshold bundle fitted on the FFN inputs of `tokens` (run on the GPU)."""
    import torch

    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    from rwkv_edge.runtime import open_model

    m = open_model(model_path, device="cuda", dtype="fp16")
    xs = {}
    m.hooks.ffn_input.append(lambda i, xk: xs.__setitem__(i, xk.detach().clone()))
    m.forward(tokens)
    preds = []
    for i, b in enumerate(m.blocks):
        wk = b.ffn_key.float()
        act = torch.relu(xs[i] @ wk.t()).square().cpu().numpy()
        p = QuantizedPredictor.fit(wk.cpu().numpy(), bits, 64)
        p.calibrate(xs[i].cpu().numpy(), act, target, "mass")
        p.qm.clear_cache() if hasattr(p.qm, "clear_cache") else None
        preds.append(p)
    PredictorBundle(preds, m.fingerprint, m.config, "quantized", bits=bits, target=target).save(out)
    return out


def _rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _timed(fn, n, rounds):
    import torch
    rates = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(n)
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t))
    return float(np.median(rates))


def run_row(cfg) -> dict:
    import torch

    V = cfg["vocab"]
    rng = np.random.default_rng(2)
    toks = [int(t) for t in rng.integers(1, V, cfg["tokens"])]
    long = [int(t) for t in rng.integers(1, V, cfg["prefill_tokens"])]
    out = {"row": cfg["name"], "model": cfg["label"]}
    t0 = time.perf_counter()
    if cfg["impl"] == "rwkv":
        os.environ.update(RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="1")
        from rwkv.model import RWKV
        m = RWKV(model=cfg["model"][:-4], strategy="cuda fp16")
        out["load_s"] = round(time.perf_counter() - t0, 1)
        _, st = m.forward(long[:16], None)

        def dec(n, st=st):
            s = [x.clone() for x in st]
            for t in toks[:n]:
                _, s = m.forward([t], s)
        dec(8)
        out["decode_tok_s"] = round(_timed(dec, len(toks), cfg["rounds"]), 1)
        out["prefill_tok_s"] = round(_timed(lambda n: m.forward(long, None), len(long), 2), 1)
        try:  # the package's own wkv7 CUDA kernel was built and loaded (RWKV_CUDA_ON=1)
            torch.ops.wkv7s.forward_fp16
            out["rwkv_cuda_kernels"] = True
        except (AttributeError, RuntimeError):
            out["rwkv_cuda_kernels"] = False
    else:
        from rwkv_edge.runtime import open_model
        m = open_model(cfg["model"], device="cuda", dtype="fp16")    # prefill: the dense (lossless) path
        out["load_s"] = round(time.perf_counter() - t0, 1)
        _, st = m.forward(long[:16])
        if cfg["impl"] == "generic":
            g = m.ops.CudaGraphStep(m)
        else:
            from rwkv_edge.backends.cuda_decode import FusedDecode
            from rwkv_edge.predictors.bundle import PredictorBundle
            ref = [np.asarray(m.step(t, st)[0]) for t in toks[:1]]          # the generic path's logits
            bundle = PredictorBundle.load(cfg["bundle"], model=m) if cfg["mode"] == "predicted" else None
            g = FusedDecode(m, mode=cfg["mode"], bundle=bundle, graph=cfg["graph"], tune=cfg.get("tune"))
            g.reset(st)
            out["max_logit_diff_vs_generic"] = float(np.abs(g.step(toks[0]).cpu().numpy() - ref[0]).max())

        def dec(n):
            g.reset(st)
            for t in toks[:n]:
                g.step(t)
        dec(8)
        out["decode_tok_s"] = round(_timed(dec, len(toks), cfg["rounds"]), 1)
        if cfg["impl"] == "fused":
            out.update(g.stats())
            out["weight_bytes_per_token"] = g.bytes_per_token()
        out["prefill_tok_s"] = round(_timed(lambda n: m.forward(long), len(long), 2), 1)
    out["gpu_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    out["host_peak_rss_mib"] = _rss_mib()
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (median of 10 after warm-up)."""
    import torch
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ts = []
    for i in range(13):
        torch.cuda.synchronize()
        t = time.perf_counter()
        b.copy_(a)
        torch.cuda.synchronize()
        if i >= 3:
            ts.append(time.perf_counter() - t)
    return 2 * a.numel() / float(np.median(ts))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--shape", help="L,D,F,V: build a random fp16 checkpoint of these shapes")
    ap.add_argument("--density", type=float, default=0.13)
    ap.add_argument("--calib-ids", help=".npy of token ids for fitting the predictor (else random ids)")
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--rows", default="rwkv,generic,dense,exact,predicted")
    ap.add_argument("--no-eager", action="store_true", help="skip the graph-off rows")
    ap.add_argument("--out")
    ap.add_argument("--tune", type=json.loads, default=None, help="JSON overrides of cuda_decode.TUNE")
    ap.add_argument("--reuse", action="store_true", help="keep a --shape checkpoint and bundle already in --out")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_row(json.loads(args.one))), flush=True)
        return 0
    if not args.out or not (args.model or args.shape):
        ap.error("--out and one of --model / --shape are required")
    import torch
    os.makedirs(args.out, exist_ok=True)
    if args.shape:
        L, D, F, V = (int(v) for v in args.shape.split(","))
        label = f"random {L}x{D} F{F} V{V} (density {args.density})"
        args.model = os.path.join(args.out, f"shape_{L}x{D}.pth")
        t = time.perf_counter()
        if not (args.reuse and os.path.exists(args.model)):
            make_shaped(args.model, L, D, F, V, args.density)
        print(f"# built {args.model} ({os.path.getsize(args.model) / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s",
              flush=True)
    else:
        label = os.path.basename(args.model)
    from rwkv_edge.weights import _read_torch_state_dict
    V = _read_torch_state_dict(args.model)["emb.weight"].shape[0]
    file_mib = os.path.getsize(args.model) / 2**20
    bw = copy_bandwidth()
    torch.cuda.empty_cache()
    rows = args.rows.split(",")
    bundle = None
    if "predicted" in rows:
        ids = np.load(args.calib_ids)[: args.calib] if args.calib_ids else \
            np.random.default_rng(5).integers(1, V, args.calib)
        t = time.perf_counter()
        bundle = os.path.join(args.out, "bundle.npz")
        if not (args.reuse and os.path.exists(bundle)):
            fit_bundle(args.model, bundle, [int(v) for v in ids])
        print(f"# fitted the 2-bit predictor bundle in {time.perf_counter() - t:.0f}s", flush=True)
    print(json.dumps({"model": label, "file_mib": round(file_mib, 1), "copy_bw_TBps": round(bw / 1e12, 2)}), flush=True)
    base = dict(model=args.model, label=label, vocab=V, tokens=args.tokens, rounds=args.rounds,
                prefill_tokens=args.prefill_tokens, bundle=bundle, tune=args.tune)
    cfgs = []
    for r in rows:
        if r in ("rwkv", "generic"):
            cfgs.append(dict(base, name={"rwkv": "rwkv cuda fp16", "generic": "ours generic graph"}[r], impl=r))
            continue
        for graph in ([True] if args.no_eager else [True, False]):
            cfgs.append(dict(base, name=f"ours {r}" + ("" if graph else " (no graph)"), impl="fused", mode=r,
                             graph=graph))
    results = []
    with open(os.path.join(args.out, "rows.jsonl"), "a") as log:
        for cfg in cfgs:
            p = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
                               capture_output=True, text=True)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            res = json.loads(lines[-1]) if p.returncode == 0 and lines else \
                {"row": cfg["name"], "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
            if "weight_bytes_per_token" in res:
                used = res["weight_bytes_per_token"] * res["decode_tok_s"]
                res["pct_roof_4.8TBps"] = round(100 * used / DATASHEET_BW, 1)
                res["pct_roof_copy_bw"] = round(100 * used / bw, 1)
            res["rss_over_file"] = round(res.get("host_peak_rss_mib", math.nan) / file_mib, 2)
            results.append(res)
            print(json.dumps(res), flush=True)
            log.write(json.dumps(res) + "\n")
    print(f"\n| {label} | decode tok/s | prefill tok/s | GPU MiB | host RSS MiB (x file) | % roof 4.8 / copy | density read/active |")
    for r in results:
        print(f"| {r['row']} | {r.get('decode_tok_s', r.get('error'))} | {r.get('prefill_tok_s', '')} | "
              f"{r.get('gpu_mem_mib', '')} | {r.get('host_peak_rss_mib', '')} ({r['rss_over_file']}) | "
              f"{r.get('pct_roof_4.8TBps', '')} / {r.get('pct_roof_copy_bw', '')} | "
              f"{r.get('read_density', '')}/{r.get('active_density', '')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
