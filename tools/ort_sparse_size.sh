#!/usr/bin/env bash
# ONNX Runtime (CPU, 1 thread): dense int8 vs sparse int8 decode at given RWKV-7 shapes, random weights
# (speed only): bash tools/ort_sparse_size.sh LAYERS N_EMBD TOPK [WORKDIR]
#   e.g. 0.4B shapes, top-k 13% of F = 4096: bash tools/ort_sparse_size.sh 24 1024 532
# Prints tokens per CPU-second (process time) and per wall second, dense then sparse, twice.
set -euo pipefail
L=$1; D=$2; K=$3; W=${4:-/tmp/ort-size}
PY=${PYTHON:-python3}
mkdir -p "$W"
$PY -c "
import sys; sys.path.insert(0, 'tests')
from checkpoints import make_checkpoint
make_checkpoint('x070', '$W/m.pth', n_layer=$L, n_embd=$D, head_size=64, vocab_size=65536, dtype='float16')"
$PY -m rwkv_edge.cli export-onnx --model "$W/m.pth" --out "$W/onnx" --dtype int8 --predictor-bits 2 \
    --sparse-topk "$K" --no-prefill
flock /work/wt/bench.lock $PY - "$W/onnx" <<'PY'
import sys, time
from rwkv_edge.export.run_ort import OrtModel
for v in ("dense", "sparse", "dense", "sparse"):
    m = OrtModel(sys.argv[1], v, threads=1)
    st = m.zero_state()
    for t in range(4):
        _, st = m.step(t + 1, st)
    c, w = time.process_time(), time.perf_counter()
    for t in range(24):
        _, st = m.step(t + 5, st)
    print(f"int8 {v}: {24 / (time.process_time() - c):.1f} tok per CPU-s, "
          f"{24 / (time.perf_counter() - w):.1f} tok/s wall (1 thread)", flush=True)
PY
