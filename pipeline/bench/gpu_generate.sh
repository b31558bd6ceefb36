#!/usr/bin/env bash
# The transformers benchmark on a GPU, in one go: the hf tests on CUDA, a GPT-OSS-20B-shaped
# checkpoint (24 layers x 32 experts, top-4, random MXFP4 weights in the published main-folder
# layout), its MXFP4 store, then `prefetch-bench generate --baselines`. Figures under $OUT.
#   usage: pipeline/bench/gpu_generate.sh WORKDIR
#   env:   TESTS (1; 0 skips the tests), PROMPT (512), NEW (128), ACC_NEW (8: accelerate's tokens), VRAM ("0.1 0.25 1.0"), REPEAT (1)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$1 out=${OUT:-$1}
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1
mkdir -p "$work" "$out"
[ "${TESTS:-1}" = 0 ] || $py -m pytest -q -x -p no:cacheprovider tests/test_hf_models.py 2>&1 | tail -15 | tee "$out/tests.log" || true
model=$work/gpt-oss-20b
[ -d "$model" ] || $py bin/make-model --format hf --arch gpt_oss --preset gpt-oss-20b --shards 8 --workers 16 --out "$model"
[ -f "$model/expert_store/store.json" ] || $py bin/precompute --model "$model" --dtype mxfp4 --workers 8 --no-progress
vram=()
for v in ${VRAM:-0.1 0.25 1.0}; do vram+=(--vram "$v"); done
$py bin/prefetch-bench generate --model "$model" "${vram[@]}" --ram 1.0 --prompt-tokens "${PROMPT:-512}" \
  --new-tokens "${NEW:-128}" --accelerate-new-tokens "${ACC_NEW:-8}" --repeat "${REPEAT:-1}" --baselines \
  --json "$out/generate-gpt-oss-20b.json" 2>&1 | tee "$out/generate.log"
