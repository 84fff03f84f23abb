#!/usr/bin/env bash
# GPU checks in one prepared script (under 8 minutes on one H200): the GPU test subset, then the
# ~1B Llama-shaped population (4 members, bf16) with 4 workers sharing one GPU
# (gpus_per_worker: 0.25): offspring per second, peak GPU memory per worker against the memory
# model (model + scratch), build vs copy on the device. Figures go to $OUT (or /tmp).
#
#   bash benchmarks/gpu_check.sh            # from the repository root, on the GPU machine
#
# With Ray installed the population runs on Ray actors (num_gpus 0.25 each); without it (the
# lent H200 image has no Ray, and its wheel is over the device tool's 64 MiB carry limit) the
# same worker objects run in one process on the GPU (--no-ray), which is the same packing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/evoray-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"

echo "== GPU tests"
timeout 200 $PY -m pytest tests/test_gpu_paths.py -q -rs -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log"

echo "== 1B population, 4 workers at 0.25 GPU"
if $PY -c "import ray" 2>/dev/null; then RAY=(); else RAY=(--no-ray); fi
timeout 300 $PY benchmarks/scale_memory.py --device cuda --workers 4 --gpus-per-worker 0.25 \
  --dir /tmp "${RAY[@]}" 2>&1 | tee "$OUT/scale_memory.log"
echo "figures: $OUT"
