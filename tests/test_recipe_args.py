"""One argument layer for every training recipe: the same bad hyperparameters are refused by run_glue, run_speech,
run_mlm and run_clm with the same message, before any data, model or output folder is touched, and as a script
with one `error:` line and exit status 2."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, load_script

from hf_helu.errors import UsageError

RECIPES = ("run_glue", "run_speech", "run_mlm", "run_clm")

BAD = [
    ("--learning_rate", "inf", "--learning_rate must be a finite number > 0, got inf"),
    ("--learning_rate", "nan", "--learning_rate must be a finite number > 0, got nan"),
    ("--learning_rate", "-1", "--learning_rate must be a finite number > 0, got -1.0"),
    ("--learning_rate", "0", "--learning_rate must be a finite number > 0, got 0.0"),
    ("--weight_decay", "-5", "--weight_decay must be a finite number >= 0, got -5.0"),
    ("--weight_decay", "inf", "--weight_decay must be a finite number >= 0, got inf"),
    ("--max_grad_norm", "nan", "--max_grad_norm must be a finite number >= 0 (0: no clipping), got nan"),
    ("--num_warmup_steps", "-1", "--num_warmup_steps must be an integer >= 0, got -1"),
]


@functools.cache
def recipe(name: str):
    return load_script(REPO / "recipes" / f"{name}.py", f"{name}_args_test")


def argv(name: str, root: Path) -> list[str]:
    """Flags each recipe needs to get past its parser; every path in them is missing, so a recipe that skipped the
    hyperparameter check would fail on them with another message."""
    missing = str(root / "missing")
    needed = {
        "run_glue": ["--task", "rte", "--model_name_or_path", missing, "--data_dir", missing],
        "run_speech": ["--dataset", missing, "--model_name_or_path", missing],
        "run_mlm": ["--max_train_steps", "1", "--train_files", missing, "--valid_files", missing],
        "run_clm": ["--model_name_or_path", missing, "--train_file", missing, "--validation_file", missing],
    }[name]
    return [*needed, "--output_dir", str(root / "out"), "--no_progress"]


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize(("flag", "value", "message"), BAD)
def test_every_recipe_refuses_the_same_bad_values_before_any_work(tmp_path, name, flag, value, message):
    with pytest.raises(UsageError) as raised:
        recipe(name).main([*argv(name, tmp_path), flag, value])
    assert str(raised.value) == message
    assert not (tmp_path / "out").exists()


def _not_installed_tracker() -> str | None:
    import importlib.util

    names = ("wandb", "aim", "comet_ml", "clearml", "swanlab", "dvclive", "mlflow")
    return next((name for name in names if importlib.util.find_spec(name) is None), None)


@pytest.mark.parametrize("name", RECIPES)
def test_a_tracker_that_is_unknown_or_not_installed_is_refused_before_any_work(tmp_path, name):
    """accelerate itself drops a tracker whose package is missing without a word: the recipes refuse it."""
    with pytest.raises(UsageError, match=r"^--report_to nosuch: Unsupported logging capability: nosuch"):
        recipe(name).main([*argv(name, tmp_path), "--with_tracking", "--report_to", "nosuch"])
    missing = _not_installed_tracker()
    if missing is not None:
        with pytest.raises(UsageError, match=rf"^--report_to {missing}: {missing} is not installed$"):
            recipe(name).main([*argv(name, tmp_path), "--with_tracking", "--report_to", missing])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_takes_the_transformers_flag_names(name, capsys):
    """--help of each training recipe lists the flags of transformers' examples and the tracker and hub flags."""
    with pytest.raises(SystemExit):
        recipe(name).main(["--help"])
    shown = capsys.readouterr().out
    flags = [
        "--model_name_or_path",
        "--per_device_train_batch_size",
        "--per_device_eval_batch_size",
        "--learning_rate",
        "--weight_decay",
        "--num_train_epochs",
        "--max_train_steps",
        "--gradient_accumulation_steps",
        "--lr_scheduler_type",
        "--num_warmup_steps",
        "--output_dir",
        "--seed",
        "--checkpointing_steps",
        "--resume_from_checkpoint",
        "--with_tracking",
        "--report_to",
        "--push_to_hub",
        "--hub_model_id",
        "--hub_token",
    ]
    assert [flag for flag in flags if flag not in shown] == []


@pytest.mark.parametrize("name", RECIPES)
def test_as_a_script_a_bad_value_is_one_error_line_and_exit_2(tmp_path, name):
    command = [sys.executable, str(REPO / "recipes" / f"{name}.py"), *argv(name, tmp_path), "--learning_rate", "inf"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: --learning_rate must be a finite number > 0, got inf"]
