"""Checks of user input shared by the CLI and the recipes: argparse types and hub ids.

Each raises with the offending text and what was expected, so every command reports bad input the same way.
"""

from __future__ import annotations

import argparse

from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_helu.activation import validate_alpha


def is_hub_id(text: str) -> bool:
    """True when ``text`` can name a Hub repository ("name" or "org/name"; not a path like "./x" or "/x")."""
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return not text.startswith((".", "/", "~"))


def _parsed(text: str, convert, accept, expected: str):
    """``convert(text)`` if it parses and ``accept`` holds, else an argparse error naming ``text`` and ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return _parsed(text, int, lambda value: value > 0, "an integer > 0")


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _parsed(text, float, lambda value: 0.0 <= value < 1.0, "a number in [0, 1)")


def alpha(text: str) -> float:
    """argparse type: a HeLU alpha (a finite number >= 0)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a HeLU alpha (a finite number >= 0), got {text!r}") from None
    try:
        return validate_alpha(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
