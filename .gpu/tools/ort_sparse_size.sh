#!/usr/bin/env bash
# ONNX Runtime (CPU, 1 thread): dense int8 vs exact-sparse int8 (model.exact.onnx: only the W_v
# rows of active neurons) vs top-k sparse int8 (model.sparse.onnx, 2-bit W_k predictor) decode at
# given RWKV-7 shapes, random weights whose FFN active density is set near DENSITY (speed only;
# tools/gpu_decode_bench.py make_shaped):
#   bash tools/ort_sparse_size.sh LAYERS N_EMBD TOPK [DENSITY] [WORKDIR]
#   e.g. 0.4B shapes, density 0.13, top-k 13% of F = 4096: bash tools/ort_sparse_size.sh 24 1024 532
# Prints tokens per CPU-second (process time) per graph (sparse-l4: the top-k graph with
# onnxruntime's default MatMulNBits accuracy level 4 for the predictor instead of the sidecar's
# exact level 1), ROUNDS (3) rounds in turn, the medians,
# the measured exact density and the exact graph's max |logit diff| against the dense graph.
set -euo pipefail
L=$1; D=$2; K=$3; DEN=${4:-0.13}; W=${5:-/tmp/ort-size}
PY=${PYTHON:-python3}
mkdir -p "$W"
[ -f "$W/m_${L}x${D}.pth" ] || $PY -c "
import sys; sys.path.insert(0, 'tools')
from gpu_decode_bench import make_shaped
make_shaped('$W/m_${L}x${D}.pth', $L, $D, 4 * $D, 65536, $DEN, device='cpu')"
[ -f "$W/onnx_${L}x${D}/model.json" ] || nice -n 19 $PY -m rwkv_edge.cli export-onnx --model "$W/m_${L}x${D}.pth" \
    --out "$W/onnx_${L}x${D}" --dtype int8 --predictor-bits 2 --sparse-topk "$K" --no-prefill --exact-sparse
flock -x /work/wt/bench.lock $PY - "$W/onnx_${L}x${D}" "${ROUNDS:-3}" <<'PY'
import statistics, sys, time
import numpy as np
from rwkv_edge.export.run_ort import OrtModel
ms = {v: OrtModel(sys.argv[1], v, threads=1) for v in ("dense", "exact", "sparse")}
# the top-k graph's 2-bit predictor runs as MatMulNBits; the sidecar asks for accuracy level 1
# (fp32 activations, exact); without it onnxruntime uses level 4 (int8 activations, faster)
ms["sparse-l4"] = OrtModel(sys.argv[1], "sparse", exact=False, threads=1)
rates = {v: [] for v in ms}
for r in range(int(sys.argv[2])):
    for v, m in ms.items():
        st = m.zero_state()
        for t in range(4):
            _, st = m.step(t + 1, st)
        c = time.process_time()
        for t in range(32):
            _, st = m.step(t + 5, st)
        rates[v].append(32 / (time.process_time() - c))
        print(f"round {r} int8 {v}: {rates[v][-1]:.1f} tok per CPU-s", flush=True)
med = {v: statistics.median(x) for v, x in rates.items()}
print("medians (tok per CPU-s, 1 thread): " + ", ".join(f"{v} {x:.1f}" for v, x in med.items())
      + f"; exact/dense {med['exact'] / med['dense']:.2f}, sparse/dense {med['sparse'] / med['dense']:.2f}, "
      f"sparse-l4/dense {med['sparse-l4'] / med['dense']:.2f}")
# exactness and the density the exact graph ran at: logits of both graphs on the same tokens
a, b = ms["dense"], ms["exact"]
sa, sb, mx = a.zero_state(), b.zero_state(), 0.0
for t in range(8):
    la, sa = a.step(t + 1, sa)
    lb, sb = b.step(t + 1, sb)
    mx = max(mx, float(np.abs(la - lb).max()))
print(f"exact vs dense graph: max |logit diff| {mx:.3g}")
PY
