"""Read official BlinkDL `.pth` checkpoints into float32 numpy arrays, with one-line errors."""
from __future__ import annotations

import os
import pickle
import zipfile
from typing import Dict

import numpy as np

from .config import ModelConfig, ModelLoadError, infer_config


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:200]


def _blocked_global(e: BaseException) -> str:
    """torch's 'Unsupported global: GLOBAL x.y' line of a weights-only refusal (not its advice)."""
    for line in str(e).splitlines():
        if "global" in line.lower() and "weights_only" not in line:
            return line.strip()[:200]
    return "non-tensor objects"


def check_finite(weights: Dict[str, np.ndarray], source: str) -> None:
    """ModelLoadError naming the first tensor holding NaN or inf (one pass over float32 weights:
    ~20 ms per 10M parameters; done once at load or convert, never per token)."""
    for k, v in weights.items():
        a = np.asarray(v)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int(a.size - np.isfinite(a).sum())
            raise ModelLoadError(f"{source}: tensor '{k}' holds {bad} NaN/inf value(s); the checkpoint is damaged "
                                 f"(or overflowed when saved in half precision)")


def _read_torch_state_dict(path: str) -> dict:
    import torch  # lazy: torch is only needed to read .pth files

    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, expected a .pth checkpoint file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK":
        raise ModelLoadError(f"{path}: not a PyTorch checkpoint (expected a zip-based .pth file)")
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: truncated or corrupt checkpoint (zip directory unreadable)")
    try:
        sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            # the file pickles Python objects besides tensors: loading them could run its code
            raise ModelLoadError(f"{path}: refused as unsafe: the checkpoint holds Python objects other than "
                                 f"tensors, which could run code when loaded; only plain weight files are read "
                                 f"({_blocked_global(e)})") from None
        raise ModelLoadError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    except Exception as e:  # torch raises many types for damaged files
        raise ModelLoadError(f"{path}: truncated or corrupt checkpoint ({_first_line(e)})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ModelLoadError(f"{path}: not a state dict of tensors")
    return sd


def load_checkpoint(path: str) -> tuple[ModelConfig, Dict[str, np.ndarray]]:
    """Load a `.pth` checkpoint: (config, {official name: float32 array}).

    Tensors are memory-mapped by torch and converted to float32 one at a time, so peak memory is
    the float32 model plus one tensor.
    """
    path = os.fspath(path)
    sd = _read_torch_state_dict(path)
    config = infer_config({k: tuple(v.shape) for k, v in sd.items()}, source=path)
    out = {}
    for k, v in sd.items():
        try:
            out[k] = v.float().numpy()
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor '{k}' unreadable, file truncated? ({e})") from None
    check_finite(out, path)
    return config, out


def load_checkpoint_to(path: str, convert) -> tuple[ModelConfig, dict, str] | None:
    """RWKV-7 `.pth` straight to a device: (config, {name: convert(tensor)}, fingerprint), or None
    for other versions (their preparation needs numpy arrays: use `load_checkpoint`).

    Each memory-mapped tensor goes to `convert` (e.g. the CUDA backend's `weight`, which stores it
    in the chosen dtype) as it is in the file, with no float32 host copy, and its file pages are
    dropped from this process right after (madvise DONTNEED on a read-only file mapping: the
    pages would be read again from the file if touched). Host peak memory is then about one
    tensor, not the float32 model plus the mapped file."""
    from .config import fingerprint_arrays

    path = os.fspath(path)
    sd = _read_torch_state_dict(path)
    config = infer_config({k: tuple(v.shape) for k, v in sd.items()}, source=path)
    if config.version != "x070":
        return None
    try:  # the probes of RWKVModel's fingerprint, as float32 like the numpy path reads them
        fp = fingerprint_arrays(config, [sd["emb.weight"][:8].float().numpy(),
                                         sd["blocks.0.ffn.key.weight"][:8].float().numpy(),
                                         sd["head.weight"][-8:].float().numpy()])
        out = {}
        for k in list(sd):
            t = sd.pop(k)
            out[k] = convert(t)
            _drop_pages(t)
    except Exception as e:
        raise ModelLoadError(f"{path}: tensor unreadable, file truncated? ({str(e)[:200]})") from None
    return config, out, fp


def _drop_pages(t) -> None:
    """Give the pages of a memory-mapped, never-written tensor back to the page cache."""
    try:
        import ctypes
        import mmap

        st = t.untyped_storage()
        a, n = st.data_ptr(), st.nbytes()
        lo = a // mmap.PAGESIZE * mmap.PAGESIZE
        hi = -(-(a + n) // mmap.PAGESIZE) * mmap.PAGESIZE
        if n:
            ctypes.CDLL(None).madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)   # MADV_DONTNEED
    except Exception:  # not Linux / no libc symbol: the pages simply stay mapped until the dict is freed
        pass
