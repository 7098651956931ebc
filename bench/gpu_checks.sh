#!/usr/bin/env bash
# Every GPU check of docs/performance.md on one H100/H200, a table last. The GPU machine has torch, timm and
# accelerate but not deepspeed, webdataset, torchao or torchcodec: build their wheels HERE first (git-ignored .whl/):
#   bash bench/gpu_checks.sh --wheels                 (on the development machine, once; needs ../shared/device)
# then, on the GPU machine, carrying .whl:
#   bash bench/gpu_checks.sh                          (every check, in the order below, within BUDGET_S seconds)
#   CHECKS="finetune_L16_384 fp8" bash bench/gpu_checks.sh      (some of them: a second call for what the
#                                                      budget skipped; the summary names those)
# Results (one log per check + summary.txt) also go under $OUT, default /tmp/gpu_checks.
set -uo pipefail
if [[ ${1:-} == --wheels ]]; then
  set -e
  bash ../shared/device/wheels.sh .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl \
    "$(grep '^torchao==' constraints.txt | cut -d' ' -f1)" "$(grep '^torchcodec==' constraints.txt | cut -d' ' -f1)"
  exit 0
fi
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
: >"$OUT/summary.txt"
if ! python3 -c "import deepspeed, webdataset, torchao, torchcodec" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} TORCH_CUDA_ARCH_LIST=9.0  # DeepSpeed's FusedAdam build misparses "9.0a"
gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader); echo "$gpu"
BUDGET=${BUDGET_S:-540}  # run with timeout_s 600: pip + nvidia-smi take ~20 s
CHECKS=${CHECKS:-train_L16_recipe end_to_end loader_gpu train_H14_recipe dropout_masks finetune_L16_384 fp8}
start=$SECONDS

# check NAME SECONDS COMMAND...: runs if CHECKS names it and 3/5 of its limit (the limits are ~1.3x the H200's
# times) is left of the budget, cut to what is left; its log in $OUT/NAME.log
check() {
  local name=$1 limit=$2; shift 2
  [[ " $CHECKS " == *" $name "* ]] || return 0
  local left=$((BUDGET - (SECONDS - start)))
  if ((left * 5 < limit * 3)); then
    echo "$name: skipped ($left s of the budget left; rerun with CHECKS=\"$name\")" >>"$OUT/summary.txt"; return
  fi
  ((limit > left)) && limit=$left
  echo "=== $name ($*)"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\[" | tail -n 8
  echo "$name: rc=${PIPESTATUS[0]} $((SECONDS - t0))s | $(grep -E "ratio|img/s|^check |verdict" "$OUT/$name.log" | tail -n 6 | tr '\n' '|')" >>"$OUT/summary.txt"
}

# the shards of the end-to-end check are written on the CPU beside the first check (which keeps the GPU busy)
if [[ " $CHECKS " == *" end_to_end "* ]]; then
  python3 -c "from pathlib import Path; from bench.end_to_end import make_shards; \
make_shards(Path('/tmp/e2e_shards'), 8192, 1000, 4)" >"$OUT/e2e_shards.log" 2>&1 &
  shards_pid=$!
  trap 'kill "$shards_pid" 2>/dev/null' EXIT  # ended with the script on every way out (a timeout, ^C)
fi
# pre-training at the recipes' own settings (ZeRO auto, compile, buckets) at the accumulation of an 8-GPU node
# (4096 / (mb x 8)) vs a compiled timm loop with the same accumulation; then each one's kernel time by kind
check train_L16_recipe 240 python3 bench/train_throughput.py --recipe vit_l16_in21k --accum 4 --profile
[[ -n ${shards_pid:-} ]] && wait "$shards_pid"
# the trainer itself on real-photo JPEG shards, CPU decode (16 workers) and decode="gpu", vs synthetic batches
check end_to_end 240 python3 bench/end_to_end.py --data /tmp/e2e_shards --workers 16
# decode="gpu" vs the batched decode alone (TorchCodec's, and torchvision's; ratio last), its agreement with
# decode="cpu", and the data-wait share of a ViT-L/16 training loop fed by it
check loader_gpu 150 python3 bench/loader.py --gpu-decode --images 4096 --batch 256 --workers 8
check train_H14_recipe 260 python3 bench/train_throughput.py --recipe vit_h14_in21k --accum 8 --profile
# the compiled model's dropout masks recovered exactly (rate, independence of neighbours, backward = forward),
# without and with gradient checkpointing
# (torch 2.13+ draws four values per Philox call: the image's torch 2.11 does not, the supported 2.14 does)
check dropout_masks 150 python3 bench/dropout_masks.py
check finetune_L16_384 150 python3 bench/finetune_throughput.py
# torchao float8 vs bf16: L/16 rate + loss after 300 steps (2 bf16 seeds), H/14 rate; a verdict last. Its runs
# took 120-180 s each on the H200: a call of its own (CHECKS="fp8")
check fp8 540 python3 bench/fp8_trial.py
echo; echo "=== summary ($gpu, $((SECONDS - start)) s)"; cat "$OUT/summary.txt"
