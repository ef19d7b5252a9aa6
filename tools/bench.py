"""Decode/prefill speed, peak RSS and bytes of weights read per token, vs the `rwkv` pip package.

    python tools/bench.py --model M [--predictors B] [--dtype fp32,fp16,int8,int4,int8-h4] --tokens N [--compare-rwkv]
                          [--device cpu|cuda] [--threads T] [--rounds R] [--prefill-tokens P]
                          [--native] [--model-file int4-h8=M-int4h8.rwkve ...]
    python tools/bench.py --model PACKAGE_DIR ...     # the package sparse vs the same weights dense

Each configuration runs in its own process (so peak RSS is its own) and prints one JSON line.
CPU configurations: the `rwkv` package `cpu fp32`, our dense fp32 (.pth, numba kernels) and
fp16/int8 (converted model files, cached in --workdir), and sparse fp16/int8 with --predictors.
Decode tok/s is the median of --rounds runs of --tokens tokens after a warm-up; bytes read per
token are counted by the kernels; the machine's read bandwidth is measured in the same run.
The first CPU row, "default path (auto)", is what a user gets with no options (`--backend auto` on the
model as given); every row reports time_to_first_token_s (process start to the prompt's logits).
Final line: `speedup_sparse_int8_vs_rwkv=X.XX speedup_sparse_vs_dense_int8=X.XX`.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _tokens(n, vocab, seed):
    import numpy as np
    return [int(t) for t in np.random.default_rng(seed).integers(1, vocab, n)]


def _set_threads(n, torch_too=False, native=False):
    # torch is imported only where it computes: its thread pool beside numba's slows numba down
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = str(n)
    if native:                                  # the native rows never import numba (its RSS is measured)
        from rwkv_edge.backends import native as nat
        nat.set_num_threads(n)
        return
    import numba
    numba.set_num_threads(n)
    if torch_too:
        import torch
        torch.set_num_threads(n)


def _load(cfg):
    """The model object of one configuration."""
    if cfg["impl"] == "rwkv":
        from rwkv_peer import RwkvPackageModel
        return RwkvPackageModel(cfg["model"], "cuda fp16" if cfg["device"] == "cuda" else "cpu fp32")
    from rwkv_edge.runtime import open_model
    # CUDA: weights stored in cfg["dtype"]; CPU: the converted model file holds its dtype
    m = open_model(cfg["file"], backend=cfg.get("backend", "numba"), predictors=cfg.get("predictors"),
                   device=cfg["device"], dtype=cfg["dtype"] if cfg["device"] == "cuda" else "fp32",
                   dense=cfg.get("dense", False))
    if cfg.get("native_ffn") == "dense":        # the native every-row dense FFN (not the default exact one)
        m = m.with_ffn_mode("dense")
    if cfg.get("head_rescore"):                 # --head-rescore: int4 copy of the head, top K from int8 rows
        m = m.with_head_rescore(cfg["head_rescore"])
    if cfg.get("sets"):                         # --shape: active sets of the reference model, replayed
        from rwkv_edge.replay import ActiveSets, ReplayedSets, replayed_sparse_ffn
        if cfg.get("backend") == "native":
            rs = ReplayedSets.from_file(cfg["sets"], m)
            return m.with_sets(rs, all_keys=bool(cfg.get("all_keys")))
        m = m.with_ffn(replayed_sparse_ffn(m, ActiveSets.load(cfg["sets"])))
    return m


def _sync(cfg):
    if cfg["device"] == "cuda":
        import torch
        torch.cuda.synchronize()


def run_one(cfg) -> dict:
    """Measure one configuration in this process."""
    import numpy as np
    import psutil
    if cfg["impl"] == "llama.cpp":
        from llama_peer import run_one as llama_run
        return llama_run(cfg)

    _set_threads(cfg["threads"], torch_too=cfg["impl"] == "rwkv" or cfg["device"] == "cuda",
                 native=cfg.get("backend") == "native")
    t0 = time.perf_counter()
    m = _load(cfg)
    load_s = time.perf_counter() - t0
    V = m.config.vocab_size
    prompt, toks = _tokens(16, V, 1), _tokens(cfg["tokens"], V, 2)
    step = m.step
    graph = None
    if cfg["device"] == "cuda" and cfg["impl"] == "rwkv-edge" and not cfg.get("predictors"):
        graph = m.ops.CudaGraphStep(m)          # batch-1 decode replays one captured graph per token
    _, st = m.forward(prompt)
    # process start (interpreter, imports, numba's cache, model load) to the prompt's logits
    ttft = time.time() - psutil.Process().create_time()
    for t in toks[:4]:                          # warm-up: kernel compilation, caches
        _, st = step(t, st)
    rates = []
    for _ in range(cfg["rounds"]):
        _, s = m.forward(prompt)
        if graph is not None:
            graph.reset(s)
        _sync(cfg)
        t = time.perf_counter()
        for tok in toks:
            if graph is not None:
                graph.step(tok)
            else:
                _, s = step(tok, s)
        _sync(cfg)
        rates.append(len(toks) / (time.perf_counter() - t))
    long = _tokens(cfg["prefill_tokens"], V, 3)
    pre = []
    for _ in range(3):
        _sync(cfg)
        t = time.perf_counter()
        m.forward(long)
        _sync(cfg)
        pre.append(len(long) / (time.perf_counter() - t))
    out = {"config": cfg["name"], "device": cfg["device"], "threads": cfg["threads"],
           "decode_tok_s": round(float(np.median(rates)), 1), "decode_tok_s_best": round(max(rates), 1),
           "prefill_tok_s": round(float(np.median(pre)), 1), "prefill_tokens": len(long), "load_s": round(load_s, 2),
           "time_to_first_token_s": round(ttft, 2)}
    if cfg["impl"] == "rwkv-edge" and cfg["device"] == "cpu" and cfg.get("backend", "numba") in ("numba", "auto"):
        from rwkv_edge.backends import numba_cpu as nb
        _, s = m.forward(prompt)
        nb.counter.reset()
        nb.counter.enabled = True
        for tok in toks:
            _, s = step(tok, s)
        nb.counter.enabled = False
        out["weight_bytes_per_token"] = int(nb.counter.bytes_read / len(toks))
    elif cfg.get("backend") == "native":      # counted by the model from the C side's per-layer counts
        _, s = m.forward(prompt)
        n0, b0 = m.tokens_run, m.bytes_read
        for tok in toks:
            _, s = step(tok, s)
        out["weight_bytes_per_token"] = int((m.bytes_read - b0) / (m.tokens_run - n0))
        out["kernels"] = __import__("rwkv_edge.backends.native", fromlist=["level"]).level()
    elif cfg["impl"] == "rwkv" or cfg.get("backend") == "reference":
        out["weight_bytes_per_token"] = _dense_fp32_bytes(cfg["model"])   # dense fp32 reads every weight
    dens = getattr(getattr(m, "ffn", None), "density", None)
    if dens:
        out["ffn_density"] = round(float(dens), 3)
    out["peak_rss_mib"] = round(_peak_rss_kib() / 1024, 1)
    out.update(_memory_report(cfg, m))
    return out


def _memory_report(cfg, m) -> dict:
    """Resident bytes of the model-file mapping (smaps) and the process's anon/file split, at the end."""
    from rwkv_edge import memstat
    r = {}
    if cfg["impl"] == "rwkv-edge" and cfg.get("file", "").endswith(".rwkve"):
        r["model_mapping_resident_mib"] = round((memstat.mapping_resident(cfg["file"]) or 0) / 2**20, 1)
        r["model_file_mib"] = round(os.path.getsize(cfg["file"]) / 2**20, 1)
    s = memstat.status_mib()
    r.update(rss_anon_mib=s.get("RssAnon"), rss_file_mib=s.get("RssFile"))
    return r


