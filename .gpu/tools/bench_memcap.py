"""A model about twice its memory budget: dense vs sparse decode under a hard cgroup v2 memory limit.

    sudo flock /work/wt/bench.lock python tools/bench_memcap.py [--shape 1.5b] [--dtype int8] [--limit-mb N]
         [--tokens 32] [--modes dense,sparse,sparse-window] [--window 4] [--workdir DIR] [--keep]

Needs root and a cgroup memory controller: v2 (memory.max) where the unified hierarchy has it, else
v1 (memory.limit_in_bytes; this host binds memory to v1, its v2 mount has no controllers). For each
mode the script: writes nothing new if the synthetic model file exists in --workdir (else streams it,
random weights of the official shape, rwkv_edge.synthetic); runs it once uncapped so numba's kernel
cache is warm; then creates a fresh cgroup (nested in this process's own) limited to --limit-mb
(default: half the model file, swap 0), drops the page cache (sync; echo 3 > /proc/sys/vm/drop_caches), and
runs the decode in a child process placed in that cgroup. The cgroup is removed afterwards (also on
errors). The limit covers everything the process uses, page cache included: interpreter, numba/LLVM,
the mapped weights.

Modes: `dense` (every FFN neuron each token, the fused block kernel); `sparse` (the numba bundled
sparse FFN on active sets recorded from ../shared/models/rwkv7-ref-58m.pth on held-out text and
replayed onto the shape, rwkv_edge.replay; the kernel's LRU decides what stays); `sparse-window`
(the same, plus rwkv_edge.residency: FFN pages not used in the last --window tokens are paged out
with MADV_PAGEOUT, so the budget goes to the hot set and the non-FFN weights, and the pages a token
needs that are out are requested together with MADV_WILLNEED before the kernel reads them).
Prints one JSON line per mode (tok/s, major faults per token, the cgroup's memory.peak, bytes read
from disk) and a markdown table. The model file is deleted at the end unless --keep.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
SHARED = os.path.join(ROOT, "..", "shared")
CG = "/sys/fs/cgroup"


def run_one(cfg) -> dict:
    """Decode in this process (the child, already inside the cgroup)."""
    import numba
    numba.set_num_threads(1)
    import numpy as np

    from rwkv_edge import memstat
    from rwkv_edge.modelfile import load_modelfile

    def io_read():
        try:
            with open("/proc/self/io") as f:
                return int(next(ln for ln in f if ln.startswith("read_bytes:")).split()[1])
        except (OSError, StopIteration):
            return 0

    t0 = time.perf_counter()
    m = load_modelfile(cfg["file"])
    res = None
    if cfg["mode"] != "dense":
        from rwkv_edge.replay import ActiveSets, replayed_sparse_ffn, ReplayedSets
        sets = ActiveSets.load(cfg["sets"])
        if cfg["mode"] == "sparse":
            m = m.with_ffn(replayed_sparse_ffn(m, sets))
        else:
            from rwkv_edge.residency import resident_sparse_ffn
            rep = ReplayedSets(sets, m.config.n_layer, m.config.ffn_dim)
            ffn = resident_sparse_ffn(m, rep, window=cfg["window"], advice="pageout", prefetch=True)
            m, res = m.with_ffn(ffn), ffn.residency
    rng = np.random.default_rng(0)
    toks = [int(t) for t in rng.integers(1, m.config.vocab_size, cfg["tokens"] + 4)]
    _, st = m.forward(toks[:4])
    load_s = time.perf_counter() - t0
    ru0, io0 = resource.getrusage(resource.RUSAGE_SELF), io_read()
    times = []
    for tok in toks[4:]:
        t = time.perf_counter()
        _, st = m.step(tok, st)
        times.append(time.perf_counter() - t)
    ru1, io1 = resource.getrusage(resource.RUSAGE_SELF), io_read()
    n = len(times)
    out = {"mode": cfg["mode"], "tokens": n, "decode_tok_s": round(n / sum(times), 2),
           "decode_tok_s_median": round(1 / float(np.median(times)), 2), "load_and_prompt_s": round(load_s, 1),
           "major_faults_per_token": round((ru1.ru_majflt - ru0.ru_majflt) / n, 1),
           "disk_read_mib_per_token": round((io1 - io0) / n / 2**20, 1),
           "peak_rss_mib": round(memstat.peak_rss_mib() or 0, 1)}
    dens = getattr(getattr(m, "ffn", None), "density", None)
    if dens:
        out["ffn_density"] = round(float(dens), 3)
    if res is not None:
        s = res.stats()
        out.update(hit_rate=s["hit_rate"], ffn_resident_policy_mib=s["ffn_resident_policy_mib"])
    return out


class MemCgroup:
    """A memory-limited cgroup for one child process, created and removed by this script.

    cgroup v2 (memory.max, memory.swap.max, memory.peak, memory.events) where the unified hierarchy
    has the memory controller; else cgroup v1 (memory.limit_in_bytes, memory.memsw.limit_in_bytes,
    memory.max_usage_in_bytes, memory.failcnt), as on hosts that bind memory to v1 (hybrid mode). The
    new group is nested under this process's own memory cgroup, so it lives inside whatever limits
    this session already has and nothing outside that subtree is touched."""

    def __init__(self, limit_bytes: int):
        self.v2 = _v2_root()
        if self.v2:
            parent = self.v2 + _own_cgroup("")
            sub = _read(os.path.join(parent, "cgroup.subtree_control")).split()
            if "memory" not in sub:
                _write(os.path.join(parent, "cgroup.subtree_control"), "+memory")
        else:
            parent = os.path.join(CG, "memory") + _own_cgroup("memory")
        self.path = os.path.join(parent, f"rwkv-edge-memcap-{os.getpid()}")
        os.mkdir(self.path)
        try:
            if self.v2:
                _write(self._f("memory.max"), limit_bytes)
                if os.path.exists(self._f("memory.swap.max")):
                    _write(self._f("memory.swap.max"), 0)
            else:
                _write(self._f("memory.limit_in_bytes"), limit_bytes)
                if os.path.exists(self._f("memory.memsw.limit_in_bytes")):
                    _write(self._f("memory.memsw.limit_in_bytes"), limit_bytes)
        except OSError:
            self.remove()
            raise
        self.procs = self._f("cgroup.procs")

    def _f(self, name):
        return os.path.join(self.path, name)

    def peak_bytes(self) -> int | None:
        v = _read(self._f("memory.peak" if self.v2 else "memory.max_usage_in_bytes"))
        return int(v) if v else None

    def events(self) -> str:
        if self.v2:
            return _read(self._f("memory.events")).replace("\n", ", ")
        return f"failcnt {_read(self._f('memory.failcnt'))}, oom_control {_read(self._f('memory.oom_control'))}"

    def remove(self) -> None:
        for _ in range(50):             # the child has exited; the group empties within moments
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def _v2_root() -> str | None:
    """The cgroup v2 mount point if its memory controller is usable, else None."""
    for root in (CG, os.path.join(CG, "unified")):
        if "memory" in _read(os.path.join(root, "cgroup.controllers")).split():
            return root
    return None


def _own_cgroup(controller: str) -> str:
    """This process's cgroup path for `controller` ("" = the v2 entry) from /proc/self/cgroup."""
    for line in _read("/proc/self/cgroup").splitlines():
        _, ctrls, path = line.split(":", 2)
        if (controller == "" and ctrls == "") or controller in ctrls.split(","):
            return path.rstrip("/")
    return ""


