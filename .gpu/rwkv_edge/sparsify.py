"""One call from an official checkpoint to a measured sparse model package (`rwkv-edge sparsify`).

Stages (each records its result in a work directory, so a rerun after Ctrl-C or an error continues
from the last finished stage; `until` stops after a named stage):

    tokens    encode the calibration text; split it into fitting tokens and held-out windows
              (`heldout // ctx` windows of `ctx` tokens, spread evenly over the sample; the fitting
              tokens never include a held-out token). First, so a too-short text fails at once.
    convert   the checkpoint -> the project's model file (model.rwkve, --dtype int8 by default)
    collect   FFN inputs of the fitting tokens on the converted (dense) weights
    fit       per `bits` in the grid: one quantized-W_k predictor bundle fitted once, then
              recalibrated (thresholds only) for each recall target of the grid -> the candidates
    measure   each candidate on the held-out windows against the same weights dense: KL divergence
              (rwkv_edge.quality: mean, p99, same-top-1, ppl ratio), the density run, and weight bytes
              read per decoded token (the numba kernels' counter; the speed proxy, see below)
    speed     decode tok/s of the chosen candidate and of the same weights dense (medians)
    package   model.json + model.rwkve + predictors.npz + tokenizer.json, written atomically

Selection: among the candidates whose mean KLD to dense is <= max_kld, the one reading the fewest
bytes per decoded token (batch-1 decode is memory-bound, DESIGN.md; bytes are exact and the same on
every run, while tok/s on a shared machine is not, so the build is deterministic). Ties go to the
higher recall target. Decode tok/s is measured for the chosen setting only and recorded.

The work directory defaults to OUT + ".work" beside OUT and is removed after success (keep_work keeps
it). Its stages.json records the settings that determine the outputs; a rerun with other settings
is refused, except for the grid (--bits, --targets): then fit onwards rerun, reusing every fitted
bundle and measurement of the same name (changing --max-kld reuses every measurement). The package directory appears complete or not at all (package.write_package).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from .config import ModelLoadError
from .fileio import atomic_write
from .package import sha256_file

WORK_FORMAT = "rwkv-edge-sparsify-work"
WORK_VERSION = 1
STAGES = ("tokens", "convert", "collect", "fit", "measure", "speed", "package")
DEFAULT_MAX_KLD = 0.01
GRID = ("bits", "targets")      # settings a rerun may change: fit onwards reruns, reusing matching files


class SparsifyError(ValueError):
    """Bad input (too little text, unwritable output, a work dir of other settings): exit 2."""


class NoCandidate(RuntimeError):
    """No candidate stays within max_kld: the work dir is kept, a rerun with a larger bound is cheap."""


@dataclass(frozen=True)
class Settings:
    """What determines the package's bytes (the grid is small on purpose: it must run on the tiny
    model in seconds; every candidate costs one held-out pass)."""
    dtype: str = "int8"                       # model file storage: int8 | fp16 | fp32
    tokens: int = 100_000                     # fitting tokens (collected FFN inputs)
    heldout: int = 4096                       # held-out tokens, rounded down to whole ctx windows
    ctx: int = 512                            # KLD windows (fresh state each, as llama-perplexity)
    bits: tuple = (2, 4)                      # quantized W_k predictors
    targets: tuple = (0.98, 0.99, 0.995)      # per-layer activation-mass recall targets
    group_size: int = 64
    margin: float = 0.003                     # calibrate to target + margin
    seed: int = 0

    def check(self) -> None:
        if self.dtype not in ("int8", "fp16", "fp32"):
            raise SparsifyError(f"unknown dtype {self.dtype!r}: choose int8, fp16 or fp32")
        if self.tokens < 1 or self.ctx < 1:
            raise SparsifyError("tokens and ctx must be >= 1")
        if self.heldout < self.ctx:
            raise SparsifyError(f"held-out tokens ({self.heldout}) must cover at least one context of {self.ctx}")
        if not self.bits or any(b not in (1, 2, 4, 8) for b in self.bits):
            raise SparsifyError(f"predictor bits must be among 1, 2, 4, 8, got {list(self.bits)}")
        if not self.targets or any(not 0 < t <= 1 for t in self.targets):
            raise SparsifyError(f"recall targets must be in (0, 1], got {list(self.targets)}")

    def key(self) -> dict:
        d = dataclasses.asdict(self)
        d["bits"], d["targets"] = sorted(self.bits), sorted(self.targets)
        return d

    def candidates(self) -> list:
        """[(name, bits, target)] in a fixed order."""
        return [(f"q{b}-r{t:g}", b, t) for b in sorted(self.bits) for t in sorted(self.targets)]


def bundle_digest(path: str) -> str:
    """Content identity of a predictor bundle: every array but `meta` (which holds fit timings); two
    builds from the same inputs give the same digest even though their .npz bytes (zip dates) differ."""
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as z:
        for name in sorted(z.files):
            if name != "meta":
                a = z[name]
                h.update(name.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
    return h.hexdigest()


def check_output(out: str) -> str:
    """Absolute `out` if a package can be written there (new or empty directory, writable parent)."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SparsifyError(f"--out {out}: already exists; choose a new output directory")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise SparsifyError(f"--out {out}: directory {parent} does not exist")
    try:                                    # a real probe: os.access says yes to root on read-only mounts
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".probe-"))
    except OSError as e:
        raise SparsifyError(f"--out {out}: directory {parent} is not writable ({e.strerror or e})") from None
    return out


