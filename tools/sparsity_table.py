"""The seed's experiment: predictor kind x threshold setting -> density, bytes, speed and quality.

    python tools/sparsity_table.py --model M --data COLLECT_DIR --text heldout.txt --out DIR \
        [--tokens 8192] [--lambada lambada_test.jsonl --lambada-limit 1000] [--kinds ...] [--settings ...]

Kinds: 1bit, 2bit, 4bit (quantized W_k), mlp, pq, 4bit+mlp (union of the 4-bit predictor at the
row's setting and the MLP at the seed's fixed probability threshold 0.7). Settings: r0.95, r0.98,
r0.99, r0.995 (per-layer mass-recall targets) and seed (the seed's per-layer percentiles mapped to
this depth, `calibrate.seed_schedule`). Each kind is fitted once (`fit`, at recall 0.99) and then
recalibrated per setting on the same held-out rows (`fit.recalibrate`).

Per row: density actually run (SparseFFN counters), predictor bytes, FFN + predictor bytes read per
token, decode tok/s (greedy, numba sparse kernels), KLD mean / p99 and same-top-1 against the dense
base (one stored base file, `quality`), held-out ppl, LAMBADA acc / ppl. Rows are written one JSON
each (atomically) and the Markdown + CSV tables are rebuilt after every row, so a killed run resumes
where it stopped. `--plot` draws the quality/speed front and per-layer density (rwkv_edge/plots.py).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from rwkv_edge.cli import positive_int, non_negative_int  # noqa: E402
from rwkv_edge.fileio import atomic_write  # noqa: E402

KINDS = ("2bit", "4bit", "4bit+mlp", "1bit", "mlp", "pq")
SETTINGS = ("r0.99", "seed", "r0.98", "r0.95", "r0.995")
MLP_PROBABILITY = 0.7
COLUMNS = ("kind", "setting", "density", "pred_bytes", "bytes_tok", "bytes_tok_i8", "tok_s", "kld_mean", "kld_p99", "same_top1",
           "ppl", "lambada_acc", "lambada_ppl", "cal_recall")


def _write(path: str, text: str) -> None:
    with atomic_write(path, "w") as f:
        f.write(text)


def fitted(model, data: str, kind: str, out: str, args, log):
    """The bundle of `kind` fitted once at recall 0.99 (cached in out/bundles)."""
    from rwkv_edge.predictors.bundle import PredictorBundle

    path = os.path.join(out, "bundles", f"{kind}.npz")
    if os.path.exists(path):
        return PredictorBundle.load(path, model)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _file_lock(path + ".lock"):       # two runs on one --out (disjoint --settings) fit each kind once
        if os.path.exists(path):
            return PredictorBundle.load(path, model)
        return _fit(model, data, kind, path, args, log)


@contextlib.contextmanager
def _file_lock(path: str):
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _fit(model, data: str, kind: str, path: str, args, log):
    from rwkv_edge.predictors.fit import fit

    t0 = time.perf_counter()
    if kind.endswith("bit"):
        b = fit(model, data, "quantized", bits=int(kind[:-3]), target=0.99, progress=args.progress,
                group_size=args.group_size)
    else:
        b = fit(model, data, kind, target=0.99, progress=args.progress, epochs=args.mlp_epochs,
                threads=args.threads, hidden=args.mlp_hidden)
    b.save(path)
    log(f"fitted {kind} in {time.perf_counter() - t0:.0f} s: {b.nbytes} bytes")
    return b


def calibrated(model, data: str, kind: str, setting: str, out: str, args, log):
    """The bundle of (kind, setting), cached in out/bundles."""
    from rwkv_edge.candidates import mlp_threshold_bundle
    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.predictors.calibrate import seed_schedule
    from rwkv_edge.predictors.fit import recalibrate

    path = os.path.join(out, "bundles", f"{kind}__{setting}.npz")
    if os.path.exists(path):
        return PredictorBundle.load(path, model)
    if kind == "4bit+mlp":
        q = calibrated(model, data, "4bit", setting, out, args, log)
        b = PredictorBundle.union([q, mlp_threshold_bundle(fitted(model, data, "mlp", out, args, log), MLP_PROBABILITY)])
    else:
        b = copy.deepcopy(fitted(model, data, kind, out, args, log))
        if setting == "seed":
            recalibrate(b, model, data, percentiles=seed_schedule(model.config.n_layer))
        else:
            recalibrate(b, model, data, target=float(setting[1:]))
    b.save(path)
    return b


def layer_stats(model, bundle, data: str, heldout_frac: float = 0.1, max_heldout: int = 16384) -> dict:
    """Per-layer density and mass recall of `bundle` measured on the held-out split of `data` (the rows
    `fit` calibrates on), the same way for every kind (a union has no single calibration to read)."""
    from rwkv_edge.predictors.collect import labels, load_layer, read_manifest

    man = read_manifest(data)
    dens, rec = [], []
    for layer in range(model.config.n_layer):
        n = int(man["layers"][layer]["count"])
        x = load_layer(data, layer, start=n - min(max(1, int(n * heldout_frac)), max_heldout))
        pred = bundle.predict(layer, x)
        act = labels(model, layer, x)[1]
        dens.append(float(pred.mean()))
        rec.append(float(act[pred].sum(dtype=np.float64) / max(act.sum(dtype=np.float64), 1e-30)))
    return {"layer_density": dens, "layer_recall": rec, "cal_recall": float(np.mean(rec)), "layer_stats": "measured"}


def decode_speed(model, n: int, lock: str | None) -> float:
    """Greedy decode tokens/s over `n` steps after a 16-token prompt (timed under `lock` if given)."""
    if n <= 0:
        return float("nan")
    logits, state = model.forward(list(range(1, 17)))
    tok = int(np.argmax(logits))
    logits, state = model.step(tok, state)                      # warm-up (numba compile, caches)
    f = None
    if lock:
        import fcntl
        f = open(lock, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            tok = int(np.argmax(logits))
            logits, state = model.step(tok, state)
        return n / (time.perf_counter() - t0)
    finally:
        if f is not None:
            f.close()


def ffn_bytes_per_token(config, density: float, itemsize: int, pred_bytes: int) -> int:
    """Bytes the FFN reads per decoded token: active neurons' key row + value column, plus the predictor."""
    return int(round(config.n_layer * config.ffn_dim * density * 2 * config.n_embd * itemsize + pred_bytes))


