"""``hf_helu.inputs``: the argparse types and the Hub-id check, with the error texts users see."""

from __future__ import annotations

import argparse

import pytest

from hf_helu.inputs import alpha, fraction, is_hub_id, positive_int


@pytest.mark.parametrize(("text", "value"), [("1", 1), ("32", 32), (" 7 ", 7), ("+3", 3)])
def test_positive_int_accepts_integers_above_zero(text, value):
    assert positive_int(text) == value and isinstance(positive_int(text), int)


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "abc", ""])
def test_positive_int_names_the_bad_text(text):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        positive_int(text)
    assert str(error.value) == f"expected an integer > 0, got {text!r}"


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("0.1", 0.1), ("0.999", 0.999), ("1e-3", 0.001)])
def test_fraction_accepts_zero_up_to_but_not_one(text, value):
    assert fraction(text) == value


@pytest.mark.parametrize("text", ["1", "1.0", "-0.1", "2", "nan", "inf", "half"])
def test_fraction_names_the_bad_text(text):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        fraction(text)
    assert str(error.value) == f"expected a number in [0, 1), got {text!r}"


@pytest.mark.parametrize(("text", "value"), [("0", 0.0), ("0.05", 0.05), ("2", 2.0), ("1e-4", 1e-4)])
def test_alpha_accepts_finite_numbers_from_zero(text, value):
    assert alpha(text) == value and isinstance(alpha(text), float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("-1", "HeLU alpha must be >= 0 (the backward threshold is -alpha), got -1.0"),
        ("-0.05", "HeLU alpha must be >= 0 (the backward threshold is -alpha), got -0.05"),
        ("nan", "HeLU alpha must be a finite number >= 0, got nan"),
        ("inf", "HeLU alpha must be a finite number >= 0, got inf"),
        ("abc", "expected a HeLU alpha (a finite number >= 0), got 'abc'"),
    ],
)
def test_alpha_errors_say_what_is_wrong(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as error:
        alpha(text)
    assert str(error.value) == message


def test_argparse_reports_the_type_error_on_the_option(capsys):
    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--n", type=positive_int)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--n", "0"])
    assert exit_info.value.code == 2
    assert "prog: error: argument --n: expected an integer > 0, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text", ["bert-base-uncased", "gpt2", "sentence-transformers/all-MiniLM-L6-v2", "org/name.v2", "a", "Org_1/x_y"]
)
def test_hub_ids(text):
    assert is_hub_id(text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "./model",
        "../model",
        "/abs/model",
        "~/model",
        ".hidden",
        "a/b/c",
        "org/",
        "/name",
        "-org/name",
        "a b",
        "a:b",
        "org/name extra",
    ],
)
def test_paths_and_malformed_names_are_not_hub_ids(text):
    assert not is_hub_id(text)