def _peak_rss_kib() -> float:
    """This process's peak RSS. VmHWM, not getrusage: on Linux ru_maxrss keeps the parent's peak
    across fork + exec, so every child would report at least the parent's footprint."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1])
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _dense_fp32_bytes(path) -> int:
    """Bytes a dense fp32 decode step reads: every parameter once, but only one embedding row."""
    import torch
    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    n = sum(v.numel() for k, v in sd.items() if k != "emb.weight") + sd["emb.weight"].shape[1]
    return 4 * int(n)


def _model_file(model, dtype, workdir, fingerprint):
    """fp32 runs from the .pth; fp16/int8 from a converted model file cached in workdir under the
    source's fingerprint (another model of the same file name never reuses it)."""
    if dtype == "fp32" or not model.endswith(".pth"):
        return model
    from rwkv_edge.config import ModelLoadError
    from rwkv_edge.modelfile import convert, read_header
    os.makedirs(workdir, exist_ok=True)
    out = os.path.join(workdir, f"{os.path.basename(model)[:-4]}-{fingerprint}-{dtype}.rwkve")
    try:
        h = read_header(out) if os.path.exists(out) else None
    except ModelLoadError:
        h = None                                      # damaged cache entry: convert again
    file_dtype, head = _DTYPE_SPLIT.get(dtype, (dtype, None))
    if h is None or h.get("fingerprint") != fingerprint or (h.get("dtype"), h.get("head_dtype")) != (file_dtype, head):
        print(f"converting {model} -> {out}", file=sys.stderr)
        convert(model, out, file_dtype, head_dtype=head)
    return out


