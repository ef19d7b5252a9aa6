"""One script for the GPU machine: CUDA tests, wkv kernel sweep, GPU vs numpy logits, decode and
prefill tokens/s (dense, sparse, captured graphs) and the `rwkv` package with `cuda fp16`.

    python3 tools/gpu_check.py pack-ref --src ../shared/models/rwkv7-ref-58m.pth --dst out/gpu
        (here, no GPU) rwkv7-ref-58m does not fit the device tool's 64 MiB working-tree limit in
        fp16 (116 MB), so this writes it with the big matrices as int8 per row (+ fp32 scales) and
        every other tensor unchanged (fp16), ~56 MB; also prints the numpy logits difference of the
        dequantized model vs the original; and heldout_ids.npy (8192 token ids of held-out text).
        The `rwkv` wheel (pure Python) travels too:
        python3 -m pip download --no-deps --only-binary=:all: -d out/gpu/whl rwkv==0.8.32
    python3 tools/gpu_check.py run --out $OUT [--data out/gpu] [--quick]
        (on the GPU) every check; one JSON line per configuration, a summary table last.

Models in `run`: "rand12" = a random x070 checkpoint of the reference's shape (12 layers, D=512,
head 64, FFN 2048, vocab 16384) built on the machine with tests/checkpoints.py; "ref58m-int8" =
rwkv7-ref-58m with its int8-per-row matrices dequantized and rounded to fp16 (saved as a .pth).
Every "GPU vs numpy" number compares the two on the same model file.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_common import LOG, ROOT, _median_time, emit, pack_ref, unpack_ref  # noqa: E402,F401
from gpu_check_models import bench_ours, build_models, eager_overhead, logits_checks, sparsity_stats  # noqa: E402
from gpu_check_pkg import bench_pkg, start_pkg_build, summary  # noqa: E402


# --- checks -----------------------------------------------------------------------------------
def run_pytest(out: str) -> None:
    t = time.time()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-s", os.path.join(ROOT, "tests", "test_cuda.py")],
                       capture_output=True, text=True, cwd=ROOT)
    with open(os.path.join(out, "pytest_cuda.log"), "w") as f:
        f.write(r.stdout + r.stderr)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else r.stderr[-300:]
    for ln in lines:
        if ln.startswith("x070 ") or ln.startswith("FAILED") or "Error" in ln[:40]:
            print("   ", ln[:300])
    if r.returncode:
        print(r.stdout[-6000:])
    emit(check="pytest tests/test_cuda.py", rc=r.returncode, summary=summary, seconds=time.time() - t)


def wkv_sweep(quick: bool) -> None:

    from rwkv_edge.backends import cuda as C
    from rwkv_edge.backends import reference as R

    rng = np.random.default_rng(0)
    T, H, N = 4096, 8, 64
    r, k, v = (rng.standard_normal((T, H * N)).astype(np.float32) for _ in range(3))
    w = np.exp(-0.606531 * rng.uniform(0, 1, (T, H * N))).astype(np.float32)
    kk = rng.standard_normal((T, H, N)).astype(np.float32)
    kk /= np.linalg.norm(kk, axis=-1, keepdims=True)
    a = rng.uniform(0, 1, (T, H, N)).astype(np.float32)
    s = (rng.standard_normal((H, N, N)) * 0.5).astype(np.float32)
    args = (s, r, w, k, v, (-kk).reshape(T, -1), (kk * a).reshape(T, -1))
    y0, s0 = R.wkv7(*args)
    dev = [C._dev_f32(x) for x in args]
    shapes = [(4, 1), (4, 2), (8, 1), (8, 2), (8, 4), (16, 2), (16, 4)]
    if quick:
        shapes = [(4, 1), (8, 2), (16, 2)]
    variants = [(16, 2, False, False), (8, 2, True, False)] + [(bi, nw, True, True) for bi, nw in shapes]
    best = None
    for bi, nw, pf, fu in variants:
        y, s1 = C._scan(*dev, None, v7=True, rows=bi, warps=nw, prefetch=pf, fused=fu)
        err = max(float(np.abs(C.to_host(y) - y0).max()), float(np.abs(C.to_host(s1) - s0).max()))
        ms = 1e3 * _median_time(lambda: C._scan(*dev, None, v7=True, rows=bi, warps=nw, prefetch=pf, fused=fu),
                                reps=5)
        emit(check="wkv7 kernel T=4096 H=8 N=64", rows=bi, warps=nw, prefetch=pf, fused=fu, ms=ms, max_abs_err=err)
        if err < 1e-3 and (best is None or ms < best[0]):
            best = (ms, bi, nw, pf, fu)
    ms_t = 1e3 * _median_time(lambda: C._wkv7_torch(*dev), reps=1, warm=0)
    emit(check="wkv7 torch loop T=4096 (fallback)", ms=ms_t)
    if best:
        C.WKV_ROWS, C.WKV_WARPS, C.WKV_FUSED = best[1], best[2], best[4]
        emit(check="wkv7 best", ms=best[0], rows=best[1], warps=best[2], prefetch=best[3], fused=best[4],
             tokens_per_s_one_layer=T / best[0] * 1e3)

def run(args) -> int:
    import torch

    os.makedirs(args.out, exist_ok=True)
    work = args.work
    os.makedirs(work, exist_ok=True)
    LOG["f"] = open(os.path.join(args.out, "gpu_check.jsonl"), "w")
    t0 = time.time()
    import importlib.util
    try:
        import triton
        tv = triton.__version__
    except Exception as e:  # noqa: BLE001
        tv = f"missing ({e})"
    emit(check="env", torch=torch.__version__, cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(0),
         triton=tv, rwkv_pkg=importlib.util.find_spec("rwkv") is not None,
         tokenizers=importlib.util.find_spec("tokenizers") is not None, numpy=np.__version__)
    build = None
    if args.bench and args.pkg and importlib.util.find_spec("rwkv") is not None and args.pkg_cuda:
        build = start_pkg_build(args.out, work)
        t_build = time.time()
    if args.pytest:
        run_pytest(args.out)
    wkv_sweep(args.quick)
    ids_file = os.path.join(args.data, "heldout_ids.npy")
    ids = np.load(ids_file) if os.path.exists(ids_file) else \
        np.random.default_rng(0).integers(0, 16384, 8192).astype(np.int32)
    models = build_models(work, args.data)
    refs = logits_checks(models, ids)
    for p in models.values():
        sparsity_stats(p, ids)
    try:
        if args.bench:
            eager_overhead(models["rand12"], ids, args.out)
    except Exception as e:  # noqa: BLE001  (a diagnostic; never fail the run on it)
        emit(check="eager overhead", error=repr(e)[:300])
    cuda_on = False
    if build is not None:
        try:
            build.wait(timeout=max(1, args.build_wait - (time.time() - t_build)))
        except subprocess.TimeoutExpired:
            build.kill()
            build.wait()
        cuda_on = build.returncode == 0
        emit(check="rwkv package CUDA build", ok=cuda_on, rc=build.returncode, seconds=time.time() - t_build)
    lens = [512, 4096]
    if not args.bench:
        models = {}
    for mname, path in models.items():
        bench_ours(mname, path, ids, args.decode_tokens, lens)
    if args.pkg and args.bench and importlib.util.find_spec("rwkv") is not None:
        bench_pkg(models, refs, ids_file, work, args.out, cuda_on, args.decode_tokens, lens)
        if cuda_on and args.pkg_both:
            bench_pkg(models, refs, ids_file, work, args.out, False, args.decode_tokens, lens)
    emit(check="total", seconds=time.time() - t0)
    summary()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack-ref")
    p.add_argument("--src", default=os.path.join(ROOT, "..", "shared", "models", "rwkv7-ref-58m.pth"))
    p.add_argument("--dst", default=os.path.join(ROOT, "out", "gpu"))
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--data", default=os.path.join(ROOT, "out", "gpu"))
    r.add_argument("--work", default="/tmp/gpu_check")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--no-pytest", dest="pytest", action="store_false")
    r.add_argument("--no-pkg", dest="pkg", action="store_false")
    r.add_argument("--no-pkg-cuda", dest="pkg_cuda", action="store_false")
    r.add_argument("--no-bench", dest="bench", action="store_false", help="checks only, no timings")
    r.add_argument("--pkg-both", action="store_true", help="also run the package with RWKV_CUDA_ON=0")
    r.add_argument("--build-wait", type=float, default=240.0)
    r.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    if args.cmd == "pack-ref":
        pack_ref(args.src, args.dst)
        return 0
    return run(args)


if __name__ == "__main__":
    from rwkv_edge.errors import run_main  # bad input: one line, exit 2 (as every tool)
    sys.exit(run_main("gpu_check.py", main))
