#!/usr/bin/env bash
# Issue 17 on the GPU machine, from the repo root: one sweep set file per shape (tools/gpu_decode_sweep.py, as
# `gpu_decode_run.sh sweep` but each shape its own sets): bash tools/gpu_decode_sweep2.sh OUT SETS58 SETS15B
# (SWEEP_PASSES= rounds over the sets, default 2; an empty file name skips that shape).
set -uo pipefail
OUT=$1; S58=${2:-}; SBIG=${3:-}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import rwkv_edge.predictors" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
for SH in "12,512,2048,16384 /tmp/s58 $S58" "24,2048,8192,65536 /tmp/big $SBIG"; do
  set -- $SH
  [ -n "${3:-}" ] || continue
  mapfile -t SETS < <(grep -v '^#' "$3" | sed 's/^/--set=/')
  python3 tools/gpu_decode_sweep.py --shape "$1" --density 0.13 --out "$2" --passes "${SWEEP_PASSES:-2}" \
      "${SETS[@]}" | tee -a "$OUT/sweep.log"
done