# bench dtypes that are a file dtype with another head dtype (convert --dtype D --head-dtype H)
_DTYPE_SPLIT = {"int8-h4": ("int8", "int4"), "int4-h8": ("int4", "int8")}


def _package_cfgs(ap, args, base):
    """A model package: its weights dense (--dense) and sparse with its predictors, nothing else."""
    from rwkv_edge.config import ModelLoadError
    from rwkv_edge.package import check_parts, read_manifest
    try:
        man = read_manifest(args.model)
        check_parts(args.model, man)
    except ModelLoadError as e:
        ap.exit(2, f"{PROG}: error: {e}\n")
    if args.compare_rwkv or args.with_reference or args.predictors:
        ap.error("--model PACKAGE runs the package sparse vs dense; --compare-rwkv, --with-reference and "
                 "--predictors need a .pth")
    d = man["dtype"] if args.device == "cpu" else "fp16"
    cfgs = [dict(base, name=f"dense {d}", impl="rwkv-edge", dtype=d, file=args.model, dense=True)]
    if man["files"].get("predictors"):
        cfgs.append(dict(base, name=f"sparse {d}", impl="rwkv-edge", dtype=d, file=args.model))
    return cfgs


def _check_inputs(ap, args) -> str:
    """Load the model once here (and the bundle against it), so a damaged or non-RWKV file or
    another model's bundle is one line and exit 2 before any configuration runs. Returns the
    model's fingerprint."""
    from rwkv_edge import load_model
    m = load_model(args.model, backend="reference")   # a check only: no kernels needed
    fp = m.fingerprint
    if args.predictors:
        from rwkv_edge.predictors.bundle import PredictorBundle
        PredictorBundle.load(args.predictors, model=m)
    del m
    return fp


PROG = "bench.py"


def main(argv=None) -> int:
    """Bad input: one line, exit 2. A configuration that fails (its JSON line has "error") makes
    the run exit 1."""
    from rwkv_edge.errors import run_main
    return run_main(PROG, _main, argv)