def run_row(model, tok, kind, setting, ctx_: dict, args, log) -> dict:
    from rwkv_edge.evaluate import score_lambada
    from rwkv_edge.quality import compare
    from rwkv_edge.sparse import SparseFFN

    cfg = model.config
    if kind == "dense":
        cand, b = model, None
    else:
        b = calibrated(model, args.data, kind, setting, args.out, args, log)
        cand = model.with_ffn(SparseFFN(model, b))
    r = compare(model, cand, ctx_["tokens"], args.ctx, base=ctx_["base"], progress=args.progress)
    row = {"kind": kind, "setting": setting, "n_tokens": r["n_tokens"], "kld_mean": r["kld_mean"],
           "kld_p99": r["kld_p99"], "kld_se": r["kld_se"], "same_top1": r["same_top1"], "ppl": r["ppl"],
           "ppl_base": r["ppl_base"], "density": 1.0 if b is None else r["density"],
           "pred_bytes": 0 if b is None else b.nbytes}
    if b is not None:
        row.update(layer_stats(model, b, args.data))
        row["describe"] = b.describe()
    row["bytes_tok"] = ffn_bytes_per_token(cfg, row["density"], 4, row["pred_bytes"])        # fp32 rows (this run)
    row["bytes_tok_i8"] = ffn_bytes_per_token(cfg, row["density"], 1, row["pred_bytes"])     # an int8 model file
    if ctx_["lambada"]:
        prev = ctx_.get("earlier", {}).get((kind, setting))
        dev = candidate_deviation(row, prev, len(ctx_["lambada"])) if prev else float("inf")
        if dev <= REUSE_TOL:            # the same candidate (REUSE_KEYS): LAMBADA would give the same
            row.update(lambada_acc=float(prev["lambada_acc"]), lambada_ppl=float(prev["lambada_ppl"]),
                       lambada_n=int(prev["lambada_n"]), lambada_from=args.lambada_from, lambada_from_dev=dev)
            log(f"{kind} {setting}: LAMBADA taken from {args.lambada_from} (held-out figures agree: {dev:.2f} of tolerance)")
        else:
            if prev:
                log(f"{kind} {setting}: {args.lambada_from} disagrees ({dev:.1e}): LAMBADA run again")
            lam = score_lambada(cand, tok, ctx_["lambada"], progress=args.progress)
            row.update(lambada_acc=lam.accuracy, lambada_ppl=lam.perplexity, lambada_n=lam.n)
    row["tok_s"] = decode_speed(cand, args.decode_tokens, args.bench_lock) if args.decode_tokens else float("nan")
    return row


