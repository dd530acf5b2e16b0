#!/usr/bin/env bash
# Sparsity pressure on one CUDA GPU: the CPU protocol (recipes/sparsity_protocol.sh) at 100x its recovery tokens.
# SmolLM2-135M-Instruct converted to ReLU and HeLU (conversion auto), each fine-tuned with --sparsity_penalty 0 and
# each of PENALTIES on STEPS x 32 x 256 WikiText-2 tokens (600 steps: 4.9M; --num_train_epochs 100 lets the run go over the
# training text more than once) in bf16, seed 0; then seed 1 at the penalty `sparsity_compare.py --best` picks. Same
# evaluation as on CPU (the first 32 x 256 validation tokens, FFN zeros and dead units per layer, decode sparsity,
# band share).
# Prepared, not run here (no GPU).   HF_HELU_DATA_DIR=../shared/data bash recipes/gpu_sparsity_protocol.sh [OUT]
set -euo pipefail
STEPS=${STEPS:-600} BATCH=32 CALIBRATION=128 \
    EXTRA="--warmup_ratio 0.05 --mixed_precision bf16 --num_train_epochs 100" \
    exec bash "$(dirname "$0")/sparsity_protocol.sh" "${1:-runs/gpu_sparsity}"
