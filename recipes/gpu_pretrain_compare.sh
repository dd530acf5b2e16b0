#!/usr/bin/env bash
# Issue 16's GPU protocol on one CUDA GPU (sized for an H200, < 8 min; not yet run): pretrain a BERT from scratch per
# activation (gelu, relu, helu alpha 0.05, helu alpha 0.5) with masked LM on WikiText-2, then fine-tune each on
# SST-2, MRPC, STS-B, RTE, CoLA and write one table in the paper's layout with the dead-unit curves beside it.
#
#   bash recipes/gpu_pretrain_compare.sh [OUTPUT_DIR] [SEEDS, default "0"]
#
# Pretraining: preset "medium" (8 layers, 512 wide, FFN 2048, 8 heads), blocks of 128 tokens, batch 256, 20 M tokens
# (about 8 passes over WikiText-2 train; 611 steps), AdamW lr 5e-4, 6% warmup, linear decay, weight decay 0.01,
# gradient clip 0.5 (the paper's), bf16, masked-only LM head, 10 evaluations on 512 valid blocks. Fine-tuning:
# at most 8,000 training rows per task, full dev sets, 2 epochs, lr 1e-4, batch 64, max_length 128, bf16.
# Every run resumes or is skipped when re-run, so the same command continues an interrupted comparison.
# Data: $HF_HELU_DATA_DIR/{wikitext-2,glue} (default ../shared/data beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/pretrain_compare_gpu}"
SEEDS="${2:-0}"
DATA_ROOT="${HF_HELU_DATA_DIR:-../shared/data}"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this script is for a GPU machine')"
python -c "import torch; print(torch.cuda.get_device_name(0))"
export TOKENIZERS_PARALLELISM=false
# shellcheck disable=SC2086
time python recipes/run_pretrain_compare.py \
  --activations gelu relu helu helu_0.5 \
  --tasks sst2 mrpc stsb rte cola \
  --seeds $SEEDS \
  --output_dir "$OUT" \
  --title "BERT-medium pretrained from scratch on WikiText-2 (20 M tokens, bf16, CUDA), then GLUE dev" \
  --mlm_args "--size medium --per_device_train_batch_size 256 --block_size 128 --max_tokens 20000000 --evaluations 10 \
    --max_eval_blocks 512 --learning_rate 5e-4 --warmup_ratio 0.06 --max_grad_norm 0.5 --mixed_precision bf16" \
  --glue_args "--data_dir $DATA_ROOT/glue --max_train_samples 8000 --num_train_epochs 2 --learning_rate 1e-4 --per_device_train_batch_size 64 \
    --max_length 128 --mixed_precision bf16"
cat "$OUT/compare.md"