def _main(argv=None) -> int:
    from rwkv_edge.errors import ArgumentParser
    ap = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="official .pth checkpoint, or a model package directory (sparse vs its "
                                    "dense; default: the embedded model package)")
    ap.add_argument("--predictors", help="predictor bundle: adds the sparse configurations")
    ap.add_argument("--dtype", default=None,
                    help="comma list of fp32, fp16, int8, int4, int8-h4, int4-h8 (int4 body, int8 head) (default fp32,fp16,int8); "
                         "cuda: fp32, fp16, bf16 (default fp32,fp16)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prefill-tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: batch-1 decode kernels are too small to gain from more here)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--compare-rwkv", action="store_true", help="also run the `rwkv` pip package")
    ap.add_argument("--with-reference", action="store_true", help="also run the numpy reference backend (fp32)")
    ap.add_argument("--llama-cpp", action="store_true",
                    help="also run llama.cpp (pip llama-cpp-python + gguf) on the same model: Q8_0 and Q4_0, logits checked first")
    ap.add_argument("--native", action="store_true",
                    help="also run the native C backend on every int8/int4 dtype: native dense D (every key and "
                         "value row), native exact D (every key row, the value rows of the active neurons: the "
                         "lossless default), native sparse D (the predictor's sets)")
    ap.add_argument("--head-rescore", type=int, default=0, metavar="K",
                    help="with --native: every native row also runs with the rescored head (all logits from a 4-bit "
                         "copy of the int8 head, the top K from its int8 rows; backends/native_head.py)")
    ap.add_argument("--model-file", action="append", default=[], metavar="DTYPE=PATH",
                    help="use this converted model file for DTYPE (e.g. int4-h8=ref-int4h8.rwkve, made with --calib) "
                         "instead of converting --model; checked against --model's fingerprint and the dtype")
    ap.add_argument("--shape", help="0.1b, 0.4b or 1.5b: random-weight models of official shapes, replayed active sets")
    ap.add_argument("--shape-predictor-bits", type=int, choices=[1, 2, 4],
                    help="with --shape --native: the native sparse row also scores an n-bit random W_k predictor")
    ap.add_argument("--tokenizer", help="tokenizer.json for the GGUF (default: tokenizer.json beside --model)")
    ap.add_argument("--workdir", default=os.path.join(os.path.dirname(HERE), "out", "bench"))
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one configuration (JSON)
    args = ap.parse_args(argv)
    if args.head_rescore and (args.head_rescore < 0 or not args.native):
        ap.error("--head-rescore K needs --native and K > 0")
    if args.one:
        cfg = json.loads(args.one)
        if cfg["impl"] == "llama-check":
            from llama_peer import check
            for row in check(cfg):
                print(json.dumps(row), flush=True)
            return 0
        print(json.dumps(run_one(cfg)), flush=True)
        return 0
    if args.shape:
        from shape_bench import shape_configs
        args.dtype = args.dtype or "int8"
        base = dict(device="cpu", threads=args.threads, tokens=args.tokens, rounds=args.rounds,
                    prefill_tokens=args.prefill_tokens)
        return _run_all(args, shape_configs(args, base))
    if not args.model:
        from rwkv_edge.runtime import default_model_path
        args.model = default_model_path()
        if args.model is None:
            ap.error("--model is required: this install has no embedded default model")
        print(f"{PROG}: no --model given, using the embedded default model ({args.model})", file=sys.stderr)
    if not os.path.exists(args.model):
        ap.error(f"--model {args.model}: no such file")
    if args.tokens <= 0 or args.rounds <= 0 or args.prefill_tokens <= 0 or args.threads <= 0:
        ap.error("--tokens, --rounds, --prefill-tokens and --threads must be > 0")
    if args.predictors and not os.path.exists(args.predictors):
        ap.error(f"--predictors {args.predictors}: no such file")
    if args.dtype is None:
        args.dtype = "fp32,fp16" if args.device == "cuda" else "fp32,fp16,int8"
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    allowed = {"cpu": {"fp32", "fp16", "int8", "int4", "int8-h4", "int4-h8"}, "cuda": {"fp32", "fp16", "bf16"}}[args.device]
    if not dtypes or set(dtypes) - allowed:
        ap.error(f"--dtype: choose from {', '.join(sorted(allowed))} for --device {args.device}")
    from rwkv_edge.package import is_package
    args.pkg = pkg = is_package(args.model)
    fingerprint = None if pkg else _check_inputs(ap, args)

    base = dict(model=args.model, device=args.device, threads=args.threads, tokens=args.tokens,
                rounds=args.rounds, prefill_tokens=args.prefill_tokens)
    cfgs = []
    if pkg:
        cfgs += _package_cfgs(ap, args, base)    # the package's own model file: sparse vs the same weights dense
        dtypes = []
    if args.compare_rwkv:
        peer = "rwkv cuda fp16" if args.device == "cuda" else "rwkv cpu fp32"
        cfgs.append(dict(base, name=peer, impl="rwkv"))
    if args.device == "cpu" and not pkg:   # what a user gets with no options: --backend auto on the file as given
        cfgs.append(dict(base, name="default path (auto)", impl="rwkv-edge", dtype="fp32", file=args.model,
                         backend="auto"))
    if args.with_reference and args.device == "cpu":
        cfgs.append(dict(base, name="reference fp32", impl="rwkv-edge", dtype="fp32", file=args.model, backend="reference"))
    given = _given_files(ap, args, fingerprint)
    for d in dtypes:
        f = args.model if args.device == "cuda" else given.get(d) or _model_file(args.model, d, args.workdir, fingerprint)
        cfgs.append(dict(base, name=f"dense {d}", impl="rwkv-edge", dtype=d, file=f))
        if args.predictors and (d != "fp32" or args.device == "cuda"):
            cfgs.append(dict(base, name=f"sparse {d}", impl="rwkv-edge", dtype=d, file=f, predictors=args.predictors))
        if args.native and d in _NATIVE_DTYPES and args.device == "cpu":
            cfgs += native_cfgs(base, f, args.predictors, dtype=d)

    if args.llama_cpp:
        from llama_peer import llama_configs
        cfgs += llama_configs(args, base)
    return _run_all(args, cfgs)


