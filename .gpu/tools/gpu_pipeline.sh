#!/usr/bin/env bash
# Issue 5 measurements on a machine with an NVIDIA GPU (run from the repo root):
#   bash tools/gpu_pipeline.sh MODEL.pth TEXT BUNDLE_OUT_DIR
# collect + fit on the GPU (timed), the CUDA test suite, GPU vs numpy logits (tools/gpu_compare.py,
# exits 1 when a dtype is over its tolerance: bf16 of this float16 checkpoint is, by the weights'
# own rounding) and tools/bench.py --device cuda.
set -euo pipefail
M=$1; TEXT=$2; W=${3:-/tmp/rwkv-edge-gpu}
mkdir -p "$W"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q tests/test_cuda.py tests/test_sparse.py 2>&1 | tail -3
t0=$(date +%s.%N)
python3 -m rwkv_edge.cli collect --model "$M" --text "$TEXT" --out "$W/act" --tokens 100000 --device cuda --no-progress
t1=$(date +%s.%N)
python3 -m rwkv_edge.cli fit-predictors --model "$M" --data "$W/act" --kind quantized --bits 2 --target-recall 0.99 --out "$W/q2.npz" --no-progress
t2=$(date +%s.%N)
python3 -m rwkv_edge.cli fit-predictors --model "$M" --data "$W/act" --kind mlp --target-recall 0.99 --device cuda --out "$W/mlp.npz" --no-progress
t3=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$t3" <<'PY'
import sys
t = [float(v) for v in sys.argv[1:]]
print(f"gpu_collect_100k_s={t[1]-t[0]:.1f} fit_q2_s={t[2]-t[1]:.1f} fit_mlp_cuda_s={t[3]-t[2]:.1f}")
PY
python3 tools/gpu_compare.py --model "$M" --predictors "$W/q2.npz" --fast --weights-ref --rwkv || true
python3 tools/bench.py --model "$M" --predictors "$W/q2.npz" --device cuda --dtype fp32,fp16,bf16 --compare-rwkv \
    --tokens 64 --rounds 5 --prefill-tokens 4096
python3 -m rwkv_edge.cli generate --model "$M" --device cuda --dtype fp16 --prompt "The old man" --max-tokens 32 --temperature 0
python3 -m rwkv_edge.cli generate --model "$M" --device cuda --predictors "$W/q2.npz" --prompt "The old man" --max-tokens 32 --temperature 0
