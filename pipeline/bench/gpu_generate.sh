#!/usr/bin/env bash
# The transformers benchmark on a GPU, in one go: the hf tests on CUDA, a GPT-OSS-20B-shaped
# checkpoint (24 layers x 32 experts, top-4, random MXFP4 weights in the published main-folder
# layout), its MXFP4 store, then `prefetch-bench generate`. Figures under $OUT (default WORKDIR).
#   usage: pipeline/bench/gpu_generate.sh WORKDIR
#   env:   TESTS (1; 0 skips the tests), PROMPT (512), NEW (128), ACC_NEW (8: accelerate's tokens),
#          VRAM ("0.1 0.25 1.0"), REPEAT (3 interleaved rounds), METHODS (default: every baseline),
#          NAME (generate-gpt-oss-20b: the JSON's and log's name)
set -euo pipefail
cd "$(dirname "$0")/../.."
work=$1 out=${OUT:-$1} name=${NAME:-generate-gpt-oss-20b}
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
export PYTHONUNBUFFERED=1
mkdir -p "$work" "$out"
[ "${TESTS:-1}" = 0 ] || $py -m pytest -q -x -p no:cacheprovider tests/test_hf_models.py tests/test_hf_kernels.py 2>&1 | tail -15 | tee "$out/tests.log" || true
model=$work/gpt-oss-20b
[ -f "$model/config.json" ] || $py bin/make-model --format hf --arch gpt_oss --preset gpt-oss-20b --shards 8 --workers 16 --out "$model"
[ -f "$model/expert_store/store.json" ] || $py bin/precompute --model "$model" --dtype mxfp4 --workers 8 --no-progress
vram=()
for v in ${VRAM:-0.1 0.25 1.0}; do vram+=(--vram "$v"); done
methods=(--baselines)
[ -n "${METHODS:-}" ] && methods=(--methods $METHODS)
$py bin/prefetch-bench generate --model "$model" "${vram[@]}" --ram 1.0 --prompt-tokens "${PROMPT:-512}" \
  --new-tokens "${NEW:-128}" --accelerate-new-tokens "${ACC_NEW:-8}" --repeat "${REPEAT:-3}" "${methods[@]}" \
  --json "$out/$name.json" 2>&1 | tee "$out/$name.log"
