"""tools/gpu_check.py's `rwkv` package runs (its CUDA kernels built in the background, then decode,
prefill and logits against numpy in a child process) and the summary table of a run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np

from gpu_check_common import RESULTS, emit


# --- the rwkv package -------------------------------------------------------------------------
_PKG = textwrap.dedent('''
    import json, os, sys, time
    import numpy as np, torch
    from rwkv.model import RWKV
    path, strategy, ids_file, n_dec, lens, ref_file = sys.argv[1:7]
    ids = np.load(ids_file).tolist(); n_dec = int(n_dec); lens = [int(x) for x in lens.split(",")]
    m = RWKV(model=path[:-len(".pth")], strategy=strategy)
    prompt, steps = ids[:32], ids[32:35]
    out, st = m.forward(prompt, None)
    lg = [out.float().cpu().numpy()]
    for t in steps:
        out, st = m.forward([t], st); lg.append(out.float().cpu().numpy())
    res = {}
    if os.path.exists(ref_file):
        ref = np.load(ref_file); d = np.abs(np.stack(lg) - ref)
        res.update(max_abs_vs_numpy=float(d.max()), rel_max=float(d.max() / np.abs(ref).max()),
                   argmax_agree=float(np.mean(np.stack(lg).argmax(-1) == ref.argmax(-1))))
    out, st0 = m.forward(ids[:16], None)
    def dec(n):
        st = [s.clone() for s in st0]; tok = ids[15]
        for _ in range(n):
            out, st = m.forward([tok], st); tok = int(out.argmax())
    dec(4); torch.cuda.synchronize()
    t = time.perf_counter(); dec(n_dec); res["decode_tok_s"] = n_dec / (time.perf_counter() - t)
    for L in lens:
        m.forward(ids[:L], None); torch.cuda.synchronize()
        ts = []
        for _ in range(2 if L > 1024 else 3):
            t = time.perf_counter(); out, _ = m.forward(ids[:L], None); out.float().cpu(); ts.append(time.perf_counter() - t)
        res[f"prefill{L}_tok_s"] = L / float(np.median(ts))
    print("PKGRESULT " + json.dumps(res))
''')


def start_pkg_build(out: str, work: str):
    """Build the package's CUDA kernels (ninja + nvcc JIT) in the background; returns the Popen."""
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1", RWKV_JIT_ON="1", MAX_JOBS="4",
               TORCH_EXTENSIONS_DIR=os.path.join(work, "torch_ext"))
    log = open(os.path.join(out, "rwkv_cuda_build.log"), "w")
    return subprocess.Popen([sys.executable, "-c", "import rwkv.model; print('RWKV CUDA BUILD OK')"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)


def bench_pkg(models: dict, refs: dict, ids_file: str, work: str, out: str, cuda_on: bool, n_dec: int, lens) -> None:
    script = os.path.join(work, "pkg_bench.py")
    with open(script, "w") as f:
        f.write(_PKG)
    for mname, path in models.items():
        ref_file = os.path.join(work, f"ref_{mname}.npy")
        if mname in refs:
            np.save(ref_file, refs[mname])
        for strategy in ("cuda fp16",):
            env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="1" if cuda_on else "0", RWKV_JIT_ON="1",
                       TORCH_EXTENSIONS_DIR=os.path.join(work, "torch_ext"))
            t = time.time()
            r = subprocess.run([sys.executable, script, path, strategy, ids_file, str(n_dec),
                                ",".join(str(x) for x in lens), ref_file],
                               env=env, capture_output=True, text=True, timeout=400, cwd=work)
            with open(os.path.join(out, f"rwkv_pkg_{mname}.log"), "a") as f:
                f.write(r.stdout + r.stderr)
            res = [ln for ln in r.stdout.splitlines() if ln.startswith("PKGRESULT ")]
            if res:
                emit(check="rwkv package", model=mname, strategy=strategy, RWKV_CUDA_ON=int(cuda_on),
                     seconds=time.time() - t, **json.loads(res[-1][len("PKGRESULT "):]))
            else:
                emit(check="rwkv package", model=mname, strategy=strategy, RWKV_CUDA_ON=int(cuda_on),
                     error=(r.stderr or r.stdout)[-400:])


