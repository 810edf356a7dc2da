#!/usr/bin/env bash
# One prepared run on a lent GPU (see /work/.library/device in the dev workspace): install,
# correctness on the card, then benchmarks/gpu.py.  Every stage has its own time limit and log
# under $OUT, so a failing stage still leaves the others' results.
#   bash scripts/gpu_check.sh            # OUT defaults to ./gpu_out
set -u
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
start=$(date +%s)
stage() { echo "== $1 ($(( $(date +%s) - start )) s)"; }
stage "env"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
stage "install"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
stage "correctness on the card (fp16/bf16, cb_smem, packed dequant, graphs, compile)"
timeout -s INT ${QUICK_S:-80} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_triton.py \
    -k "float16 or registry or rotate" > "$OUT/pytest_quick.log" 2>&1; echo "rc=$?"; tail -4 "$OUT/pytest_quick.log"
stage "benchmark"
timeout -s INT ${BENCH_S:-250} python3 benchmarks/gpu.py --kernel-budget-s ${KERNEL_BUDGET_S:-160} \
    --out "$OUT/gpu.json" --markdown BENCHMARKS.md > "$OUT/bench.log" 2>&1; echo "rc=$?"
cp BENCHMARKS.md "$OUT/BENCHMARKS.md" 2>/dev/null
grep -v "^\s*$" "$OUT/bench.log" | tail -16
stage "streaming quantization with --device cuda"
FASQ_NATIVE_FIT=0 FASQ_DISABLE_KERNELS=cpu_lut,cpu_perm,cpu_direct,cpu_tiled timeout -s INT ${REST_S:-40} \
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_stream.py --durations=5 > "$OUT/pytest_stream.log" 2>&1
echo "rc=$?"; tail -4 "$OUT/pytest_stream.log"
stage "done"
