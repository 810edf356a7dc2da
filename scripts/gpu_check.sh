#!/usr/bin/env bash
# One prepared run on a lent GPU machine (one H100/H200), at most TOTAL_S seconds (default 480: 8 min),
# each step under its own `timeout`, the later steps cut to what is left of the total:
#
#   install  pip install -e . (no deps: the machine's torch/triton)                          60 s
#   env      nvidia-smi, torch / triton versions                                             15 s
#   static   python -m fasq.kernels.cuda_static: registers, spills, shared memory and main-loop
#            instructions per code of every representative build, sm_80 + sm_90 (static.json)  60 s
#   tests    the GPU tests of the CUDA decode kernel (tests/test_kernels_cuda.py -k gpu: against
#            the reference on random layers, NaN-poisoned outputs, fp16/bf16, 1-8 tokens, graphs)  150 s
#   tests_plain   only if `tests` failed: again with FASQ_CUDA_FAST=0 (the plain lookups), which the
#            timing steps then use (the log says so)                                           90 s
#   read     benchmarks/gpu_read.py: the CUDA kernel vs FP16 F.linear vs a plain read of the same
#            bytes, cold in L2 by graph replay, 4 shapes x 3 formats x 1-8 tokens (read.json)  140 s
#   bench    benchmarks/gpu.py, kernels only at 1 token, no sweeps, no end to end (gpu.json)   what is left
#
# Writes to $OUT (default ./gpu_out): steps.json (each step's rc, seconds, budget, timed_out; rewritten
# after every step, so a run cut short still leaves it), log.txt (every step's output), static.json,
# read.json, gpu.json: six files (the device tool brings back at most eight).
# DRY=1: no GPU needed: skips install and bench, runs tests on the CPU (the GPU tests skip, the nvcc
# compile check runs) and gpu_read.py --dry-run; it checks the script, not the card.
set -u
OUT=${OUT:-$PWD/gpu_out}
DRY=${DRY:-0}
TOTAL_S=${TOTAL_S:-480}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 OUT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # this checkout's fasq, installed or not
START=$(date +%s)
LOG="$OUT/log.txt"
: > "$LOG"
RECORDS=()

write_steps() {   # steps.json, atomically
  local IFS=,
  printf '{"dry": %s, "total_budget_s": %d, "elapsed_s": %d, "steps": [%s]}\n' \
    "$([ "$DRY" = 1 ] && echo true || echo false)" "$TOTAL_S" "$(( $(date +%s) - START ))" "${RECORDS[*]}" \
    > "$OUT/steps.json.tmp" && mv "$OUT/steps.json.tmp" "$OUT/steps.json"
}

# step NAME BUDGET_S COMMAND...: runs COMMAND under `timeout` (its budget, or what is left of the total).
step() {
  local name=$1 budget=$2; shift 2
  local left=$(( TOTAL_S - ($(date +%s) - START) - 5 ))
  (( budget > left )) && budget=$left
  if (( budget < 5 )); then
    RECORDS+=("{\"step\": \"$name\", \"rc\": null, \"seconds\": 0, \"budget_s\": $budget, \"timed_out\": false, \"skipped\": \"no time left\"}")
    write_steps
    echo "== $name: skipped, no time left" | tee -a "$LOG"
    return 1
  fi
  echo "== $name (budget ${budget} s): $*" | tee -a "$LOG"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=5 "$budget" "$@" >> "$LOG" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t0 )) to=false
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && to=true
  RECORDS+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $dt, \"budget_s\": $budget, \"timed_out\": $to}")
  write_steps
  echo "== $name: rc $rc in ${dt} s$([ $to = true ] && echo ', TIMED OUT')" | tee -a "$LOG"
  return $rc
}

ENV_INFO='nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv 2>&1
python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available())"
python3 -c "import triton; print(\"triton\", triton.__version__)" 2>&1
command -v nvcc cuobjdump; true'

if [ "$DRY" != 1 ]; then
  step install 60 python3 -m pip install -q --no-deps --no-build-isolation -e . || { tail -20 "$LOG"; exit 1; }
fi
step env 15 bash -c "$ENV_INFO"
step static 60 python3 -m fasq.kernels.cuda_static --json "$OUT/static.json"
if [ "$DRY" = 1 ]; then
  step tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py
  step read 150 python3 benchmarks/gpu_read.py --dry-run --out "$OUT/read.json"
else
  if ! step tests 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py -k gpu; then
    echo "GPU tests failed: again with FASQ_CUDA_FAST=0 (the plain lookups); the timings use it" | tee -a "$LOG"
    export FASQ_CUDA_FAST=0
    step tests_plain 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_kernels_cuda.py -k gpu
  fi
  step read 140 python3 benchmarks/gpu_read.py --budget-s 110 --out "$OUT/read.json"
  step bench 120 python3 benchmarks/gpu.py --no-sweep --no-cuda-sweep --no-e2e --tokens 1 --kernel-budget-s 45 \
    --out "$OUT/gpu.json"
fi
write_steps
echo "== done in $(( $(date +%s) - START )) s; $OUT/steps.json:"
cat "$OUT/steps.json"