# --------------------------------------------------------------------------- work directory


class Work:
    """The work directory: stage results as files, stages.json as the record of finished stages."""

    def __init__(self, path: str, key: dict):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.state_file = os.path.join(path, "stages.json")
        if os.path.isfile(self.state_file):
            with open(self.state_file, encoding="utf-8") as f:
                st = json.load(f)
            if st.get("format") != WORK_FORMAT or st.get("version") != WORK_VERSION:
                raise SparsifyError(f"{path}: not a sparsify work directory of this version; remove it")
            diff = sorted(k for k in set(key) | set(st["key"]) if key.get(k) != st["key"].get(k))
            fixed = [k for k in diff if k not in GRID]
            if fixed:
                raise SparsifyError(f"{path}: holds a run with other settings ({', '.join(fixed)}); "
                                    f"remove it or rerun with the same settings")
            if diff:                        # another grid: keep the collection, redo fit onwards (files are reused)
                for stage in STAGES[STAGES.index("fit"):]:
                    st["done"].pop(stage, None)
                st["key"] = key
            self.state = st
        else:
            if any(not n.startswith(".") for n in os.listdir(path)):
                raise SparsifyError(f"{path}: not empty and not a sparsify work directory")
            self.state = {"format": WORK_FORMAT, "version": WORK_VERSION, "key": key, "done": {}}
            self._save()

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def done(self, stage: str) -> dict | None:
        return self.state["done"].get(stage)

    def finish(self, stage: str, seconds: float, **info) -> None:
        self.state["done"][stage] = {"seconds": round(seconds, 2), **info}
        self._save()

    def _save(self) -> None:
        with atomic_write(self.state_file, "w", prefix=".stages-") as f:
            json.dump(self.state, f, indent=1)

    def write_json(self, name: str, obj) -> None:
        with atomic_write(self.file(name), "w", prefix=".json-") as f:
            json.dump(obj, f, indent=1)

    def read_json(self, name: str):
        with open(self.file(name), encoding="utf-8") as f:
            return json.load(f)


# --------------------------------------------------------------------------- stages


