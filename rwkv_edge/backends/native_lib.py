"""The native backend's C library (the optional extension `rwkv_edge.backends._nk`, csrc/), loaded with
ctypes: which kernel set runs ("generic" plain C, "avx2", "vnni" = AVX-512 VNNI; the best this CPU has
unless forced), and the single-kernel entry points the tests compare with numpy (kernel_*). The model
itself is backends/native.py; these names are re-exported there.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

_LIB: list = []
_LEVEL: dict = {"forced": None}
_LEVELS = ("generic", "avx2", "vnni")


def _load():
    """(ctypes library or None, why not)."""
    if not _LIB:
        lib, why = None, None
        spec = importlib.util.find_spec("rwkv_edge.backends._nk")
        if spec is None or not spec.origin or not os.path.exists(spec.origin):
            why = "the native extension was not built (pip install needs a C compiler for it)"
        else:
            try:
                lib = bind_library(spec.origin)
                P, i64 = ctypes.c_void_p, ctypes.c_int64
                lib.nk_level_name.restype = ctypes.c_char_p
                lib.nk_level_name.argtypes = [ctypes.c_int]
                lib.nk_test_dots.argtypes = [ctypes.c_int, P, i64, i64, P, i64, P]
                lib.nk_test_pred.argtypes = [ctypes.c_int, i64, i64, i64, i64, P, P, P, P, P]
                lib.nk_test_pred_sel.restype = ctypes.c_int
                lib.nk_test_pred_sel.argtypes = [ctypes.c_int, ctypes.c_int, i64, i64, i64, i64, P, P, P, P,
                                                 ctypes.c_float, P, i64, P, P, P]
                lib.nk_test_dots4.argtypes = [ctypes.c_int, P, P, i64, i64, P, i64, P]
                lib.nk_test_vecmatp.argtypes = [ctypes.c_int, P, i64, i64, P, P]
                lib.nk_test_pred_prep.argtypes = [ctypes.c_int, i64, i64, i64, P, P, P, P, P, P]
                lib.nk_test_axpy4q.argtypes = [ctypes.c_int, P, P, P, i64, i64, P]
                lib.nk_test_top_rows.restype = i64
                lib.nk_test_top_rows.argtypes = [ctypes.c_int, P, i64, i64, P]
            except (OSError, AttributeError) as e:
                lib, why = None, f"the native extension does not load ({e})"
        _LIB.append((lib, why))
    return _LIB[0]


def bind_library(path: str):
    """Another build of this extension (a .so/.dll path) with the entry points a forward needs bound, for
    `NativeRWKV7.with_library` (tools/native_ab.py times two builds in one process)."""
    lib = ctypes.CDLL(os.path.abspath(path))
    P, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.nk_model_new.restype = P
    lib.nk_model_new.argtypes = [P, P, P, P]
    lib.nk_model_free.argtypes = [P]
    lib.nk_forward.restype = ctypes.c_int
    lib.nk_forward.argtypes = [P, P, i64, P, P, P, P, i64, P, P, P, P, P]
    if hasattr(lib, "nk_model_lora_packed"):    # builds before the prefill read the packed LoRAs lack it
        lib.nk_model_lora_packed.restype = ctypes.c_int
        lib.nk_model_lora_packed.argtypes = [P, i64, ctypes.c_int]
    if hasattr(lib, "nk_model_dense"):          # builds before the every-row dense FFN lack it
        lib.nk_model_dense.restype = ctypes.c_int
        lib.nk_model_dense.argtypes = [P, ctypes.c_int]
        lib.nk_model_all_keys.argtypes = [P, ctypes.c_int]
    return lib


def available() -> tuple[bool, str | None]:
    """(True, None) when the C library loads here, else (False, why not)."""
    lib, why = _load()
    return lib is not None, why


def level() -> str:
    """The kernel set in use: "vnni", "avx2" or "generic" (the best this CPU runs unless forced)."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return _LEVELS[_level_index(lib)]