# An earlier row's LAMBADA figures stand only for the same candidate. Every bundle is fitted with a fixed
# seed, so a refit is the same predictor; the proof asked of it: the density actually run over the
# held-out windows (a count of 8192 x n_layer x ffn_dim neuron evaluations) equal to 1e-12, and KLD /
# ppl equal to float noise (the base is stored in float16: the dense row's own KLD, ~5e-7, moves by
# ~0.5% between processes). Per key: (absolute, relative) tolerance; a deviation <= 1 passes.
REUSE_TOL = 1.0
REUSE_KEYS = {"density": (0.0, 1e-12), "pred_bytes": (0.0, 0.0), "n_tokens": (0.0, 0.0),
              "kld_mean": (1e-8, 1e-4), "kld_p99": (1e-8, 1e-4), "ppl": (0.0, 1e-6), "ppl_base": (0.0, 1e-6),
              "same_top1": (1.01 / 8192, 0.0)}


def read_earlier(path: str) -> dict:
    """Rows of an earlier run's table.csv keyed by (kind, setting), those with LAMBADA figures only."""
    with open(path, newline="") as f:
        return {(r["kind"], r["setting"]): r for r in csv.DictReader(f) if r.get("lambada_n")}


def candidate_deviation(row: dict, prev: dict, lambada_n: int) -> float:
    """Largest difference, in units of its tolerance (REUSE_KEYS), between this row's freshly measured
    held-out figures and an earlier run's; inf if the LAMBADA item count differs."""
    if int(prev["lambada_n"]) != lambada_n:
        return float("inf")
    dev = 0.0
    for k, (atol, rtol) in REUSE_KEYS.items():
        a, b = float(row[k]), float(prev[k])
        tol = atol + rtol * max(abs(a), abs(b))
        dev = max(dev, 0.0 if a == b else (abs(a - b) / tol if tol > 0 else float("inf")))
    return dev


