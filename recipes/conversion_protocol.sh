#!/usr/bin/env bash
# The conversion issue's full protocol on one CUDA GPU (e.g. an H200): the packaged all-MiniLM-L6-v2 on
# RTE / MRPC / STS-B / CoLA, 3 seeds, keep / relu / helu (alpha 0.05 and 0.5) x conversion none / calibrate /
# anneal / calibrate+anneal, bf16, lr 5e-5, batch 32, 3 epochs, 10% warmup, max length 128 (recipes/run_glue.py
# defaults), plus the zero-shot STS-B probe. One run_glue_compare process per task shares the GPU; finished runs
# are skipped, so rerunning the script resumes it. The last call only reads the finished runs into one table.
# GLUE is read from $HF_HELU_DATA_DIR/glue (default: ../shared/data/glue beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${HF_HELU_DATA_DIR:-../shared/data}/glue"
OUT="${OUT:-runs/conversion_full}"
mkdir -p "$OUT"
COLUMNS=(--activations keep relu helu --alphas 0.05 0.5 --conversions none calibrate anneal calibrate+anneal)
python recipes/run_conversion_zeroshot.py --data_dir "$DATA" --ridges 1e-3 1e-2 --output "$OUT/zeroshot.json"
for task in rte mrpc stsb cola; do
    python recipes/run_glue_compare.py --tasks "$task" "${COLUMNS[@]}" --seeds 0 1 2 --output_dir "$OUT" \
        -- --data_dir "$DATA" --mixed_precision bf16 --no_progress "$@" > "$OUT.$task.log" 2>&1 &
done
wait
python recipes/run_glue_compare.py --tasks rte mrpc stsb cola "${COLUMNS[@]}" --seeds 0 1 2 --output_dir "$OUT" \
    -- --data_dir "$DATA" --mixed_precision bf16 --no_progress "$@"
