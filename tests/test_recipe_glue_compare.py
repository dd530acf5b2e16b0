"""The GLUE comparison (recipes/run_glue_compare.py): its statistics, its columns, and an end-to-end run of tiny
BERTs (each configuration a run_glue.py process) into compare.md / compare.json / PNGs, resumable by rerunning."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import GLUE_DIR, REPO, load_script
from recipe_support import glue

DATA = GLUE_DIR
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"GLUE data not found at {DATA}")


@functools.cache
def compare():
    return load_script(REPO / "recipes" / "run_glue_compare.py", "run_glue_compare")


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def _fake_results(task: str, values: dict, dead: float) -> dict:
    return {"status": "complete", "final": {"dev": values}, "dead_units": {"dead_fraction": dead}, "wall_time_s": 1.0}


def test_compare_summary_statistics():
    import statistics

    rng = np.random.default_rng(0)
    table, raw = {}, {}
    for task in ("mrpc", "stsb"):
        for label in ("keep", "helu"):
            for seed in (0, 1, 2):
                a, b = rng.uniform(0.5, 0.9, 2)
                values = dict(zip(glue.get_task(task).metrics, (a, b), strict=True))
                table.setdefault(task, {}).setdefault(label, {})[seed] = _fake_results(task, values, a)
                raw.setdefault((task, label), {})[seed] = 100 * (a + b) / 2
    summary = compare().summarise(table, ["mrpc", "stsb"], ["keep", "helu"])
    for (task, label), scores in raw.items():
        cell = summary["tasks"][task][label]
        assert cell["mean"] == pytest.approx(statistics.mean(scores.values()))
        assert cell["std"] == pytest.approx(statistics.stdev(scores.values()))
    for label in ("keep", "helu"):
        per_seed = [(raw[("mrpc", label)][s] + raw[("stsb", label)][s]) / 2 for s in (0, 1, 2)]
        assert summary["average"][label]["mean"] == pytest.approx(statistics.mean(per_seed))
        assert summary["average"][label]["std"] == pytest.approx(statistics.stdev(per_seed))
    text = compare().markdown(summary, ["mrpc", "stsb"], ["keep", "helu"], "t", "cmd")
    mean, std = summary["tasks"]["stsb"]["helu"]["mean"], summary["tasks"]["stsb"]["helu"]["std"]
    assert f"{mean:.1f} ± {std:.1f}" in text and "| **average** |" in text


@needs_data
def test_compare_end_to_end(tmp_path, tiny_bert_dir):
    root = tmp_path / "cmp"
    argv = ["--tasks", "rte", "stsb", "--activations", "keep", "helu", "--alphas", "0.05", "0.5", "--seeds", "0", "1"]
    argv += [
        "--output_dir",
        str(root),
        "--",
        "--model_name_or_path",
        str(tiny_bert_dir),
        "--data_dir",
        str(DATA),
        "--num_train_epochs",
        "1",
    ]
    argv += [
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "16",
        "--max_length",
        "32",
        "--per_device_train_batch_size",
        "16",
    ]
    argv += ["--no_progress"]
    summary = compare().main(argv)
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
    history = compare().dead_unit_history(runs)
    for label in labels:
        layers = runs[label][0]["epochs"][0]["dead_units"]["layers"]
        assert history[label] == [{"step": runs[label][0]["epochs"][0]["step"],
                                   "dead_fraction": [layer["dead_fraction"] for layer in layers]}]  # fmt: skip
    # Running again reuses the finished runs (nothing retrained) and gives the same table.
    before = {p: p.stat().st_mtime_ns for p in root.glob("*/*/seed*/results.json")}
    assert compare().main(argv) == summary
    assert before == {p: p.stat().st_mtime_ns for p in root.glob("*/*/seed*/results.json")}
    with pytest.raises(ValueError, match="--alpha is set per run"):
        compare().main([*argv, "--alpha", "0.1"])


def test_compare_columns_cross_activations_alphas_and_conversions():
    columns = compare().variants(["keep", "relu", "helu"], [0.05, 0.5], ["none", "calibrate"])
    assert [c[0] for c in columns] == [
        "keep", "relu", "relu+calibrate", "helu_0.05", "helu_0.5", "helu_0.05+calibrate", "helu_0.5+calibrate",
    ]  # fmt: skip
    assert columns[2] == ("relu+calibrate", "relu", None, "calibrate")
    assert columns[-1] == ("helu_0.5+calibrate", "helu", 0.5, "calibrate")
    with pytest.raises(ValueError, match="--conversion is set per run"):
        compare().parse_args(["--tasks", "rte", "--", "--conversion", "anneal"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alphas", "-1"], "error: argument --alphas: HeLU alpha must be >= 0"),
        (["--alphas", "0.05", "nan"], "error: argument --alphas: HeLU alpha must be a finite number >= 0, got nan"),
        (["--tasks", "sst3"], "error: unknown GLUE task 'sst3'"),
    ],
)
def test_bad_columns_are_refused_before_any_training(tmp_path, argv, message):
    """Exit status 2 and one error line, and no run folder: nothing was trained (the keep and relu columns come
    before helu's alpha)."""
    root = tmp_path / "cmp"
    command = [sys.executable, str(REPO / "recipes" / "run_glue_compare.py"), "--activations", "keep", "relu", "helu"]
    command += [*argv, "--seeds", "0", "--output_dir", str(root), "--", "--data_dir", str(tmp_path / "none")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not root.exists()