_NATIVE_DTYPES = ("int8", "int4", "int8-h4", "int4-h8")      # what the native backend runs


def _given_files(ap, args, fingerprint) -> dict:
    """{bench dtype: model file} from --model-file DTYPE=PATH, each checked (one line, exit 2 if not)."""
    from rwkv_edge.config import ModelLoadError
    from rwkv_edge.modelfile import read_header
    out = {}
    for spec in args.model_file:
        d, _, path = spec.partition("=")
        try:
            h = read_header(path)
        except (ModelLoadError, OSError) as e:
            ap.error(f"--model-file {spec}: {e}")
        want = _DTYPE_SPLIT.get(d, (d, None))
        if (h.get("dtype"), h.get("head_dtype")) != want:
            ap.error(f"--model-file {spec}: the file holds {h.get('dtype')} (head {h.get('head_dtype') or 'same'}), not {d}")
        if fingerprint is not None and h.get("fingerprint") != fingerprint:
            ap.error(f"--model-file {spec}: converted from another model than --model")
        out[d] = path
    return out


def native_cfgs(base, f, predictors=None, sets=None, dtype="int8") -> list:
    """The native backend's rows on model file f (int8, int4 or a mix): dense (every key and value row, as a
    dense runtime computes the FFN), exact (every key row, value rows only where relu(k)^2 > 0: lossless,
    the backend's default), and sparse with a bundle or replayed sets. With replayed sets (--shape, random
    weights: ~50% of the keys are > 0, not a trained model's ~14%) "exact" reads every key row and the value
    rows of the replayed sets (the same value rows as the sparse row)."""
    cfgs = [dict(base, name=f"native dense {dtype}", impl="rwkv-edge", dtype=dtype, file=f, backend="native",
                 dense=True, native_ffn="dense"),
            dict(base, name=f"native exact {dtype}", impl="rwkv-edge", dtype=dtype, file=f, backend="native",
                 dense=True, sets=sets, all_keys=bool(sets))]
    if predictors or sets:
        cfgs.append(dict(base, name=f"native sparse {dtype}", impl="rwkv-edge", dtype=dtype, file=f, backend="native",
                         predictors=predictors, sets=sets))
    return cfgs


def _head_rows(args, cfgs) -> list:
    """--head-rescore K: each native row followed by its twin with the rescored head."""
    out = []
    for c in cfgs:
        out.append(c)
        if args.head_rescore and c.get("backend") == "native":
            out.append(dict(c, name=f"{c['name']} head{args.head_rescore}", head_rescore=args.head_rescore))
    return out


