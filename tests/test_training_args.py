"""The recipes' flags (recipe_support.args) and the settings objects they become."""

from __future__ import annotations

import argparse

import pytest
from recipe_support import args as flags

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.errors import UsageError


def parse(*argv: str, **defaults) -> argparse.Namespace:
    parser = flags.add_conversion_args(
        flags.add_model_args(flags.add_training_args(argparse.ArgumentParser(), **defaults))
    )
    return parser.parse_args(list(argv))


def test_defaults_and_overrides():
    args = parse(
        "--output_dir", "out", "--num_train_epochs", "2", "--no_progress", "--scope", "0,1", learning_rate=1e-3
    )
    assert args.learning_rate == 1e-3 and args.alpha == DEFAULT_ALPHA and args.activation == "keep"
    assert flags.ACTIVATION_CHOICES == ("keep", "relu", "helu")
    assert (args.output_dir, args.num_train_epochs, args.no_progress, args.scope) == ("out", 2, True, "0,1")
    assert (args.checkpointing_steps, args.lr_scheduler_type, args.report_to) == ("epoch", "linear", "tensorboard")
    assert parse("--checkpointing_steps", "5").checkpointing_steps == 5
    flags.check_training_args(args)  # the defaults and these values are accepted
    secret = parse("--push_to_hub", "--hub_token", "hf_secret")
    recorded = flags.run_config(secret)
    assert "hf_secret" not in str(recorded) and list(recorded) == sorted(recorded)
    assert recorded == {k: v for k, v in vars(secret).items() if k != "hub_token"}


@pytest.mark.parametrize(
    "argv",
    [
        ["--num_train_epochs", "0"],
        ["--per_device_train_batch_size", "-1"],
        ["--warmup_ratio", "1"],
        ["--alpha", "-0.1"],
        ["--activation", "gelu"],
        ["--checkpointing_steps", "often"],
        ["--lr_scheduler_type", "exponential"],
    ],
)
def test_bad_values_are_refused_by_the_parser(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--learning_rate", "inf"),
        ("--learning_rate", "-1"),
        ("--learning_rate", "0"),
        ("--learning_rate", "nan"),
        ("--weight_decay", "-5"),
        ("--weight_decay", "inf"),
        ("--max_grad_norm", "-1"),
        ("--max_grad_norm", "nan"),
    ],
)
def test_hyperparameters_that_cannot_train_are_refused(flag, value):
    with pytest.raises(UsageError, match=rf"^{flag} must be a finite number .*, got {float(value)}$"):
        flags.check_training_args(parse(flag, value))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num_warmup_steps", "-1"], "--num_warmup_steps must be an integer >= 0, got -1"),
        (["--hub_model_id", "me/model"], "add --push_to_hub"),
        (["--push_to_hub", "--eval_only"], "--eval_only trains none"),
    ],
)
def test_warmup_and_hub_flags_that_cannot_work_are_refused(argv, message):
    with pytest.raises(UsageError, match=message):
        flags.check_training_args(parse(*argv))


@pytest.mark.parametrize("value", ["nan", "inf", "-0.1", "1.5"])
def test_a_warmup_ratio_outside_0_1_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--warmup_ratio", value)
    assert exit_info.value.code == 2 and "--warmup_ratio" in capsys.readouterr().err


def test_lora_settings():
    assert flags.lora_settings(parse()) is None
    args = parse("--lora", "--lora_r", "4", "--lora_target_modules", "query", "value")
    config = flags.lora_settings(args, task_type="SEQ_CLS")
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16.0, 0.1) and config.task_type == "SEQ_CLS"
    assert set(config.target_modules) == {"query", "value"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--distill_weight", "-1"], "--distill_weight must be"),
        (["--distill_weight", "1", "--eval_only"], "--distill_weight applies to training"),
        (["--conversion", "calibrate"], "needs --activation relu or helu"),
        (["--conversion", "anneal", "--activation", "helu", "--eval_only"], "--conversion applies to training"),
        (["--conversion", "anneal", "--activation", "helu", "--anneal_fraction", "0"], "--anneal_fraction must be"),
        (["--conversion", "calibrate", "--activation", "relu", "--calibration_samples", "0"], "calibration_samples"),
        (["--conversion", "calibrate", "--activation", "relu", "--calibration_ridge", "-1"], "ridge must be"),
    ],
)
def test_conversion_flags_the_run_cannot_honour(argv, message):
    with pytest.raises(ValueError, match=message):
        flags.check_conversion_args(parse(*argv))


def test_conversion_flags_that_fit():
    flags.check_conversion_args(parse())
    converting = ("--conversion", "calibrate+anneal", "--activation", "helu", "--distill_weight", "2")
    flags.check_conversion_args(parse(*converting))


def test_conversion_defaults_to_auto_which_every_run_accepts():
    from hf_helu.conversion import CONVERSION_CHOICES

    assert parse().conversion == "auto"
    flags.check_conversion_args(parse())  # keep + auto: resolves to none later, no error here
    flags.check_conversion_args(parse("--eval_only"))
    flags.check_conversion_args(parse("--activation", "helu", "--init", "scratch"))
    assert "auto" in CONVERSION_CHOICES and parse("--conversion", "none").conversion == "none"
    with pytest.raises(ValueError, match="--anneal_fraction must be"):  # auto may anneal: its knobs are checked
        flags.check_conversion_args(parse("--activation", "helu", "--anneal_fraction", "2"))
    with pytest.raises(SystemExit):
        parse("--conversion", "automatic")
