"""Shared parts of tools/gpu_check.py (split out to keep files under 500 lines): the JSON-line
results log, the timing helpers, and pack-ref / unpack-ref (rwkv7-ref-58m as int8-per-row matrices
so that it fits the device tool's 64 MiB working-tree limit; see gpu_check.py's docstring)."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

RESULTS: list = []
LOG = {"f": None}


def emit(**kw):
    """One JSON line per configuration (stdout and $OUT/gpu_check.jsonl)."""
    kw = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in kw.items()}
    RESULTS.append(kw)
    line = json.dumps(kw)
    print(line, flush=True)
    if LOG["f"]:
        LOG["f"].write(line + "\n")
        LOG["f"].flush()


# --- pack-ref (CPU) ---------------------------------------------------------------------------
def pack_ref(src: str, dst: str) -> None:
    import torch

    import rwkv_edge

    os.makedirs(dst, exist_ok=True)
    sd = torch.load(src, map_location="cpu", mmap=True, weights_only=True)
    arr = {"__keys__": np.array(list(sd.keys()))}
    for k, v in sd.items():
        if v.ndim == 2 and v.numel() >= 65536:          # emb, head, att r/k/v/o, ffn key/value
            a = v.float().numpy()
            s = np.abs(a).max(axis=1, keepdims=True) / 127.0
            s[s == 0] = 1.0
            arr["q:" + k] = np.clip(np.round(a / s), -127, 127).astype(np.int8)
            arr["s:" + k] = s.astype(np.float32)
        else:
            arr["f:" + k] = v.numpy()
    out = os.path.join(dst, "ref58m_int8.npz")
    np.savez_compressed(out + ".tmp.npz", **arr)
    os.replace(out + ".tmp.npz", out)
    deq = os.path.join("/tmp", "ref58m_int8_check.pth")
    unpack_ref(out, deq)
    prompt = [0, 510, 2500, 33, 9001, 12, 400, 7777, 16000, 5, 77, 1234]
    a, _ = rwkv_edge.load_model(src).forward(prompt)
    b, _ = rwkv_edge.load_model(deq).forward(prompt)
    # a real-text prompt for the benchmarks: 8192 token ids of the held-out text (id 0 first)
    shared = os.path.dirname(os.path.dirname(os.path.abspath(src)))
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(os.path.join(shared, "models", "tokenizer.json"))
    with open(os.path.join(shared, "data", "heldout.txt"), encoding="utf-8") as f:
        ids = tk.encode(f.read()[100000:160000]).ids
    np.save(os.path.join(dst, "heldout_ids.npy"), np.array([0] + ids[:8191], np.int32))
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB); numpy logits, int8-dequantized vs original "
          f"fp16 model: max abs diff {np.abs(a - b).max():.3f}, logit std {a.std():.2f}, "
          f"argmax same: {a.argmax() == b.argmax()}")


def unpack_ref(npz: str, pth: str) -> str:
    """The int8 pack -> a .pth in the official layout, dequantized matrices rounded to fp16."""
    import torch

    with np.load(npz) as z:
        sd = {}
        for k in z["__keys__"]:
            k = str(k)
            if "q:" + k in z.files:
                a = z["q:" + k].astype(np.float32) * z["s:" + k]
                sd[k] = torch.from_numpy(a).to(torch.float16)
            else:
                sd[k] = torch.from_numpy(np.array(z["f:" + k]))
    torch.save(sd, pth + ".tmp")
    os.replace(pth + ".tmp", pth)
    return pth


# --- timing helpers ---------------------------------------------------------------------------
def _sync():
    import torch
    torch.cuda.synchronize()


def _median_time(fn, reps=5, warm=1):
    for _ in range(warm):
        fn()
    _sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))
