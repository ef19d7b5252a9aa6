"""The optional native CPU backend (csrc/, loaded with ctypes by rwkv_edge/backends/native.py).

Everything else about the package is in pyproject.toml. The extension is optional: without a C
compiler `pip install` still succeeds and `--backend native` reports itself unavailable. It is built
for the baseline of the target architecture (no -march): the AVX2 / AVX-512 VNNI kernels carry
function target attributes and are chosen at run time by cpuid, so a wheel runs on any x86-64."""
import sys

from setuptools import Extension, setup

if sys.platform == "win32":
    args, libs = ["/O2"], []
else:
    # -fno-wrapv: Python's own CFLAGS carry -fwrapv, which kept GCC from some loop transforms in the kernels
    # (a 1.5B-shape decode at 1 thread 2-5% slower than the same sources built without it; tools/thread_scaling.py
    # --lib/--base-lib, one process). The kernels never rely on signed overflow wrapping.
    args, libs = ["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math", "-pthread", "-fno-wrapv"], ["pthread", "m"]

setup(ext_modules=[Extension(
    "rwkv_edge.backends._nk",
    # nk_pool.c last: its code no longer shifts the kernels' hot loops (a pool-only change had moved
    # them and cost 1 thread 4-8% at 1.5B shapes, replayed sets; the same pool linked last: none)
    sources=["csrc/nk_module.c", "csrc/nk_kernels.c", "csrc/nk_rwkv7.c", "csrc/nk_ffn.c",
             "csrc/nk_q4.c", "csrc/nk_pred.c", "csrc/nk_prefill.c", "csrc/nk_prefill_kernels.c",
             "csrc/nk_prefill_elem.c", "csrc/nk_dense.c", "csrc/nk_head.c", "csrc/nk_lora.c", "csrc/nk_pool.c"],
    depends=["csrc/nk.h", "csrc/nk_pool.h", "csrc/nk_model.h", "csrc/nk_simd.h", "csrc/nk_pred_sel2.h"],
    extra_compile_args=args, extra_link_args=["-pthread"] if sys.platform != "win32" else [], libraries=libs,
    optional=True)])
