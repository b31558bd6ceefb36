#!/usr/bin/env bash
# The end-to-end GPU benchmark of the replay: for each named real trace, a GPT-OSS-format store
# whose layers, experts and top-k match the trace (expert dims scaled to hidden = intermediate
# = $DIM so every store fits the disk), then `prefetch-bench replay --baselines` at VRAM 10% and
# 25% of all experts, RAM 50%. Figures as JSON (+ PNG) under $OUT (or WORKDIR).
#   usage: pipeline/bench/gpu_replay.sh TRACES_DIR WORKDIR TRACE_NAME...
#   env:   DIM (512; "full": GPT-OSS-20B's own expert dims), TOKENS (passes per method, 300),
#          DTYPES ("mxfp4"), RAM (0.5 of all experts), EXTRA (more replay flags, e.g.
#          "--expert-math mxfp4"), MODEL_DIR (where the checkpoints go, default WORKDIR: at full
#          size a checkpoint and its store together may not fit one disk, so e.g. /dev/shm),
#          KEEP_MODEL (1; 0 deletes each checkpoint once its stores are built), LAYERS (all; N:
#          stores of N layers replaying the trace's first N, e.g. full size on a small disk),
#          MXFP4_MATH (0; 1 adds --expert-math mxfp4 to the MXFP4 stores' replays only, so that
#          DTYPES="mxfp4 bfloat16" compares the two on one checkpoint), REPEAT (1: runs per
#          method, the median reported; 3 or more on a shared machine, see docs/benchmarking.md),
#          WARM (0: --warm-passes, untimed passes of the trace's own history before the timed
#          ones, so each cache starts where real routing left it, as Belady's warm start does)
set -euo pipefail
cd "$(dirname "$0")/../.."
traces=$1 work=$2
shift 2
out=${OUT:-$work}
dim=${DIM:-512} tokens=${TOKENS:-300} dtypes=${DTYPES:-mxfp4} ram=${RAM:-0.5} extra=${EXTRA:-} repeat=${REPEAT:-1} warm=${WARM:-0}
models=${MODEL_DIR:-$work}
dims=(--hidden "$dim" --intermediate "$dim")
[ "$dim" = full ] && dims=()
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
mkdir -p "$work" "$out" "$models"
for name in "$@"; do
  trace="$traces/$name.npz"
  read -r L E K < <($py -c "import json,sys,numpy as np; m=json.loads(str(np.load(sys.argv[1])['meta'])); print(m['num_layers'], m['num_experts'], m['top_k'])" "$trace")
  first=()
  if [ -n "${LAYERS:-}" ]; then
    if ! [ "$LAYERS" -ge 1 ] 2>/dev/null || [ "$LAYERS" -gt "$L" ]; then
      echo "gpu_replay.sh: LAYERS=$LAYERS but $name has $L MoE layers; give 1..$L" >&2; exit 2
    fi
    L=$LAYERS first=(--layers "$LAYERS") name="$name-first$LAYERS"
  fi
  model="$models/$name-model"
  [ -d "$model" ] || $py bin/make-model --format gpt-oss --preset gpt-oss-20b --layers "$L" --experts "$E" \
      --top-k "$K" ${dims[@]+"${dims[@]}"} --seed 0 --out "$model"
  for d in $dtypes; do
    store="$work/$name-$d"
    [ -d "$store" ] || $py bin/precompute --model "$model" --out "$store" --dtype "$d" --workers 12 --no-progress
  done
  if [ "${KEEP_MODEL:-1}" = 0 ]; then rm -rf "$model"; fi
  for d in $dtypes; do
    store="$work/$name-$d"
    math=""
    if [ "${MXFP4_MATH:-0}" = 1 ] && [ "$d" = mxfp4 ]; then math="--expert-math mxfp4"; fi
    echo "== replay $name ($d, ${L}x${E} top-$K, hidden=intermediate=$dim, $tokens passes per method)"
    $py bin/prefetch-bench replay --store "$store" --trace "$trace" --vram 0.1 --vram 0.25 --ram "$ram" \
        --baselines --tokens "$tokens" --repeat "$repeat" --warm-passes "$warm" --no-progress ${first[@]+"${first[@]}"} $extra $math \
        --json "$out/replay-$name-$d.json" --plot "$out/replay-$name-$d.png"
  done
done
