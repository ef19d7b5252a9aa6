#!/bin/bash
# One GPU call for issue 17's user-facing fused decode (generate.batch1_step): the GPU tests of
# Generation on cuda, then decode tok/s through open_model + Generation (tools/gpu_generate_bench.py)
# on the embedded tiny model and a random 58M-shape model (dense and sparse, fused decode forced off
# vs on), a CLI smoke run, then with the time left of BUDGET seconds the fused step's own tests and a
# random 1.5B-shape model. Logs under OUT.
#   bash tools/gpu_generate_run.sh OUT [BUDGET]
set -uo pipefail
OUT=$1; BUDGET=${2:-230}; S=$SECONDS
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# rwkv_edge.predictors/quant/export are mapped folders (pyproject): links instead of an install
for d in predictors quant export; do [ -e rwkv_edge/$d ] || ln -s ../$d rwkv_edge/$d; done
left() { echo $((BUDGET - (SECONDS - S))); }
timeout 70 python3 -m pytest -q -rf -p no:cacheprovider tests/test_cuda_generate.py >"$OUT/tests_generate.log" 2>&1
tail -8 "$OUT/tests_generate.log"; echo "# t=$((SECONDS - S))s"
timeout 50 python3 tools/gpu_generate_bench.py --model rwkv_edge/data/default \
    --predictors rwkv_edge/data/default/predictors.npz 2>&1 | tee "$OUT/bench_tiny.log"
echo "# t=$((SECONDS - S))s"
timeout "$(left)" python3 tools/gpu_generate_bench.py --shape 12,512,2048,16384 --out /tmp/s58 2>&1 | tee "$OUT/bench_58m.log"
echo "# t=$((SECONDS - S))s"
[ "$(left)" -gt 15 ] && timeout "$(left)" python3 -m rwkv_edge.cli generate --device cuda --dtype fp16 --max-tokens 24 \
    --prompt "The" 2>&1 | tail -3 | tee "$OUT/cli.log"
if [ "$(left)" -gt 25 ]; then   # the CUDA sparse FFN (DeviceSparseFFN) and captured-step tests
  timeout "$(left)" python3 -m pytest -q -rf -p no:cacheprovider tests/test_cuda.py -k "sparse or captured" \
      >"$OUT/tests_cuda.log" 2>&1
  tail -4 "$OUT/tests_cuda.log"
fi
if [ "$(left)" -gt 30 ]; then   # the fused step's own tests (a cut run leaves its progress in the log)
  timeout "$(left)" python3 -m pytest -q -rf -p no:cacheprovider tests/test_cuda_decode_early.py \
      tests/test_cuda_decode.py >"$OUT/tests_decode.log" 2>&1
  tail -6 "$OUT/tests_decode.log"
fi
if [ "$(left)" -gt 60 ]; then
  timeout "$(left)" python3 tools/gpu_generate_bench.py --shape 24,2048,8192,65536 --out /tmp/big --tokens 128 \
      --rounds 2 2>&1 | tee "$OUT/bench_big.log"
fi
echo "# done t=$((SECONDS - S))s"
