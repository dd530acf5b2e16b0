"""The one error style of every recipe: a user error prints ``error: <message>`` and exits with status 2.

User errors are raised as :class:`RecipeError` (or another of :data:`USER_ERRORS`: a bad flag value, a missing
file) before any long work starts; :func:`exit_on_user_error` runs a recipe's ``main`` and turns them into that
line, so a traceback (exit 1) always means a bug, not bad input.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class RecipeError(ValueError):
    """A user error of a recipe (bad input, an output folder it may not use): one line, exit status 2."""


# What a recipe reports as the user's error: its own errors, bad values, files that are missing or in the way.
USER_ERRORS: tuple[type[BaseException], ...] = (RecipeError, ValueError, FileNotFoundError, FileExistsError)


def exit_on_user_error(main: Callable[[], Any], errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Any:
    """``main()``; a user error (one of ``errors``) becomes ``error: ...`` on stderr and ``sys.exit(2)``."""
    try:
        return main()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


__all__ = ["USER_ERRORS", "RecipeError", "exit_on_user_error"]