def split_tokens(ids, n_fit: int, n_windows: int, ctx: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitting tokens (n_fit,), held-out tokens (n_windows * ctx,)) of `ids`: the sample is cut into
    ctx-token blocks; n_windows of them, evenly spaced, are held out; the rest (first n_fit) fit."""
    ids = np.asarray(ids, np.int64)
    n_blocks = len(ids) // ctx
    held_blocks = set(((np.arange(n_windows) * 2 + 1) * n_blocks // (2 * n_windows)).tolist())
    held = np.concatenate([ids[b * ctx:(b + 1) * ctx] for b in sorted(held_blocks)])
    mask = np.ones(len(ids), bool)
    for b in held_blocks:
        mask[b * ctx:(b + 1) * ctx] = False
    return ids[mask][:n_fit], held


def decode_figures(model, tokens, n: int, rounds: int = 0) -> dict:
    """Weight bytes read per decoded token (numba counter; None on other backends) over `n` tokens
    step by step after the first 8, and with rounds > 0 the median decode tok/s of that many rounds."""
    from .backends import numba_cpu as nb

    toks = [int(t) for t in tokens[:n + 8]]
    _, st = model.forward(toks[:8])
    out = {}
    if getattr(model.ops, "name", "") == "numba":
        nb.counter.reset()
        nb.counter.enabled = True
        try:
            s = st
            for t in toks[8:]:
                _, s = model.step(t, s)
        finally:
            nb.counter.enabled = False
        out["bytes_per_token"] = int(nb.counter.bytes_read / max(1, len(toks) - 8))
    else:
        out["bytes_per_token"] = None
    rates = []
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)        # as tools/bench.py: batch-1 decode kernels on a busy machine with
    try:                            # 2 threads measured 1.7 tok/s where one thread gives ~200 (58m)
        for _ in range(rounds):
            s = st.copy() if hasattr(st, "copy") else st
            t0 = time.perf_counter()
            for t in toks[8:]:
                _, s = model.step(t, s)
            rates.append((len(toks) - 8) / (time.perf_counter() - t0))
    finally:
        numba.set_num_threads(threads)
    if rates:
        out["decode_tok_s"] = round(float(np.median(rates)), 1)
    return out


def _sparse(model, bundle_path: str):
    from .predictors.bundle import PredictorBundle
    from .sparse import SparseFFN

    return model.with_ffn(SparseFFN(model, PredictorBundle.load(bundle_path, model=model)))


def select(measured: dict, max_kld: float) -> str:
    """Name of the candidate with the fewest bytes/token (density when bytes are unknown) whose
    kld_mean <= max_kld; ties to the higher target. NoCandidate if none qualifies."""
    ok = [(m.get("bytes_per_token") or m["density"], -m["target"], name) for name, m in measured.items()
          if m["kld_mean"] <= max_kld]
    if not ok:
        best = min(measured.items(), key=lambda kv: kv[1]["kld_mean"])
        raise NoCandidate(f"no predictor setting keeps the mean KL divergence to dense within {max_kld:g} "
                          f"(best: {best[0]} at {best[1]['kld_mean']:.4g}); rerun with --max-kld "
                          f">= {best[1]['kld_mean']:.3g} (measurements are kept) or a larger recall target")
    return min(ok)[2]


# --------------------------------------------------------------------------- the command


def _tokenizer_file(model_path: str, tokenizer: str | None) -> str:
    path = tokenizer or os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer.json")
    if not path.lower().endswith(".json"):
        raise SparsifyError(f"--tokenizer {path}: a package ships a tokenizer.json; pass one")
    if not os.path.isfile(path):
        raise SparsifyError(f"no tokenizer.json at {path}; pass --tokenizer PATH/tokenizer.json")
    return path


def sparsify(model_path: str, text_path: str, out: str, settings: Settings = Settings(),
             max_kld: float = DEFAULT_MAX_KLD, tokenizer: str | None = None, work_dir: str | None = None,
             backend: str = "auto", speed_tokens: int = 64, until: str | None = None, keep_work: bool = False,
             progress: bool = True, log=None, command: str | None = None) -> dict | None:
    """Build the sparse model package `out` from checkpoint `model_path` and calibration text
    `text_path` (stages and selection: module docstring). Returns the manifest, or None when
    stopped after stage `until`. SparsifyError for bad input (nothing written at `out`),
    NoCandidate when no setting keeps within `max_kld` (the work dir is kept either way)."""
    say = log or (lambda s: None)
    settings.check()
    if until is not None and until not in STAGES:
        raise SparsifyError(f"unknown stage {until!r}: one of {', '.join(STAGES)}")
    if not max_kld > 0:
        raise SparsifyError(f"max KLD must be > 0, got {max_kld}")
    for flag, p in (("--model", model_path), ("--text", text_path)):
        if not os.path.isfile(p):
            raise SparsifyError(f"{flag} {p}: no such file")
    out = check_output(out)
    tok_path = _tokenizer_file(model_path, tokenizer)
    key = dict(settings.key(), source_sha256=sha256_file(model_path), text_sha256=sha256_file(text_path),
               tokenizer_sha256=sha256_file(tok_path))
    work_dir = os.path.abspath(work_dir or out + ".work")
    fresh = not os.path.exists(work_dir)
    try:
        work = Work(work_dir, key)
    except OSError as e:
        raise SparsifyError(f"work directory {work_dir}: {e.strerror or e}") from None
    try:
        return _run(work, model_path, text_path, out, settings, max_kld, tok_path, backend, speed_tokens,
                    until, keep_work, progress, say, command)
    except SparsifyError:
        if fresh and not work.state["done"]:
            shutil.rmtree(work_dir, ignore_errors=True)     # bad input before any work: leave nothing
        raise


def _run(work, model_path, text_path, out, st: Settings, max_kld, tok_path, backend, speed_tokens,
         until, keep_work, progress, say, command):
    from .modelfile import convert
    from .predictors.bundle import PredictorBundle
    from .predictors.collect import collect, encode_text
    from .predictors.fit import fit, recalibrate
    from .quality import compare, compute_base, window_segments
    from .runtime import open_model
    from .tokenizer import load_tokenizer

    n_win = st.heldout // st.ctx
    cands = st.candidates()
    fit_target = max(st.targets)            # fit (its auto clip) at the highest target, recalibrate to each
    bundle_file = lambda name: f"{name}-f{fit_target:g}.npz"              # noqa: E731
    measure_file = lambda name: f"measure-{name}-f{fit_target:g}.json"    # noqa: E731
    model_file, acts = work.file("model.rwkve"), work.file("acts")
    t_run = {}

    def stage(name, fn, redo=lambda rec: False):
        i = STAGES.index(name) + 1
        rec = work.done(name)
        if rec is not None and not redo(rec):
            say(f"[{i}/{len(STAGES)}] {name}: done earlier ({rec['seconds']:.1f} s), kept")
            return rec
        if name != "tokens":                # (quick; a too-short text then fails with its one line only)
            say(f"[{i}/{len(STAGES)}] {name} ...")
        t0 = time.perf_counter()
        info = fn() or {}
        t_run[name] = time.perf_counter() - t0
        work.finish(name, t_run[name], **info)
        say(f"[{i}/{len(STAGES)}] {name}: {t_run[name]:.1f} s")
        return work.done(name)

    def stopped(name) -> bool:
        if until == name:
            say(f"stopped after {name}; the same command continues from {work.path}")
            return True
        return False

    # --- tokens: first, so a too-short text fails before any slow stage
    def do_tokens():
        tok = load_tokenizer(tok_path, model_path, 1 << 30)
        ids = encode_text(tok, text_path, st.tokens + n_win * st.ctx)
        if len(ids) < st.tokens + n_win * st.ctx:
            raise SparsifyError(f"--text {text_path}: {len(ids)} tokens, fewer than --tokens {st.tokens} plus "
                                f"{n_win * st.ctx} held-out tokens; give a longer text or fewer tokens")
        fit_ids, held = split_tokens(ids, st.tokens, n_win, st.ctx)
        with atomic_write(work.file("tokens.npz"), prefix=".tokens-") as f:
            np.savez(f, fit=fit_ids, heldout=held)
        digest = hashlib.sha256(fit_ids.tobytes() + b"|" + held.tobytes()).hexdigest()
        return {"fit_tokens": int(len(fit_ids)), "heldout_tokens": int(len(held)), "tokens_sha256": digest}

    stage("tokens", do_tokens)
    if stopped("tokens"):
        return None
    with np.load(work.file("tokens.npz")) as z:
        fit_ids, held = z["fit"], z["heldout"]

    def do_convert():
        convert(model_path, model_file, st.dtype)
        return {"dtype": st.dtype}

    stage("convert", do_convert)
    model = open_model(model_file, backend=backend)
    if int(max(fit_ids.max(), held.max())) >= model.config.vocab_size:
        raise SparsifyError(f"{tok_path}: the tokenizer gives ids beyond the model's vocab ({model.config.vocab_size})")
    if stopped("convert"):
        return None

    stage("collect", lambda: {"tokens": int(collect(model, fit_ids, acts, progress=progress)["tokens"])})
    if stopped("collect"):
        return None

    def do_fit():
        for b in sorted(st.bits):
            base = work.file(f"fit-q{b}-f{fit_target:g}.npz")
            if not os.path.isfile(base):
                fit(model, acts, kind="quantized", bits=b, group_size=st.group_size, clip="auto",
                    target=fit_target, metric="mass", margin=st.margin, seed=st.seed,
                    progress=progress).save(base)
            for name, bb, t in cands:
                if bb == b and not os.path.isfile(work.file(bundle_file(name))):
                    bundle = recalibrate(PredictorBundle.load(base, model=model), model, acts, target=t,
                                         metric="mass", margin=st.margin)
                    bundle.save(work.file(bundle_file(name)))
        return {"candidates": [c[0] for c in cands]}

    stage("fit", do_fit)
    if stopped("fit"):
        return None

    def do_measure():
        todo = [c for c in cands if not os.path.isfile(work.file(measure_file(c[0])))]
        if not todo:
            return {}
        segments = window_segments(held, st.ctx)
        base = compute_base(model, segments, st.ctx, top_k=0, progress=progress, desc="dense")
        work.write_json("measure-dense.json", decode_figures(model, held, speed_tokens))
        for name, b, t in todo:
            cm = _sparse(model, work.file(bundle_file(name)))
            r = compare(None, cm, held, st.ctx, base=base, progress=progress)
            r.update(decode_figures(cm, held, speed_tokens), name=name, bits=b, target=t,
                     predictor_bytes=cm.ffn.predictor.nbytes)
            say(f"  {name}: density {r['density']:.3f}, {r['bytes_per_token']} bytes/token, "
                f"KLD mean {r['kld_mean']:.4f} p99 {r['kld_p99']:.4f}, same top-1 {r['same_top1']:.3f}")
            work.write_json(measure_file(name), r)
        return {}

    stage("measure", do_measure)
    if stopped("measure"):
        return None
    measured = {c[0]: work.read_json(measure_file(c[0])) for c in cands}
    chosen = select(measured, max_kld)
    say(f"chosen: {chosen} (fewest bytes/token with KLD mean <= {max_kld:g})")

    def do_speed():
        dense = decode_figures(model, held, speed_tokens, rounds=3)
        sparse = decode_figures(_sparse(model, work.file(bundle_file(chosen))), held, speed_tokens, rounds=3)
        return {"chosen": chosen, "decode_tok_s": sparse["decode_tok_s"], "dense_decode_tok_s": dense["decode_tok_s"]}

    speed = stage("speed", do_speed, redo=lambda rec: rec.get("chosen") != chosen)
    if stopped("speed"):
        return None

    say(f"[{len(STAGES)}/{len(STAGES)}] package -> {out}")
    info = _manifest_info(work, model_path, text_path, st, max_kld, chosen, work.file(bundle_file(chosen)),
                          measured, speed, model, command)
    from .package import write_package

    man = write_package(out, model_file, tok_path, work.file(bundle_file(chosen)), info=info)
    if not keep_work:
        shutil.rmtree(work.path, ignore_errors=True)
    return man


def _manifest_info(work, model_path, text_path, st, max_kld, chosen, chosen_file, measured, speed, model,
                   command) -> dict:
    from .predictors.bundle import PredictorBundle

    m = measured[chosen]
    dense = work.read_json("measure-dense.json")
    bundle = PredictorBundle.load(chosen_file, model=model)
    r = lambda x, n=5: None if x is None else round(float(x), n)   # noqa: E731
    figures = {k: r(m[k]) for k in ("kld_mean", "kld_se", "kld_p99", "kld_max", "same_top1", "ppl_base", "ppl",
                                    "ln_ppl_ratio", "density")}
    figures.update(ppl_ratio=r(m["ppl"] / m["ppl_base"]), bytes_per_token=m["bytes_per_token"],
                   dense_bytes_per_token=dense["bytes_per_token"], predictor_bytes=m["predictor_bytes"],
                   heldout_tokens=m["n_tokens"], ctx=st.ctx, decode_tok_s=speed["decode_tok_s"],
                   dense_decode_tok_s=speed["dense_decode_tok_s"],
                   decode_tok_s_how="median of 3 rounds, 1 numba thread, same weights dense and sparse, one process",
                   machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cpus".replace("  ", " "),
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    settings = st.key()
    return {
        "name": os.path.splitext(os.path.basename(model_path))[0],
        "source": os.path.basename(model_path), "source_sha256": work.state["key"]["source_sha256"],
        "predictor": {"kind": bundle.kind, "bits": bundle.bits, "group_size": st.group_size, "clip": "auto",
                      "target_recall": bundle.target, "metric": bundle.metric, "margin": st.margin,
                      "thresholds": [r(p.calib.threshold, 6) for p in bundle.predictors],
                      "calibration_sparsity": [r(p.calib.percentile, 4) for p in bundle.predictors]},
        "measured": figures,
        "build": {"command": command, "settings": settings, "max_kld": max_kld,
                  "calibration_text": os.path.basename(text_path), "text_sha256": work.state["key"]["text_sha256"],
                  "selection": "fewest weight bytes per decoded token among candidates with kld_mean <= max_kld",
                  "stage_seconds": {s: work.done(s)["seconds"] for s in STAGES if work.done(s)},
                  "candidates": [{k: (r(v) if isinstance(v, float) else v) for k, v in measured[c].items()
                                  if k in ("name", "bits", "target", "density", "bytes_per_token", "kld_mean",
                                           "kld_p99", "same_top1", "predictor_bytes")}
                                 for c in sorted(measured)],
                  "tokens_sha256": work.done("tokens")["tokens_sha256"],
                  "predictors_digest": bundle_digest(chosen_file)},
    }