def _run_all(args, cfgs) -> int:
    """Run each configuration in its own process, print its JSON line, then the ratio lines."""
    cfgs = _head_rows(args, cfgs)
    results, llama_ok, failed = {}, True, []
    for cfg in cfgs:
        if cfg["impl"] == "llama.cpp" and not llama_ok:
            print(json.dumps({"config": cfg["name"], "error": "skipped: the F32 GGUF's logits do not match ours"}), flush=True)
            continue
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)],
                           capture_output=True, text=True, env=env)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if cfg["impl"] == "llama-check":
            from llama_peer import check_ok
            llama_ok = r.returncode == 0 and check_ok([json.loads(ln) for ln in lines])
        if r.returncode != 0 or not lines:
            err = (r.stderr.strip().splitlines() or ["?"])[-1]
            print(json.dumps({"config": cfg["name"], "error": err}), flush=True)
            failed.append(f"{cfg['name']}: {err}")
            continue
        if cfg["impl"] == "llama-check":
            for ln in lines:
                print(ln, flush=True)
            continue
        res = json.loads(lines[-1])
        results[cfg["name"]] = res
        if args.device == "cpu":
            bw = results.get("_bw")
            if bw is None:
                from rwkv_edge.backends import numba_cpu as nb
                _set_threads(args.threads)
                bw = results["_bw"] = nb.read_bandwidth()
                print(json.dumps({"read_bandwidth_GBps": round(bw, 1), "threads": args.threads}), flush=True)
            if "weight_bytes_per_token" in res:
                used = res["weight_bytes_per_token"] * res["decode_tok_s"] / 1e9
                res["bandwidth_used_GBps"] = round(used, 2)
                res["pct_of_read_ceiling"] = round(100 * used / bw, 1)
        print(json.dumps(res), flush=True)

    def rate(name):
        return results.get(name, {}).get("decode_tok_s")
    peer = "rwkv cuda fp16" if args.device == "cuda" else "rwkv cpu fp32"
    sp = "sparse fp16" if args.device == "cuda" else "sparse int8"
    dn = "dense fp16" if args.device == "cuda" else "dense int8"
    pkg = getattr(args, "pkg", False)
    if pkg:
        sp, dn = cfgs[-1]["name"], cfgs[0]["name"]
    s1 = rate(sp) / rate(peer) if rate(sp) and rate(peer) else float("nan")
    s2 = rate(sp) / rate(dn) if rate(sp) and rate(dn) else float("nan")
    tag = cfgs[0]["dtype"] if pkg else "fp16" if args.device == "cuda" else "int8"
    print(f"speedup_sparse_{tag}_vs_rwkv={s1:.2f} speedup_sparse_vs_dense_{tag}={s2:.2f}")
    if rate("dense int4") and rate("dense int8"):        # int4 against int8, same run
        r = [f"speedup_dense_int4_vs_int8={rate('dense int4') / rate('dense int8'):.2f}"]
        if rate("sparse int4") and rate("sparse int8"):
            r += [f"speedup_sparse_int4_vs_int8={rate('sparse int4') / rate('sparse int8'):.2f}",
                  f"speedup_sparse_vs_dense_int4={rate('sparse int4') / rate('dense int4'):.2f}"]
        print(" ".join(r))
    if args.llama_cpp:
        from llama_peer import ratio_line
        print(ratio_line(results))
    if getattr(args, "native", False):
        def ratio(a, b):
            return rate(a) / rate(b) if rate(a) and rate(b) else float("nan")
        # dense: every row (the goal is sparse vs it); exact: the lossless default, reported beside
        print(f"native_sparse_vs_numba_sparse={ratio('native sparse int8', 'sparse int8'):.2f} "
              f"native_dense_vs_numba_dense={ratio('native dense int8', 'dense int8'):.2f} "
              f"native_sparse_vs_native_dense={ratio('native sparse int8', 'native dense int8'):.2f} "
              f"native_sparse_vs_native_exact={ratio('native sparse int8', 'native exact int8'):.2f} "
              f"native_exact_vs_native_dense={ratio('native exact int8', 'native dense int8'):.2f}")
        pred = [r for r in results if r.startswith("native sparse int8 + ")]
        if pred:                  # --shape-predictor-bits: the sparse row that pays the predictor
            print(f"native_sparse_with_predictor_vs_native_dense={ratio(pred[0], 'native dense int8'):.2f} "
                  f"native_sparse_with_predictor_vs_native_exact={ratio(pred[0], 'native exact int8'):.2f}")
        for d in [c["dtype"] for c in cfgs if c["name"] == f"native dense {c.get('dtype')}" and c["dtype"] != "int8"]:
            print(f"[{d}] native_sparse_vs_numba_sparse={ratio(f'native sparse {d}', f'sparse {d}'):.2f} "
                  f"native_dense_vs_numba_dense={ratio(f'native dense {d}', f'dense {d}'):.2f} "
                  f"native_sparse_vs_native_dense={ratio(f'native sparse {d}', f'native dense {d}'):.2f} "
                  f"native_sparse_vs_native_exact={ratio(f'native sparse {d}', f'native exact {d}'):.2f} "
                  f"native_exact_vs_native_dense={ratio(f'native exact {d}', f'native dense {d}'):.2f} "
                  f"native_dense_vs_native_dense_int8={ratio(f'native dense {d}', 'native dense int8'):.2f} "
                  f"native_sparse_vs_native_sparse_int8={ratio(f'native sparse {d}', 'native sparse int8'):.2f}")
    heads = [(c["name"], c["name"].rsplit(" head", 1)[0]) for c in cfgs if c.get("head_rescore")]
    if heads:
        print(" ".join(f"[{b}] head{args.head_rescore}_vs_plain={rate(h) / rate(b):.2f}" for h, b in heads
                       if rate(h) and rate(b)))
    if failed:
        print(f"{PROG}: error: {len(failed)} of {len(cfgs)} configuration(s) failed; first: {failed[0]}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
