#!/bin/sh
# Honesty checks of `rwkv-edge eval` on a real model: the model against itself (KLD must be 0, same-top-1 1),
# and a fitted bundle recalibrated to keep 5% of the neurons per layer (KLD must be large).
#   sh tools/quality_honesty.sh MODEL.pth COLLECT_DIR BUNDLE.npz TAG [TEXT]      (writes out/bad-TAG.npz)
M=$1; DATA=$2; B=$3; TAG=$4; TEXT=${5:-../shared/data/heldout.txt}; OUT=out
PY=${PY:-python}; RE=${RE:-rwkv-edge}
mkdir -p $OUT
$PY - "$M" "$DATA" "$B" "$OUT/bad-$TAG.npz" <<'PYEOF'
import sys, rwkv_edge
from rwkv_edge.predictors.bundle import PredictorBundle
from rwkv_edge.predictors.fit import recalibrate
m = rwkv_edge.load_model(sys.argv[1])
b = PredictorBundle.load(sys.argv[3], m)
recalibrate(b, m, sys.argv[2], percentiles=[0.95] * m.config.n_layer)
b.save(sys.argv[4])
PYEOF
echo "== $TAG: candidate = base (in-memory, exact)"
$RE eval --model $M --candidate $M --text $TEXT --limit 2048 --no-progress
echo "== $TAG: $B with thresholds raised to keep 5% of the neurons per layer"
$RE eval --model $M --predictors $OUT/bad-$TAG.npz --text $TEXT --limit 2048 --no-progress