def speed_pass(model, args, log) -> None:
    """Decode tok/s of every finished row, all in one sitting under one hold of --bench-lock (a fair
    comparison: same load for all). `--speed-rounds` rounds, each timing every row once in turn (so
    a change of load hits all rows alike); a row's tok_s is the median of its rounds. The load average
    before and after and the dense row's spread go to speed.json (the load the figures were taken at)."""
    import fcntl

    from rwkv_edge.predictors.bundle import PredictorBundle
    from rwkv_edge.sparse import SparseFFN

    rdir = os.path.join(args.out, "rows")
    names = sorted(n for n in os.listdir(rdir) if n.endswith(".json"))
    rows, cands = [], []
    for name in names:
        with open(os.path.join(rdir, name)) as fh:
            row = json.load(fh)
        if row["kind"] == "dense":
            cand = model
        else:
            b = PredictorBundle.load(os.path.join(args.out, "bundles", f"{row['kind']}__{row['setting']}.npz"), model)
            cand = model.with_ffn(SparseFFN(model, b))
            if row.get("layer_stats") != "measured":
                row.update(layer_stats(model, b, args.data))
        rows.append(row)
        cands.append(cand)
    f = open(args.bench_lock, "a") if args.bench_lock else None
    if f is not None:
        log(f"waiting for {args.bench_lock}")
        fcntl.flock(f, fcntl.LOCK_EX)
    try:
        load0, t0 = os.getloadavg(), time.strftime("%H:%M:%S")
        for cand in cands:                                      # warm-up: numba compile, page-in
            decode_speed(cand, 4, None)
        times = [[] for _ in rows]
        for rnd in range(args.speed_rounds):
            for i, cand in enumerate(cands):
                times[i].append(decode_speed(cand, args.speed_tokens, None))
            log(f"speed round {rnd + 1}/{args.speed_rounds}: dense {times[names.index('dense__-.json')][-1]:.1f} tok/s"
                if "dense__-.json" in names else f"speed round {rnd + 1}/{args.speed_rounds}")
        load1 = os.getloadavg()
    finally:
        if f is not None:
            f.close()
    for name, row, ts in zip(names, rows, times):
        row["bytes_tok_i8"] = ffn_bytes_per_token(model.config, row["density"], 1, row["pred_bytes"])
        row["tok_s"] = float(np.median(ts))
        row["tok_s_all"] = [round(t, 2) for t in ts]
        _write(os.path.join(rdir, name), json.dumps(row, indent=1))
        log(f"speed {row['kind']} {row['setting']}: median {row['tok_s']:.1f} tok/s ({min(ts):.1f}-{max(ts):.1f})")
    info = {"started": t0, "load_before": load0, "load_after": load1, "rounds": args.speed_rounds,
            "tokens": args.speed_tokens, "cpu_count": os.cpu_count(),
            "threads": {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
    _write(os.path.join(args.out, "speed.json"), json.dumps(info, indent=1))
    log(f"load average before {load0[0]:.2f}, after {load1[0]:.2f} (1 min)")


def claim(path: str) -> bool:
    """Take row claim file `path` (holding this pid) unless a live process holds it: several runs on
    one --out share the rows, each taking the next unclaimed one in the priority order."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(open(path).read() or 0)
                if pid and pid != os.getpid():
                    os.kill(pid, 0)
                    return False                # alive
            except ProcessLookupError:
                pass
            except (ValueError, OSError):
                return False                    # being written / unreadable: leave it
            try:
                os.unlink(path)                 # a killed run's claim
            except FileNotFoundError:
                pass
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


@contextlib.contextmanager
def _claimed(path: str):
    try:
        yield
    finally:
        if os.path.exists(path):
            os.unlink(path)


@contextlib.contextmanager
def row_lock(path: str | None):
    """A shared flock on `path` for one row: timed runs (which take it exclusively) wait for the row to
    end, not for the whole grid. After the row a short pause lets a waiting exclusive holder in first
    (flock has no queue: re-taking the shared lock at once could starve it)."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        t0 = time.monotonic()
        while exclusive_waiters(path) and time.monotonic() - t0 < 1200:
            time.sleep(5.0)             # let a waiting timed run in before this row starts
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
    time.sleep(2.0)


def exclusive_waiters(path: str, locks: str = "/proc/locks") -> bool:
    """True if a process is blocked waiting for an exclusive flock on `path` (Linux /proc/locks lists
    it as `N: -> FLOCK ADVISORY WRITE pid maj:min:inode ...`). Shared holders that overlap (several rows,
    several helpers) never leave the lock free on their own, so each row start defers to such a waiter."""
    try:
        ino = os.stat(path).st_ino
        with open(locks) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        f = line.split()
        if "->" in f and "WRITE" in f and len(f) > f.index("WRITE") + 2:
            if f[f.index("WRITE") + 2].rsplit(":", 1)[-1] == str(ino):
                return True
    return False


def fmt(v, col: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return ""
    if col in ("pred_bytes", "bytes_tok", "bytes_tok_i8"):
        return f"{int(v)}"
    if col in ("kld_mean", "kld_p99"):
        return f"{v:.4f}"
    if col in ("density", "same_top1", "lambada_acc", "cal_recall"):
        return f"{v:.3f}"
    if col == "tok_s":
        return f"{v:.1f}"
    if col in ("ppl", "lambada_ppl"):
        return f"{v:.2f}"
    return str(v)


def write_tables(out: str, header: str) -> list[dict]:
    rows = []
    rdir = os.path.join(out, "rows")
    for name in sorted(os.listdir(rdir)) if os.path.isdir(rdir) else []:
        if name.endswith(".json"):
            with open(os.path.join(rdir, name)) as f:
                r = json.load(f)
            if "bytes_tok_i8" not in r and "bytes_tok" in r:         # rows made before the column existed
                r["bytes_tok_i8"] = int(round(r["pred_bytes"] + (r["bytes_tok"] - r["pred_bytes"]) / 4))
            rows.append(r)
    order = {k: i for i, k in enumerate(("dense",) + KINDS)}
    sorder = {s: i for i, s in enumerate(("-", "r0.95", "r0.98", "r0.99", "r0.995", "seed"))}
    rows.sort(key=lambda r: (order.get(r["kind"], 99), sorder.get(r["setting"], 99)))
    cols = [c for c in COLUMNS if any(fmt(r.get(c), c) for r in rows)]          # no all-empty columns
    md = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c), c) for c in cols) + " |" for r in rows]
    _write(os.path.join(out, "table.md"), "\n".join(md) + "\n")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS) + ["kld_se", "ppl_base", "n_tokens", "lambada_n"],
                       extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    _write(os.path.join(out, "table.csv"), buf.getvalue())
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="sparsity_table.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="activation directory written by `rwkv-edge collect`")
    ap.add_argument("--text", required=True, help="held-out text for KLD / ppl")
    ap.add_argument("--out", required=True, help="output directory (resumed if it exists)")
    ap.add_argument("--tokens", type=positive_int, default=8192, help="held-out tokens (whole ctx windows)")
    ap.add_argument("--ctx", type=positive_int, default=512)
    ap.add_argument("--lambada", help="lambada_test.jsonl")
    ap.add_argument("--lambada-limit", type=non_negative_int, default=1000, help="0 = no LAMBADA")
    ap.add_argument("--kinds", nargs="*", choices=KINDS, default=list(KINDS), help="none: the dense row only")
    ap.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    ap.add_argument("--backend", choices=["reference", "numba"], default="numba")
    ap.add_argument("--decode-tokens", type=non_negative_int, default=32, help="decode steps timed per row (0 = skip)")
    ap.add_argument("--bench-lock", help="flock this file around each timing")
    ap.add_argument("--row-lock", help="hold a shared flock on this file while each row runs (a timed run "
                    "elsewhere, holding it exclusively, gets in between rows)")
    ap.add_argument("--lambada-from", help="an earlier run's table.csv: a row whose held-out figures "
                    "(density exactly, KLD / ppl / same-top-1 to float noise) this run reproduces takes its LAMBADA figures "
                    "from there instead of re-running them (marked lambada_from in the row file)")
    ap.add_argument("--speed-pass", action="store_true",
                    help="only measure decode tok/s of the finished rows, all under one hold of --bench-lock")
    ap.add_argument("--speed-tokens", type=positive_int, default=64, help="decode steps per row in --speed-pass")
    ap.add_argument("--speed-rounds", type=positive_int, default=5, help="--speed-pass: rounds over all rows (median)")
    ap.add_argument("--group-size", type=positive_int, default=64)
    ap.add_argument("--mlp-epochs", type=positive_int, default=4)
    ap.add_argument("--mlp-hidden", type=positive_int, default=64)
    ap.add_argument("--threads", type=positive_int, default=1, help="torch threads for MLP training")
    ap.add_argument("--plot", action="store_true", help="also draw front.png and layer_density.png")
    ap.add_argument("--density-kinds", nargs="+", choices=KINDS, default=["2bit", "4bit"],
                    help="kinds drawn in layer_density.png (every setting of each; default: 2bit 4bit)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)
    for p, what in ((args.model, "--model"), (args.text, "--text"), (args.lambada, "--lambada"),
                    (args.lambada_from, "--lambada-from")):
        if p and not os.path.exists(p):
            ap.error(f"{what} {p}: no such file")
    if not os.path.isdir(args.data):
        ap.error(f"--data {args.data}: no such directory (run `rwkv-edge collect` first)")

    from rwkv_edge.evaluate import lambada_items
    from rwkv_edge.quality import compute_base, load_base, save_base, tokenizer_id, window_segments
    from rwkv_edge.runtime import open_model
    from rwkv_edge.tokenizer import load_tokenizer

    os.makedirs(os.path.join(args.out, "rows"), exist_ok=True)
    log = lambda s: print(f"[{time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)   # noqa: E731
    model = open_model(args.model, backend=args.backend)
    tok = load_tokenizer(None, args.model, model.config.vocab_size)
    with open(args.text, encoding="utf-8") as f:
        ids = tok.encode(f.read(args.tokens * 12))[: args.tokens]
    try:
        segs = window_segments(ids, args.ctx)
    except ValueError as e:
        ap.error(f"--text {args.text}: {e}")
    tid = tokenizer_id(tok, model.config.vocab_size)
    bpath = os.path.join(args.out, "base.npz")
    if os.path.exists(bpath):
        base = load_base(bpath, model, tid)
        base.check(segments=segs, ctx=args.ctx, where=bpath)
    else:
        base = compute_base(model, segs, args.ctx, tokenizer=tid, progress=args.progress)
        save_base(bpath, base)
        log(f"base: {base.n_tokens} positions -> {bpath}")
    items = lambada_items(args.lambada, args.lambada_limit) if args.lambada and args.lambada_limit else []
    ctx_ = {"tokens": ids, "base": base, "lambada": items,
            "earlier": read_earlier(args.lambada_from) if args.lambada_from else {}}
    header = (f"model {os.path.basename(args.model)} (L{model.config.n_layer} D{model.config.n_embd} "
              f"F{model.config.ffn_dim}), {base.n_tokens} held-out tokens in ctx {args.ctx} windows, "
              f"LAMBADA first {len(items)} items, backend {args.backend}")
    if args.speed_pass:
        speed_pass(model, args, log)
        todo = []
    else:
        todo = [("dense", "-")] + [(k, s) for s in args.settings for k in args.kinds]
    for kind, setting in todo:
        path = os.path.join(args.out, "rows", f"{kind}__{setting}.json")
        if os.path.exists(path) or not claim(path[:-5] + ".claim"):
            continue                    # done, or another run on this --out is running it
        if os.path.exists(path):        # finished by another run just before the claim
            os.unlink(path[:-5] + ".claim")
            continue
        with row_lock(args.row_lock), _claimed(path[:-5] + ".claim"):
            t0 = time.perf_counter()
            row = run_row(model, tok, kind, setting, ctx_, args, log)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            _write(path, json.dumps(row, indent=1))        # before the claim goes: no other run starts it
        write_tables(args.out, header)
        log(f"{kind} {setting}: density {row['density']:.3f} kld {row['kld_mean']:.4f} "
            f"top1 {row['same_top1']:.3f} ({row['seconds']} s)")
    rows = write_tables(args.out, header)
    if args.plot:
        from rwkv_edge.plots import plot_front, plot_layer_density
        plot_front(rows, os.path.join(args.out, "front.png"), title=os.path.basename(args.model))
        plot_layer_density([r for r in rows if r["kind"] in args.density_kinds], os.path.join(args.out, "layer_density.png"),
                           title=f"{os.path.basename(args.model)}: {', '.join(args.density_kinds)}")
    print(open(os.path.join(args.out, "table.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
