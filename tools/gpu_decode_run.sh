#!/usr/bin/env bash
# Issue 17 on the GPU machine, from the repo root: bash tools/gpu_decode_run.sh STEP OUT [DATA]
#   tests  tests/test_cuda_decode.py and tests/test_cuda.py (TESTS= overrides the files)
#   ref    tools/gpu_decode_bench.py on rwkv7-ref-58m (DATA/ref58m_int8.npz: the pack of
#          `tools/gpu_check.py pack-ref`, dequantized to a fp16 .pth; without it DATA/ref58m_nohead.npz
#          and a random head); predictor fitted on DATA/heldout_ids.npy
#   big    tools/gpu_decode_bench.py at the official 1.5B shapes (random fp16, density 0.13; the
#          checkpoint and bundle in /tmp/big are reused), then the per-kernel profile
#   tune   tools/gpu_decode_tune.py at the same shapes (launch-shape search; TUNE_ARGS= knob lists)
#   sweep  tools/gpu_decode_sweep.py A/B tables at 58M shapes (random 12 x 512, F 2048, V 16384, density
#          0.13) and at the 1.5B shapes: SWEEP_SETS= a file of --set NAME=JSON lines (default
#          tools/gpu_decode_sets.txt), SWEEP_SETS58= / SWEEP_SETS_BIG= a file for one shape only (set but
#          empty: that shape is skipped), SWEEP_PASSES= rounds over the sets (default 2), SWEEP_BUDGET= seconds
#          after which no further pass starts (per shape; default no limit)
# BENCH_ARGS= extra tools/gpu_decode_bench.py arguments (e.g. --rows dense,exact --no-eager).
# The `rwkv` wheel, if carried in DATA/whl, is installed to /tmp/site first.
set -uo pipefail
STEP=$1; OUT=$2; DATA=${3:-out/gpu}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ls "$DATA"/whl/*.whl >/dev/null 2>&1 && [ ! -d /tmp/site/rwkv ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$DATA"/whl/*.whl
fi
export PYTHONPATH=$PYTHONPATH:/tmp/site
# rwkv_edge.predictors/quant/export are mapped folders: install this tree (editable, no network)
python3 -c "import rwkv_edge.predictors" 2>/dev/null || \
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || echo "pip install -e . failed"
BIG="--shape 24,2048,8192,65536 --density 0.13 --calib 512 --out /tmp/big --reuse"
case $STEP in
  tests) python3 -m pytest -q ${TESTS:-tests/test_cuda_decode.py tests/test_cuda.py} 2>&1 | tail -25 ;;
  ref)
    PACK=$DATA/ref58m_int8.npz; [ -f "$PACK" ] || PACK=$DATA/ref58m_nohead.npz
    [ -f /tmp/ref58m.pth ] || python3 - "$PACK" <<'PY'
import sys, torch
sys.path.insert(0, "tools")
import gpu_check
gpu_check.unpack_ref(sys.argv[1], "/tmp/ref58m.pth")
sd = torch.load("/tmp/ref58m.pth", weights_only=True)
if "head.weight" not in sd:   # the pack without head.weight: speed and densities do not depend on it
    V, D = sd["emb.weight"].shape
    sd["head.weight"] = (torch.randn(V, D, generator=torch.Generator().manual_seed(0)) * 0.05).half()
    torch.save(dict(sorted(sd.items())), "/tmp/ref58m.pth")
    print("# random head (the pack has none)")
PY
    python3 tools/gpu_decode_bench.py --model /tmp/ref58m.pth --calib-ids "$DATA/heldout_ids.npy" --calib 2048 \
        --out "$OUT/ref" ${BENCH_ARGS:-} ;;
  big)
    python3 tools/gpu_decode_bench.py $BIG ${BENCH_ARGS:-}; cp /tmp/big/rows.jsonl "$OUT/big_rows.jsonl"
    python3 tools/gpu_decode_profile.py /tmp/big/shape_24x2048.pth /tmp/big/bundle.npz ;;
  tune)
    [ -f /tmp/big/bundle.npz ] || python3 tools/gpu_decode_bench.py $BIG --rows predicted --no-eager --tokens 64 | tail -2
    python3 tools/gpu_decode_tune.py /tmp/big/shape_24x2048.pth /tmp/big/bundle.npz ${TUNE_ARGS:-} ;;
  sweep)
    ALL=${SWEEP_SETS:-tools/gpu_decode_sets.txt}
    for SH in "12,512,2048,16384 /tmp/s58 ${SWEEP_SETS58-$ALL}" "24,2048,8192,65536 /tmp/big ${SWEEP_SETS_BIG-$ALL}"; do
      set -- $SH
      [ -n "${3:-}" ] || continue
      mapfile -t SETS < <(grep -v '^#' "$3" | sed 's/^/--set=/')
      python3 tools/gpu_decode_sweep.py --shape "$1" --density 0.13 --out "$2" --passes "${SWEEP_PASSES:-2}" \
          --budget-s "${SWEEP_BUDGET:-0}" \
          "${SETS[@]}" | tee -a "$OUT/sweep.log"
    done ;;
esac
