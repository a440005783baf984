#!/usr/bin/env bash
# The device machine's side of the GPU validation (bench/gpu_bundle.py packs .gpu/ here first; the device tool's run
# carries it): install the carried wheels, run bench/gpu_check.py, and leave its files in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  WANDB_MODE=disabled TRINITY_DPO_CACHE="${TMPDIR:-/tmp}/trinity-dpo-cache"
OUT="${OUT:-/tmp/gpu_out}"
mkdir -p "$OUT"
# Resolved against the image's own packages first; where that fails, the newest carried wheels without their pins.
python3 -m pip install -q --no-index --find-links .gpu/wheels trl==1.16.0 datasets omegaconf 2>&1 | tail -5 ||
  python3 -m pip install -q --no-index --no-deps --find-links .gpu/wheels trl==1.16.0 datasets dill multiprocess \
    omegaconf
python3 -m pip list 2>/dev/null | grep -iE "^(torch|transformers|tokenizers|peft|accelerate|trl|datasets|pyarrow|huggingface.hub) "
nvidia-smi -L || true
timeout 560 python3 bench/gpu_check.py 2>&1 | tee "$OUT/gpu_check.log"
rc=${PIPESTATUS[0]}
cp docs/gpu.md "$OUT/" 2>/dev/null
cp docs/benchmarks_gpu.md "$OUT/" 2>/dev/null
exit "$rc"
