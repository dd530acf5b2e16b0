"""GLUE metrics (recipe_support.glue): the library's (scikit-learn / scipy, as evaluate's glue metric) against
formulas written out here, the score, and (where cached) evaluate's own glue metric."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from recipe_support import glue


def ref_accuracy(predictions: Sequence, labels: Sequence) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean())


def ref_binary_f1(predictions: Sequence, labels: Sequence) -> float:
    """F1 of the positive class 1 (sklearn's ``f1_score`` default; 0.0 when there is no true positive)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    fp = float(np.sum((predictions == 1) & (labels != 1)))
    fn = float(np.sum((predictions != 1) & (labels == 1)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def ref_matthews(predictions: Sequence, labels: Sequence) -> float:
    """Matthews correlation from the confusion matrix (multi-class form); 0.0 when undefined, like sklearn."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.union1d(predictions, labels)
    c = np.array([[np.sum((labels == a) & (predictions == b)) for b in classes] for a in classes], dtype=np.float64)
    t, p, n = c.sum(axis=1), c.sum(axis=0), c.sum()
    correct = np.trace(c)
    cov_yp = correct * n - t @ p
    cov_pp = n * n - p @ p
    cov_yy = n * n - t @ t
    denominator = math.sqrt(cov_yy * cov_pp)
    return 0.0 if denominator == 0 else float(cov_yp / denominator)


def ref_pearson(x: Sequence, y: Sequence) -> float:
    """Pearson correlation (nan when one side is constant, like scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float("nan") if denominator == 0 else float(np.clip((dx @ dy) / denominator, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        stop = start
        while stop + 1 < len(values) and sorted_values[stop + 1] == sorted_values[start]:
            stop += 1
        ranks[order[start : stop + 1]] = (start + stop) / 2 + 1  # ties share their mean rank
        start = stop + 1
    return ranks


def ref_spearman(x: Sequence, y: Sequence) -> float:
    """Spearman correlation: Pearson of the average ranks (ties averaged, like scipy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return ref_pearson(_average_ranks(x), _average_ranks(y))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_the_formulas(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=101)
    predictions = np.where(rng.random(101) < 0.7, labels, 1 - labels)
    mrpc = glue.glue_metrics(glue.get_task("mrpc"), predictions, labels)
    assert mrpc["accuracy"] == pytest.approx(ref_accuracy(predictions, labels))
    assert mrpc["f1"] == pytest.approx(ref_binary_f1(predictions, labels))
    cola = glue.get_task("cola")
    assert glue.glue_metrics(cola, predictions, labels)["matthews_correlation"] == pytest.approx(
        ref_matthews(predictions, labels)
    )
    labels3, predictions3 = rng.integers(0, 3, size=77), rng.integers(0, 3, size=77)
    assert glue.glue_metrics(cola, predictions3, labels3)["matthews_correlation"] == pytest.approx(
        ref_matthews(predictions3, labels3)
    )


def test_classification_metric_edge_cases():
    labels = np.array([1, 0, 1, 1, 0])
    cola, mrpc = glue.get_task("cola"), glue.get_task("mrpc")
    mcc = lambda p: glue.glue_metrics(cola, p, labels)["matthews_correlation"]  # noqa: E731
    constant = np.ones_like(labels)  # MCC undefined -> 0.0
    assert mcc(constant) == ref_matthews(constant, labels) == 0.0
    none_positive = np.zeros_like(labels)  # no true positive -> F1 0.0
    assert glue.glue_metrics(mrpc, none_positive, labels)["f1"] == ref_binary_f1(none_positive, labels) == 0.0
    assert mcc(labels) == pytest.approx(1.0)
    assert mcc(1 - labels) == pytest.approx(-1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_the_formulas(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=200)
    y = 0.6 * x + rng.normal(size=200)
    y_ties = np.round(y * 2) / 2  # STS-B style scores with many ties
    stsb = glue.get_task("stsb")
    for a, b in ((x, y), (x, y_ties), (np.round(x), y_ties)):
        metrics = glue.glue_metrics(stsb, a, b)
        assert metrics["pearson"] == pytest.approx(ref_pearson(a, b), abs=1e-12)
        assert metrics["spearmanr"] == pytest.approx(ref_spearman(a, b), abs=1e-12)
    assert np.isnan(glue.glue_metrics(stsb, np.ones(5), np.arange(5.0))["pearson"])


def test_glue_metrics_keys_and_score():
    labels = np.array([0, 1, 1, 0, 1])
    predictions = np.array([0, 1, 0, 0, 1])
    mrpc = glue.glue_metrics(glue.get_task("mrpc"), predictions, labels)
    assert set(mrpc) == {"accuracy", "f1"}
    assert glue.glue_score(glue.get_task("mrpc"), mrpc) == pytest.approx(50 * (0.8 + 0.8))
    assert set(glue.glue_metrics(glue.get_task("cola"), predictions, labels)) == {"matthews_correlation"}
    assert set(glue.glue_metrics(glue.get_task("stsb"), predictions * 1.0, labels * 1.0)) == {"pearson", "spearmanr"}
    compute = glue.make_compute_metrics(glue.get_task("stsb"))
    logits = np.array([[0.1], [0.9], [0.4], [0.2], [0.7]])
    out = compute({"predictions": logits, "labels": labels.astype(np.float32)})
    assert out["pearson"] == pytest.approx(ref_pearson(logits[:, 0], labels))
    with pytest.raises(ValueError, match="shape"):
        glue.glue_metrics(glue.get_task("rte"), predictions[:3], labels)


def _evaluate_glue_cached() -> bool:
    cache = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "modules" / "evaluate_modules"
    return any(cache.glob("metrics/*glue*"))


@pytest.mark.skipif(not _evaluate_glue_cached(), reason="evaluate's glue metric needs the hub (not cached here)")
@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb", "rte"])
def test_local_metrics_match_evaluate(task):
    spec = glue.get_task(task)
    rng = np.random.default_rng(0)
    if spec.is_regression:
        labels = rng.uniform(0, 5, 60)
        predictions = labels + rng.normal(size=60)
    else:
        labels = rng.integers(0, 2, 60)
        predictions = np.where(rng.random(60) < 0.7, labels, 1 - labels)
    ours = glue.glue_metrics(spec, predictions, labels)
    theirs = glue.evaluate_glue_metrics(spec, predictions, labels)
    assert ours == pytest.approx(theirs)
