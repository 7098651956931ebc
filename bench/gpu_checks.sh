#!/usr/bin/env bash
# Every GPU check of docs/performance.md in one run on one H100/H200 (about 8 minutes), a table last.
# The GPU machine has torch/timm/accelerate but no deepspeed or webdataset: build their wheels here first
# (`bash ../shared/device/wheels.sh`, into the git-ignored .whl/) and carry .whl; this script installs them.
#   bash bench/gpu_checks.sh            (results also under $OUT, default /tmp/gpu_checks)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
if ! python3 -c "import deepspeed, webdataset" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's FusedAdam build misparses "9.0a"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
BUDGET=${BUDGET_S:-470}
start=$SECONDS

check() {  # check NAME SECONDS COMMAND...: runs unless the budget is spent; its log goes to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - (SECONDS - start)))
  if ((left < 30)); then echo "$name: skipped (budget spent)" >>"$OUT/summary.txt"; return; fi
  ((limit > left)) && limit=$left
  echo "=== $name ($*)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\[" | tail -n 6
  echo "$name: rc=${PIPESTATUS[0]} | $(grep -E "ratio|img/s|^check " "$OUT/$name.log" | tail -n 5 | tr '\n' '|')" >>"$OUT/summary.txt"
}

# the recipes' own settings (ZeRO auto, compile, buckets) at the accumulation of an 8-GPU node (4096 / (mb x 8))
check train_L16_recipe 200 python3 bench/train_throughput.py --recipe vit_l16_in21k --accum 4
check finetune_L16_384 150 python3 bench/finetune_throughput.py
# decode="gpu" vs torchvision's batched decode alone (ratio last), its agreement with decode="cpu", and the
# data-wait share of a ViT-L/16 training loop fed by it
check loader_gpu 90 python3 bench/loader.py --gpu-decode --images 4096 --batch 256 --workers 8
check train_H14_recipe 200 python3 bench/train_throughput.py --recipe vit_h14_in21k --accum 8
echo; echo "=== summary ($(cat "$OUT/gpu.txt"))"; cat "$OUT/summary.txt"
