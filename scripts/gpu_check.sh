#!/usr/bin/env bash
# The course's GPU check, for one large NVIDIA GPU with no internet (about 8 minutes on an H200):
#   peak memory of one QLoRA step on randomly initialised LLaMA-7B and -13B vs the estimator,
#   bitsandbytes' real paged optimizer surviving a long batch that OOMs plain AdamW (notebook 04),
#   and QLoRA vs 16-bit LoRA steps per second. Writes one JSON: ${OUT:-build}/gpu_check.json.
# If bitsandbytes (and the other pinned packages) are not installed there, put their wheels in .whl/ first:
# they are installed into /tmp/site. CPU dry run of the same code: python -m qlora_lab.gpu_check --dry-run --out x.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
out="${OUT:-build}/gpu_check.json"
timeout 540 python3 -m qlora_lab.gpu_check --out "$out"
