#!/usr/bin/env bash
# The pipeline's GPU check in one run: builds a store with GPT-OSS-20B's expert
# dimensions (2 MoE layers x 32 experts, bf16 and mxfp4), runs the GPU-marked tests, then
# `prefetch-bench limits` on each store: disk and H2D hops against their raw limits measured
# in the same run, and fetch overhead for resident experts. Short table last.
#   usage: pipeline/bench/gpu_limits.sh [WORKDIR]     (figures as JSON under $OUT if set)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-/tmp/tlmc-gpu}
out=${OUT:-$work}
mkdir -p "$work" "$out"
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
[ -d "$work/model" ] || $py bin/make-model --format gpt-oss --preset gpt-oss-20b --layers 2 --seed 0 --out "$work/model"
for d in bfloat16 mxfp4; do
  $py bin/precompute --model "$work/model" --out "$work/$d" --dtype "$d" --workers 8 --no-progress
done
$py -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -5
for d in bfloat16 mxfp4; do
  echo "== $d"
  $py bin/prefetch-bench limits --store "$work/$d" --readers 4 --json "$out/limits-$d.json"
done
