"""llama.cpp on the same model, for `tools/bench.py --llama-cpp` (benchmark machines only, never CI).

llama.cpp comes from the registry package `llama-cpp-python` (compiles llama.cpp on install); the
GGUF from ../shared/peers/rwkv7_pth_to_gguf.py (needs the `gguf` package). Neither is a dependency
of rwkv-edge: this module is imported only when --llama-cpp is given.

    gguf_files(model, tokenizer, workdir, quants)   F32 GGUF + llama_model_quantize'd Q8_0 / Q4_0,
                                                    cached in workdir under the .pth's fingerprint
    check(cfg)                                      logits of each GGUF vs our fp32 (numba) logits
    run_one(cfg)                                    decode / prefill tok/s and peak RSS of one GGUF

The token ids are fed directly (the converter writes our vocabulary at the same ids), through the
low-level API: one llama_decode per decode token, one per prefill of `prefill_tokens`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "peers")
FORMAT = 1                           # bump when the cached GGUF naming or conversion changes
QUANTS = {"Q8_0": 7, "Q4_0": 2}      # llama_ftype: LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_0
F32_TOL = 1e-3                       # F32 GGUF vs our fp32: the peer README measured 3e-5


def available() -> str | None:
    """None when llama-cpp-python and gguf import, else the reason (one line)."""
    for mod, pkg in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf")):
        try:
            __import__(mod)
        except Exception as e:          # a broken build raises OSError from ctypes, not ImportError
            return f"--llama-cpp needs `pip install {pkg}` ({type(e).__name__}: {e})"
    if not os.path.exists(os.path.join(PEERS, "rwkv7_pth_to_gguf.py")):
        return f"--llama-cpp needs {PEERS}/rwkv7_pth_to_gguf.py"
    return None


def _fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def gguf_files(model: str, tokenizer: str, workdir: str, quants=("Q8_0", "Q4_0")) -> dict:
    """{"F32": path, "Q8_0": path, ...}: converted / quantized once per source fingerprint, written
    atomically (temp name, then rename), reused after that."""
    import llama_cpp
    os.makedirs(workdir, exist_ok=True)
    stem = os.path.join(workdir, f"{os.path.basename(model).rsplit('.', 1)[0]}-{_fingerprint(model)}-v{FORMAT}")
    out = {"F32": stem + "-F32.gguf"}
    if not os.path.exists(out["F32"]):
        tmp = out["F32"] + ".tmp"
        print(f"llama.cpp: converting {model} -> {out['F32']}", file=sys.stderr)
        r = subprocess.run([sys.executable, os.path.join(PEERS, "rwkv7_pth_to_gguf.py"), "--model", model,
                            "--tokenizer", tokenizer, "--outfile", tmp, "--outtype", "f32"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError("GGUF conversion failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
        os.replace(tmp, out["F32"])
    for q in quants:
        out[q] = f"{stem}-{q}.gguf"
        if os.path.exists(out[q]):
            continue
        print(f"llama.cpp: quantizing -> {out[q]}", file=sys.stderr)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANTS[q]
        params.nthread = 1
        tmp = out[q] + ".tmp"
        if llama_cpp.llama_model_quantize(out["F32"].encode(), tmp.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize {q} failed")
        os.replace(tmp, out[q])
    return out


_KEEP = []      # the log callback must outlive every call into llama.cpp


class LlamaRunner:
    """One GGUF loaded with the low-level API: reset(), eval(ids) -> logits of the last token."""

    def __init__(self, path: str, threads: int, n_ctx: int, n_batch: int):
        import llama_cpp as lc
        self.lc = lc
        if not _KEEP:
            _KEEP.append(lc.llama_log_callback(lambda level, text, user: None))
            lc.llama_log_set(_KEEP[0], ctypes.c_void_p())
            lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, n_batch, n_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self._buf = (lc.llama_token * n_batch)()

    def reset(self):
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def eval(self, ids, copy=True):
        n = len(ids)
        for i, t in enumerate(ids):
            self._buf[i] = t
        rc = self.lc.llama_decode(self.ctx, self.lc.llama_batch_get_one(self._buf, n))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        p = self.lc.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy() if copy else p


def check(cfg) -> list:
    """Max abs logit diff and greedy agreement of each GGUF against our fp32 numba path, on a 16-token
    prompt plus `check_steps` steps; one dict per GGUF. Run in its own process before any timing."""
    sys.path.insert(0, os.path.dirname(HERE))
    from rwkv_edge.runtime import open_model
    from bench import _tokens
    m = open_model(cfg["model"], backend="numba")
    V = m.config.vocab_size
    prompt, toks = _tokens(16, V, 1), _tokens(cfg["check_steps"], V, 2)
    ours = []
    lo, st = m.forward(prompt)
    ours.append(lo.reshape(-1))
    for t in toks:
        lo, st = m.step(t, st)
        ours.append(lo.reshape(-1))
    res = []
    for name, path in cfg["files"].items():
        r = LlamaRunner(path, 1, 64 + len(toks), 64)
        theirs = [r.eval(prompt)] + [r.eval([t]) for t in toks]
        d = max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs))
        agree = sum(int(np.argmax(a) == np.argmax(b)) for a, b in zip(ours, theirs))
        res.append({"config": f"llama.cpp {name}", "max_abs_logit_diff_vs_ours_fp32": round(d, 6),
                    "greedy_agree": f"{agree}/{len(ours)}"})
    return res


def run_one(cfg) -> dict:
    """Decode tok/s (median of rounds) and prefill tok/s of one GGUF, as bench.run_one measures ours:
    the same prompt, decode and prefill token ids, a 4-token warm-up."""
    from bench import _peak_rss_kib, _tokens
    t0 = time.perf_counter()
    r = LlamaRunner(cfg["file"], cfg["threads"], cfg["prefill_tokens"] + cfg["tokens"] + 64, max(cfg["prefill_tokens"], 64))
    load_s = time.perf_counter() - t0
    V = r.n_vocab
    prompt, toks, long = _tokens(16, V, 1), _tokens(cfg["tokens"], V, 2), _tokens(cfg["prefill_tokens"], V, 3)
    r.reset()
    r.eval(prompt)
    for t in toks[:4]:
        r.eval([t], copy=False)
    rates = []
    for _ in range(cfg["rounds"]):
        r.reset()
        r.eval(prompt)
        t = time.perf_counter()
        for tok in toks:
            r.eval([tok], copy=False)
        rates.append(len(toks) / (time.perf_counter() - t))
    pre = []
    for _ in range(3):
        r.reset()
        t = time.perf_counter()
        r.eval(long, copy=False)
        pre.append(len(long) / (time.perf_counter() - t))
    return {"config": cfg["name"], "device": "cpu", "threads": cfg["threads"],
            "decode_tok_s": round(float(np.median(rates)), 1), "decode_tok_s_best": round(max(rates), 1),
            "prefill_tok_s": round(float(np.median(pre)), 1), "prefill_tokens": len(long), "load_s": round(load_s, 2),
            "peak_rss_mib": round(_peak_rss_kib() / 1024, 1)}


def llama_configs(args, base) -> list:
    """bench.py configurations: the logit check (first), then one timing run per quantized GGUF."""
    why = available()
    if why:
        raise SystemExit(f"bench.py: {why}")
    tok = args.tokenizer or os.path.join(os.path.dirname(os.path.abspath(args.model)), "tokenizer.json")
    if not os.path.exists(tok):
        raise SystemExit(f"bench.py: --tokenizer {tok}: no such file")
    files = gguf_files(args.model, tok, os.path.join(args.workdir, "gguf"))
    cfgs = [dict(base, name="llama.cpp check", impl="llama-check", files=files, check_steps=32)]
    for q in QUANTS:
        cfgs.append(dict(base, name=f"llama.cpp {q}", impl="llama.cpp", file=files[q]))
    return cfgs


def check_ok(rows) -> bool:
    """The F32 GGUF must match our fp32 logits (else the timings compare different models)."""
    f32 = [r for r in rows if r.get("config") == "llama.cpp F32"]
    return bool(f32) and f32[0]["max_abs_logit_diff_vs_ours_fp32"] <= F32_TOL


def ratio_line(results) -> str:
    """Our rows against llama.cpp's, decode and prefill, in this run: int8 rows (int8, int8-h4) against
    Q8_0, int4 rows (int4, int4-h8) against Q4_0, numba and native alike."""
    parts = []
    for ours, a in results.items():
        dtype = ours.split()[-1]
        peer = "Q8_0" if dtype.startswith("int8") else "Q4_0" if dtype.startswith("int4") else None
        b = results.get(f"llama.cpp {peer}")
        if peer is None or ours.startswith("llama.cpp") or not (a and b):
            continue
        tag = ours.replace(" ", "_")
        parts.append(f"{tag}_vs_llama_{peer.lower()}_decode={a['decode_tok_s'] / b['decode_tok_s']:.2f}")
        parts.append(f"{tag}_vs_llama_{peer.lower()}_prefill={a['prefill_tok_s'] / b['prefill_tok_s']:.2f}")
    return " ".join(parts) or "no llama.cpp ratios (a row is missing)"