def _level_index(lib) -> int:
    best = int(lib.nk_best_level())
    forced = _LEVEL["forced"]
    return best if forced is None else min(best, forced)


def set_level(lv: str | None) -> None:
    """Force a kernel set ("generic", "avx2", "vnni"; None: the best). Models opened afterwards use it
    (tests compare the SIMD kernels against the plain C ones)."""
    _LEVEL["forced"] = None if lv is None else _LEVELS.index(lv)


def _ptr(a) -> int:
    return 0 if a is None else a.ctypes.data


def levels() -> list[str]:
    """The kernel sets this CPU runs, plainest first."""
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return list(_LEVELS[:int(lib.nk_best_level()) + 1])


def kernel_dots(W: np.ndarray, x: np.ndarray, lv: str) -> np.ndarray:
    """(T, n) unscaled integer dots of int8 rows W (n, I) with x (T, I) rounded to int8 per 32, by the
    kernel set lv (for tests)."""
    lib = _load()[0]
    W, x = np.ascontiguousarray(W, np.int8), np.ascontiguousarray(np.atleast_2d(x), np.float32)
    y = np.empty((x.shape[0], W.shape[0]), np.float32)
    if lib.nk_test_dots(_LEVELS.index(lv), W.ctypes.data, W.shape[0], W.shape[1], x.ctypes.data, x.shape[0],
                        y.ctypes.data) != 0:
        raise ValueError("kernel_dots: unsupported shape or level")
    return y


def kernel_pred_prep(x: np.ndarray, bits: int, G: int, lv: str) -> dict:
    """The predictor's view of x (C,) (nk_pred_prep: xq, xs, e, xsum per group, code planes (4, C)) by lv's
    prep (for tests)."""
    lib = _load()[0]
    x = np.ascontiguousarray(x, np.float32)
    C = x.shape[0]
    out = dict(xq=np.zeros(C, np.int8), xs=np.zeros(G, np.float32), e=np.zeros(G, np.float32),
               xsum=np.zeros(G, np.float32), planes=np.zeros((4, C), np.int8))
    if lib.nk_test_pred_prep(_LEVELS.index(lv), bits, G, C, x.ctypes.data, *(out[k].ctypes.data for k in
                                                                            ("xq", "xs", "e", "xsum", "planes"))):
        raise ValueError("kernel_pred_prep: unsupported shape or level")
    return out


def kernel_lora(M: np.ndarray, x: np.ndarray, lv: str):
    """(O,) = x (I,) @ M (I, O) int8 by lv's packed LoRA kernel (csrc/nk_lora.c; for tests), or None where
    the level has none."""
    lib = _load()[0]
    M, x = np.ascontiguousarray(M, np.int8), np.ascontiguousarray(x, np.float32)
    y = np.empty(M.shape[1], np.float32)
    if lib.nk_test_vecmatp(_LEVELS.index(lv), M.ctypes.data, M.shape[0], M.shape[1], x.ctypes.data, y.ctypes.data):
        return None
    return y


def kernel_dots4(packed: np.ndarray, scale: np.ndarray, x: np.ndarray, lv: str) -> np.ndarray:
    """(T, n) dots of int4 rows (quant.q4 layout: packed uint8 (n, I/2), scale float16 (n, I/32)) with x
    (T, I) rounded to int8 per 32, scales applied, by the kernel set lv (for tests)."""
    lib = _load()[0]
    packed = np.ascontiguousarray(packed, np.uint8)
    sc = np.ascontiguousarray(scale, np.float16).view(np.uint16)
    x = np.ascontiguousarray(np.atleast_2d(x), np.float32)
    y = np.empty((x.shape[0], packed.shape[0]), np.float32)
    if lib.nk_test_dots4(_LEVELS.index(lv), packed.ctypes.data, sc.ctypes.data, packed.shape[0], x.shape[1],
                         x.ctypes.data, x.shape[0], y.ctypes.data) != 0:
        raise ValueError("kernel_dots4: unsupported shape or level")
    return y


