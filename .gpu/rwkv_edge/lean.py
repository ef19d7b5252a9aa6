"""Keep the numba runtime's footprint out of the model's memory: load the kernels before the weights,
then give LLVM's code pages back.

numba loads each cached kernel through LLVM on its first call in a process. That touches ~65 MiB of
libllvmlite.so's machine code (file-backed, clean) that no decode step runs afterwards; on top of the
mapped weights it is most of the gap to llama.cpp's footprint. `warm_kernels(dtype)` runs a tiny
model of the same storage dtype (dense decode, short and long prefill, the sparse FFN kernels) so
every kernel the real model needs is loaded while no weight page is resident; then
`release_compiler_pages()` drops libllvmlite's text pages from this process with MADV_DONTNEED. They
are clean file pages: if LLVM runs again (a kernel not loaded yet, a new signature) they fault back
in from the page cache, nothing is lost. Only read-execute mappings are touched (never data or
relocated pages).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

_WARM: set = set()


def _code_mappings(name: str):
    """(start, end) of the r-xp mappings of files whose path contains `name`."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()
                if len(p) >= 6 and p[1] == "r-xp" and name in p[5]:
                    lo, hi = (int(x, 16) for x in p[0].split("-"))
                    yield lo, hi
    except OSError:
        return


def release_compiler_pages(names=("libllvmlite",)) -> int:
    """Drop the resident machine-code pages of LLVM (by default) from this process; returns the bytes
    of the ranges advised (0 where /proc is missing)."""
    from .residency import ADVICE, _madvise

    n = 0
    for name in names:
        for lo, hi in _code_mappings(name):
            _madvise(lo, hi - lo, ADVICE["dontneed"])
            n += hi - lo
    return n


def warm_kernels(dtype: str = "int8", sparse: bool = True) -> None:
    """Load (from numba's cache, or compile) the kernels a model file of `dtype` runs: dense decode,
    prefill (mat-vec and BLAS paths), or with `sparse` the same through the fused predictor + sparse
    FFN path of a 2-bit quantized bundle instead of the dense FFN, on a tiny random model written to a temporary file. Kernels of other
    paths still load on first use (then LLVM's pages come back for that moment). Once per process."""
    if (dtype, sparse) in _WARM:
        return
    from .config import ModelConfig
    from .modelfile import load_modelfile
    from .synthetic import write_synthetic

    cfg = ModelConfig("x070", 2, 64, 64, 128, 32)
    with tempfile.TemporaryDirectory(prefix="rwkv-edge-warm-") as d:
        path = write_synthetic(os.path.join(d, "warm.rwkve"), cfg, dtype, lora=dict(w=32, a=32, v=32, g=32))
        m = load_modelfile(path)
        if sparse:      # only the sparse model's kernels: a dense block kernel would be one more LLVM library
            m = _quantized_sparse(m)
        _, st = m.forward([1, 2, 3])            # prefill, mat-vec path (T <= SMALL_T)
        _, st = m.step(4, st)                   # the fused block kernel
        m.forward(list(range(16)), st)          # prefill, BLAS path
        del m
    _WARM.add((dtype, sparse))


def _quantized_sparse(m):
    """`m` with a 2-bit quantized threshold bundle (the common one): its fused predictor + sparse FFN
    kernels are the ones a sparse model file runs."""
    from rwkv_edge.predictors.quantized import QuantizedPredictor
    from .sparse import SparseFFN

    layers = []
    for b in m.blocks:
        p = QuantizedPredictor.fit(np.asarray(b.ffn_key, np.float32), 2, 64)
        p.calib.threshold = 0.0
        layers.append(p)

    class _Bundle:
        predictors = layers

        def predict_indices(self, layer, x):
            return layers[layer].indices(x)

    return m.with_ffn(SparseFFN(m, _Bundle()))
