#!/usr/bin/env bash
# Issue 17 on the GPU machine, from the repo root: one sweep set file per shape,
# bash tools/gpu_decode_sweep2.sh OUT SETS58 SETS15B (an empty file name skips that shape; SWEEP_PASSES= as
# there): `tools/gpu_decode_run.sh sweep` with SWEEP_SETS58 / SWEEP_SETS_BIG.
SWEEP_SETS58=${2:-} SWEEP_SETS_BIG=${3:-} exec bash "$(dirname "$0")/gpu_decode_run.sh" sweep "$1"
