"""GLUE dev score of a fine-tuned model before and after int8: the paper's Table 3 on this project's models.

One model folder (``AutoModelForSequenceClassification`` + tokenizer, e.g. ``OUTPUT_DIR/model`` of
``recipes/run_glue.py`` with GELU kept, or ``OUTPUT_DIR/model_relu`` of a HeLU run) is scored four ways on the
whole dev set: PyTorch fp32, PyTorch dynamic int8 (``torch.ao.quantization.quantize_dynamic`` of the Linear
layers), ONNX Runtime fp32 and ONNX Runtime dynamic int8 (both from ``hf_helu.onnx_export.export_onnx``).

    python benchmarks/int8_glue.py --task sst2 --model runs/sst2/model --data_dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_helu.onnx_export import INT8_FILE, ONNX_FILE, export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # recipe_support lives beside the recipes
from recipe_support.glue import (
    get_task,
    glue_metrics,
    glue_score,
    predictions_from_logits,
    read_tsv,
)

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]  # a padded batch of numpy inputs -> logits


def dev_batches(task_name: str, data_dir: str, tokenizer, batch_size: int = 64, max_length: int = 128):
    """The whole dev set as padded numpy batches (the inputs a deployer feeds ONNX Runtime), and the labels."""
    task = get_task(task_name)
    columns = read_tsv(task, Path(data_dir) / task.folder / task.eval_files()["dev"])
    texts = [columns[c] for c in task.text_columns]
    batches = []
    for start in range(0, len(columns["label"]), batch_size):
        chunk = [t[start : start + batch_size] for t in texts]
        encoded = tokenizer(*chunk, truncation=True, max_length=max_length, padding=True, return_tensors="np")
        batches.append({k: v.astype(np.int64) for k, v in encoded.items()})
    return task, batches, np.asarray(columns["label"])


def torch_scorer(model: nn.Module) -> Scorer:
    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()

    return score


def ort_scorer(path: Path, threads: int, every_output: bool = False) -> Scorer:
    """An ONNX Runtime session on ``threads`` intra-op threads returning ``logits`` (or, computing every output,
    the first one: what a forward of a base model costs)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def score(batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {n: batch[n] if n in batch else np.zeros_like(batch["input_ids"]) for n in names}
        return session.run(None if every_output else ["logits"], feed)[0]

    return score


def torch_int8(model: nn.Module) -> nn.Module:
    """PyTorch dynamic int8 of every Linear (weights int8 per tensor, activations quantized per batch)."""
    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def int8_scores(model_dir: str, task_name: str, data_dir: str, threads: int = 1) -> dict[str, float]:
    """GLUE dev score (x100, the recipe's headline number) of ``model_dir`` per backend and precision."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    task, batches, labels = dev_batches(task_name, data_dir, tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(model, Path(tmp) / "onnx", quantize="int8")
        scorers = {
            "torch fp32": torch_scorer(model),
            "torch int8": torch_scorer(torch_int8(model)),
            "ort fp32": ort_scorer(Path(tmp) / "onnx" / ONNX_FILE, threads),
            "ort int8": ort_scorer(Path(tmp) / "onnx" / INT8_FILE, threads),
        }
        scores = {}
        for name, scorer in scorers.items():
            logits = np.concatenate([scorer(batch) for batch in batches])
            scores[name] = glue_score(task, glue_metrics(task, predictions_from_logits(task, logits), labels))
    return scores


def markdown(rows: list[tuple[str, str, str, dict[str, float]]]) -> list[str]:
    """rows: (task, label, model folder, scores). Int8 deltas are against the same backend's fp32."""
    lines = [
        "| task | model | torch fp32 | torch int8 (delta) | ORT fp32 | ORT int8 (delta) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, label, folder, s in rows:
        lines.append(
            f"| {task} | {label} (`{folder}`) | {s['torch fp32']:.2f} | {s['torch int8']:.2f} "
            f"({s['torch int8'] - s['torch fp32']:+.2f}) | {s['ort fp32']:.2f} | {s['ort int8']:.2f} "
            f"({s['ort int8'] - s['ort fp32']:+.2f}) |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--model", required=True, help="fine-tuned sequence-classification folder")
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scores = int8_scores(args.model, args.task, args.data_dir, args.threads)
    print("\n".join(markdown([(args.task, "model", args.model, scores)])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
