"""Startup and footprint of the default path: time to first token and peak RSS of
`rwkv-edge generate --max-tokens 1` in fresh processes (numba cache warm), plus where the time goes.

    python tools/startup.py [--model M] [--runs 7] [--backend auto] [--prompt "The old man"]

Each run is a new interpreter running the CLI in-process (rwkv_edge.cli.main) that reports its own
peak RSS (VmHWM) at exit; time to first token is measured from the process start to the first byte
of generated text on stdout. One warm-up run first fills the numba cache. The breakdown run times
the imports, opening the model and the first forward inside one process.
Last line: `ttft_s_median=... ttft_s_min=... peak_rss_mib_median=... runs=N`.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

# runs the CLI in-process, then prints the process's peak RSS (KiB) on stderr
_WRAPPER = """
import sys
from rwkv_edge.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]
print('peak_rss_kib=' + (hwm[0].split()[1] if hwm else '0'), file=sys.stderr)
sys.exit(rc)
"""

_BREAKDOWN = """
import time, sys
t0 = time.perf_counter()
import rwkv_edge.cli
from rwkv_edge.runtime import open_model, default_model_path
from rwkv_edge.tokenizer import load_tokenizer
t1 = time.perf_counter()
import numba
t2 = time.perf_counter()
path = sys.argv[1] or default_model_path()
m = open_model(path, backend=sys.argv[2])
tok = load_tokenizer(None, path, m.config.vocab_size)
t3 = time.perf_counter()
ids = [0] + tok.encode(sys.argv[3])
logits, s = m.forward(ids)
t4 = time.perf_counter()
print(f"import_rwkv_edge_s={t1 - t0:.3f} import_numba_s={t2 - t1:.3f} open_model_s={t3 - t2:.3f} "
      f"first_forward_s={t4 - t3:.3f} ({len(ids)} tokens)")
"""


def _one(cmd) -> tuple[float, float]:
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.read(1)
    ttft = time.perf_counter() - t0
    _, err = p.communicate()
    if p.returncode != 0 or not first:
        raise SystemExit(f"startup.py: error: run failed: {err.decode(errors='replace').strip().splitlines()[-1:]}")
    rss = [l for l in err.decode(errors="replace").splitlines() if l.startswith("peak_rss_kib=")]
    return ttft, int(rss[-1].split("=")[1]) / 1024 if rss else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="startup.py", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="", help="model path (default: the embedded model)")
    ap.add_argument("--backend", default="auto", choices=["auto", "native", "numba", "reference"])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--prompt", default="The old man")
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be >= 1")
    cli = ["generate", "--prompt", args.prompt, "--max-tokens", "1", "--temperature", "0", "--backend", args.backend]
    if args.model:
        cli += ["--model", args.model]
    cmd = [sys.executable, "-c", _WRAPPER, *cli]
    _one(cmd)                                           # warm-up: fills the numba cache if cold
    ttfts, rsss = [], []
    for _ in range(args.runs):
        t, r = _one(cmd)
        ttfts.append(t)
        rsss.append(r)
    print(f"ttft_s: {' '.join(f'{t:.2f}' for t in ttfts)}")
    print(f"peak_rss_mib: {' '.join(f'{r:.0f}' for r in rsss)}")
    b = subprocess.run([sys.executable, "-c", _BREAKDOWN, args.model, args.backend, args.prompt],
                       capture_output=True, text=True)
    print(f"breakdown (one process): {b.stdout.strip() or b.stderr.strip().splitlines()[-1:]}")
    print(f"ttft_s_median={statistics.median(ttfts):.2f} ttft_s_min={min(ttfts):.2f} "
          f"peak_rss_mib_median={statistics.median(rsss):.0f} runs={args.runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