def _cgroup_ok() -> str | None:
    """None if we can create a memory-limited cgroup here, else the reason."""
    if os.geteuid() != 0:
        return "not root"
    root = _v2_root() or (os.path.join(CG, "memory") if os.path.exists(os.path.join(CG, "memory", "tasks")) else None)
    if root is None:
        return "no cgroup memory controller (neither v2 nor v1)"
    parent = root + _own_cgroup("" if _v2_root() else "memory")
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def _write(path, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _read(path) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _drop_caches() -> None:
    os.sync()
    _write("/proc/sys/vm/drop_caches", 3)


def capped_run(cfg, limit_bytes: int) -> dict:
    """Run one configuration in a child placed in a fresh memory-limited cgroup."""
    cg = MemCgroup(limit_bytes)
    try:
        _drop_caches()
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(cfg)], env=env,
                           capture_output=True, text=True, preexec_fn=lambda: _write(cg.procs, os.getpid()))
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode != 0 or not lines:
            err = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1]
            return {"mode": cfg["mode"], "error": f"{err} (exit {r.returncode}; {cg.events()})"}
        out = json.loads(lines[-1])
        peak = cg.peak_bytes()
        if peak:
            out["cgroup_memory_peak_mib"] = round(peak / 2**20, 1)
        out["limit_mib"] = round(limit_bytes / 2**20, 1)
        out["cgroup"] = "v2" if cg.v2 else "v1"
        return out
    finally:
        cg.remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bench_memcap.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1.5b", help="official shape: 0.1b, 0.4b, 1.5b (default 1.5b)")
    ap.add_argument("--dtype", default="int8", choices=["int8", "fp16"])
    ap.add_argument("--limit-mb", type=float, help="memory.max in MiB (default: half the model file)")
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per mode")
    ap.add_argument("--modes", default="dense,sparse,sparse-window")
    ap.add_argument("--window", type=int, default=4, help="sparse-window: tokens a neuron page stays (default 4)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "out", "memcap"))
    ap.add_argument("--sets", help="active-set recording (default: record from the reference model into --workdir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model file")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    from rwkv_edge.synthetic import SHAPES
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.shape not in SHAPES:
        ap.error(f"--shape: choose one of {', '.join(SHAPES)}")
    if not modes or set(modes) - {"dense", "sparse", "sparse-window"}:
        ap.error("--modes: a comma list of dense, sparse, sparse-window")
    if args.tokens <= 0 or args.window <= 0 or (args.limit_mb is not None and args.limit_mb <= 0):
        ap.error("--tokens, --window and --limit-mb must be > 0")
    why = _cgroup_ok()
    if why:
        print(f"bench_memcap.py: error: cannot set a memory limit: {why}", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    sets = args.sets or os.path.join(args.workdir, "ref58m-active-sets.npz")
    if "sparse" in ",".join(modes) and not args.sets:
        from rwkv_edge.replay import cached_sets
        ref = os.path.join(SHARED, "models", "rwkv7-ref-58m.pth")
        if not os.path.exists(ref):
            ap.error(f"{ref} is needed to record the active sets (or pass --sets)")
        cached_sets(sets, ref, os.path.join(SHARED, "data", "heldout.txt"), 1100)
    path = os.path.join(args.workdir, f"synthetic-{args.shape}-{args.dtype}.rwkve")
    if not os.path.exists(path):
        from rwkv_edge.synthetic import write_synthetic
        free = shutil.disk_usage(args.workdir).free
        print(f"writing {path} (disk free {free / 2**30:.1f} GiB)", file=sys.stderr)
        write_synthetic(path, args.shape, args.dtype)
    size = os.path.getsize(path)
    limit = int(args.limit_mb * 2**20) if args.limit_mb else size // 2
    rows = []
    try:
        for mode in modes:
            cfg = dict(mode=mode, file=path, sets=sets, tokens=args.tokens, window=args.window)
            warm = dict(cfg, tokens=2)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(warm)],
                           capture_output=True, text=True)   # numba cache warm, uncapped
            r = capped_run(cfg, limit)
            r["model_file_mib"] = round(size / 2**20, 1)
            print(json.dumps(r), flush=True)
            rows.append(r)
    finally:
        if not args.keep:
            os.unlink(path)
    print(f"\n{args.shape} {args.dtype}, model file {size / 2**20:.0f} MiB, memory.max {limit / 2**20:.0f} MiB, "
          f"{args.tokens} decode tokens, page cache dropped before each run\n")
    print("| mode | decode tok/s | major faults/token | disk MiB/token | cgroup peak MiB | FFN density | hit rate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['mode']} | error: {r['error']} | | | | | |")
            continue
        print(f"| {r['mode']} | {r['decode_tok_s']} | {r['major_faults_per_token']} | {r['disk_read_mib_per_token']} | "
              f"{r.get('cgroup_memory_peak_mib', '')} | {r.get('ffn_density', 1.0)} | {r.get('hit_rate', '')} |")
    ok = {r["mode"]: r["decode_tok_s"] for r in rows if "error" not in r}
    if "dense" in ok:
        for k, v in ok.items():
            if k != "dense":
                print(f"speedup_{k.replace('-', '_')}_vs_dense={v / ok['dense']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
