#!/usr/bin/env bash
# The full GLUE activation comparison of issue 4 on one CUDA GPU (e.g. an H200): the packaged all-MiniLM-L6-v2
# checkpoint, RTE/MRPC/STS-B/CoLA (full train sets, full dev sets), keep (GELU) / ReLU / HeLU alpha 0.05 and 0.5,
# seeds 0 1 2, 3 epochs, lr 5e-5, batch 32, max_length 128, bf16 autocast.
#
#   bash recipes/gpu_glue_compare.sh [OUTPUT_DIR] [extra recipes/run_glue.py options...]
#
# Writes OUTPUT_DIR/compare.md (table), compare.json, compare.png and every run's results.json. Finished runs are
# skipped, so re-running the same command continues an interrupted comparison. GLUE is read from
# $HF_HELU_DATA_DIR/glue (default: ../shared/data/glue beside the checkout); set HF_HELU_DATA_DIR to an empty string
# to read GLUE from the hub.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/glue_compare_gpu}"
shift || true
DATA_ROOT="${HF_HELU_DATA_DIR-../shared/data}"
DATA_ARGS=()
if [[ -n "$DATA_ROOT" ]]; then DATA_ARGS=(--data_dir "$DATA_ROOT/glue"); fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
python -c "import torch; print(torch.cuda.get_device_name(0), 'bf16' if torch.cuda.is_bf16_supported() else 'no bf16')"
export TOKENIZERS_PARALLELISM=false
time python recipes/run_glue_compare.py \
  --tasks rte mrpc stsb cola \
  --activations keep relu helu --alphas 0.05 0.5 \
  --seeds 0 1 2 \
  --output_dir "$OUT" \
  --title "MiniLM-L6 on GLUE dev, full train sets, 3 epochs, bf16 (CUDA)" \
  -- "${DATA_ARGS[@]}" --num_train_epochs 3 --learning_rate 5e-5 --per_device_train_batch_size 32 --max_length 128 --warmup_ratio 0.1 \
  --weight_decay 0.01 --mixed_precision bf16 --no_progress "$@"
cat "$OUT/compare.md"