# --- summary ----------------------------------------------------------------------------------
def _f(v, fmt="{:.0f}"):
    return "-" if v is None else (fmt.format(v) if isinstance(v, (int, float)) else str(v))


def summary() -> None:
    print("\n==== SUMMARY ====")
    for r in RESULTS:
        if r["check"].startswith("pytest"):
            print(f"pytest tests/test_cuda.py: rc={r['rc']}  {r['summary']}")
        if r["check"] == "wkv7 best":
            print(f"wkv7 Triton scan T=4096 H=8 N=64: {r['ms']:.3f} ms (rows {r['rows']}, warps {r['warps']}, "
                  f"prefetch {r['prefetch']}, fused {r['fused']}); used for the rest of this run")
        if r["check"] == "wkv7 kernel T=4096 H=8 N=64" and not r["fused"]:
            print(f"   unfused variant rows {r['rows']} warps {r['warps']} prefetch {r['prefetch']}: {r['ms']:.3f} ms")
        if r["check"] == "eager overhead" and "add_us" in r:
            print(f"eager overhead: torch add {r['add_us']:.1f} us/op, wkv7 T=1 Triton call {r['wkv7_t1_us']:.1f} us, "
                  f"decode {r['eager_ms_per_token']:.1f} ms/token with {r['kernels_per_token']:.0f} kernels "
                  f"and {r['ops_per_token']:.0f} aten ops/token")
        if r["check"] == "wkv7 torch loop T=4096 (fallback)":
            print(f"wkv7 torch loop T=4096: {r['ms']:.1f} ms")
        if r["check"].startswith("ffn sparsity"):
            print(f"FFN zero fraction {r['model']}: {r['zero_frac']:.3f}; low-rank(128) top-512 predictor recall "
                  f"mass {r['lowrank_top512_mass_recall']:.3f} active {r['lowrank_top512_active_recall']:.3f}")
    print(f"\n{'model':<12} {'config':<28} {'max|dlogit|':>11} {'rel':>9} {'|logit|max':>10} {'argmax=':>7}")
    for r in RESULTS:
        if r["check"] == "logits GPU vs numpy":
            print(f"{r['model']:<12} {r['config']:<28} {r['max_abs']:>11.2e} {r['rel_max']:>9.2e} "
                  f"{r['logit_absmax']:>10.2f} {r['argmax_agree']:>7.2f}")
        if r["check"] == "rwkv package" and "max_abs_vs_numpy" in r:
            print(f"{r['model']:<12} {'rwkv pkg ' + r['strategy'] + ' CUDA_ON=' + str(r['RWKV_CUDA_ON']):<28} "
                  f"{r['max_abs_vs_numpy']:>11.2e} {r['rel_max']:>9.2e} {'':>10} {r['argmax_agree']:>7.2f}")
    print(f"\n{'impl':<30} {'model':<12} {'dtype':<6} {'ffn':<22} {'decode':>8} {'graph':>8} "
          f"{'pre512':>9} {'pre4096':>9}   (tokens/s)")
    pre = {}
    for r in RESULTS:
        if r["check"] == "prefill" and "tok_s" in r:
            pre[(r["impl"], r["model"], r["dtype"], r["ffn"], r["tokens"])] = r["tok_s"]
    for r in RESULTS:
        if r["check"] == "decode":
            key = (r["impl"], r["model"], r["dtype"], r["ffn"])
            print(f"{r['impl']:<30} {r['model']:<12} {r['dtype']:<6} {r['ffn']:<22} {_f(r['eager_tok_s']):>8} "
                  f"{_f(r['graph_tok_s']):>8} {_f(pre.get(key + (512,))):>9} {_f(pre.get(key + (4096,))):>9}")
        if r["check"] == "rwkv package":
            name = f"rwkv 0.8.32 {r['strategy']} CUDA_ON={r['RWKV_CUDA_ON']}"
            if "error" in r:
                print(f"{name:<30} {r['model']:<12} error: {r['error'][-200:]!r}")
            else:
                print(f"{name:<30} {r['model']:<12} {'fp16':<6} {'dense':<22} {_f(r.get('decode_tok_s')):>8} "
                      f"{'-':>8} {_f(r.get('prefill512_tok_s')):>9} {_f(r.get('prefill4096_tok_s')):>9}")
