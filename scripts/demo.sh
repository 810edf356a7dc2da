#!/usr/bin/env bash
# The main job on the embedded defaults: set up, quantize SmolLM2-135M-Instruct, and compare the size and
# perplexity of the original and the quantized model on the Lee news corpus. Extra arguments go to `fasq demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m fasq demo "$@"