def kernel_axpy4(packed: np.ndarray, scale: np.ndarray, h: np.ndarray, out: np.ndarray, lv: str) -> np.ndarray:
    """out (D,) += h @ V_hat for int4 value columns (packed (n, D/2), scale (n, D/32)), by lv (for tests);
    lv "vnni512": the 512-bit twin the decode and prefill run (None where the CPU lacks it)."""
    lib = _load()[0]
    packed = np.ascontiguousarray(packed, np.uint8)
    sc = np.ascontiguousarray(scale, np.float16).view(np.uint16)
    h = np.ascontiguousarray(h, np.float32)
    out = np.ascontiguousarray(out, np.float32).copy()
    wide = lv == "vnni512"
    if lib.nk_test_axpy4q(3 if wide else _LEVELS.index(lv), packed.ctypes.data, sc.ctypes.data, h.ctypes.data,
                          packed.shape[0], out.shape[0], out.ctypes.data) != 0:
        if wide:
            return None
        raise ValueError("kernel_axpy4: unsupported shape or level")
    return out


def kernel_pred(qm, x: np.ndarray, lv: str) -> np.ndarray:
    """(R,) predictor scores of a quant.QuantizedMatrix for x (C,) by the kernel set lv (for tests)."""
    lib = _load()[0]
    packed = np.ascontiguousarray(qm.packed)
    sc, ze = (np.ascontiguousarray(a).view(np.uint16) for a in (qm.scale, qm.zero))
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    out = np.empty(qm.shape[0], np.float32)
    if lib.nk_test_pred(_LEVELS.index(lv), qm.bits, qm.n_groups, qm.shape[0], qm.shape[1], packed.ctypes.data,
                        sc.ctypes.data, ze.ctypes.data, x.ctypes.data, out.ctypes.data) != 0:
        raise ValueError("kernel_pred: unsupported level")
    return out


def kernel_pred_select(qm, x: np.ndarray, thr: float, lv: str, idx=None, fused: int = 0):
    """(scores, selected) of a quant.QuantizedMatrix for x (C,) by the kernel set lv (for tests): the scores
    of the rows idx (None: all) by lv's score kernel, or with fused 1 by the fused select's own kernel (2: its
    copy without GFNI; 3 / 4: the same on its blocked copy of the predictor, which the decode's pass over all rows
    reads; None where lv has none for this predictor), and the positions in idx (or rows) that the select keeps
    (score >= thr, ascending), as the sparse decode and prefill run it."""
    lib = _load()[0]
    packed = np.ascontiguousarray(qm.packed)
    sc, ze = (np.ascontiguousarray(a).view(np.uint16) for a in (qm.scale, qm.zero))
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    ix = None if idx is None else np.ascontiguousarray(idx, np.int32)
    n = qm.shape[0] if ix is None else ix.size
    score, sel, nsel = np.empty(n, np.float32), np.empty(n, np.int32), np.zeros(1, np.int64)
    rc = lib.nk_test_pred_sel(_LEVELS.index(lv), int(fused), qm.bits, qm.n_groups, qm.shape[0], qm.shape[1],
                              packed.ctypes.data, sc.ctypes.data, ze.ctypes.data, x.ctypes.data, float(thr),
                              _ptr(ix), n, score.ctypes.data, sel.ctypes.data, nsel.ctypes.data)
    if rc == -2:
        return None
    if rc != 0:
        raise ValueError("kernel_pred_select: unsupported level")
    return score, sel[:int(nsel[0])]


def kernel_top_rows(z: np.ndarray, k: int, fast: bool):
    """The rows of z (V,) the rescored head recomputes (csrc/nk_head.c's top_rows), by its 16-lane select
    (fast) or its C one (for tests); None where the 16-lane one does not run (no AVX-512, V % 16, k >= V)."""
    lib = _load()[0]
    z = np.ascontiguousarray(z, np.float32).reshape(-1)
    idx = np.empty(max(k, 1), np.int32)
    n = lib.nk_test_top_rows(int(fast), z.ctypes.data, z.size, int(k), idx.ctypes.data)
    return None if n < 0 else idx[:n]
